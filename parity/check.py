"""Check that neox_jax computes what an independent PyTorch GPT-NeoX computes from the same checkpoint.

    python -m parity.check --checkpoint DIR [--model CONVERTED_DIR] --tokenizer FILE
        [--prompt TEXT ... | --prompts FILE] [--dtype float16|float32] [--max-new-tokens N]
        [--json OUT] [--per-layer] [--config YAML_OR_JSON | --preset NAME] [--tp-exact] [--quantize int8|fp8|int8-dynamic]

The reference (`parity.model`, loaded by `parity.load` from --checkpoint: DeepSpeed shards or a Hugging Face
directory) runs first and is freed; then neox_jax loads --model (a converted directory) or, without it,
--checkpoint itself. Each prompt is run through both without a cache (logits, optionally the hidden state
after every layer) and continued greedily with each side's own KV-cache decoder.

Figures, per prompt and overall (logits compared in fp32, "scale" = RMS of the reference's logits):
max |Δlogit|, relative L2 ||Δ|| / ||ref||, mean and max KL(ref || jax) of the next-token distributions per
position, top-1 agreement, and the first new token where the greedy continuations differ, with the
reference's top-1 minus top-2 logit margin at that step.

Tolerances. fp32 is tight: both sides compute the same function in IEEE single precision with fp32
accumulation and differ only in summation order (~1e-7 relative per op; measured ~2e-6 relative L2 on the
test models); 1e-4 leaves room for 44 layers and long prompts, while real faults (a swapped head, a
halved bias, a wrong rotary width, a negated norm bias) move logits by 1e-3 .. 1 relative. fp16 is
distributional: fp16 keeps 11 significant bits (unit roundoff u = 4.9e-4) and correct implementations
round in different places (the reference rounds attention scores, the rotary products and the logits to
fp16 as the training code did; neox_jax keeps them in fp32), so single logits legitimately differ by
several percent of the logit scale. Measured on a 3-layer test model: each fp16 side is ~4e-3 relative
L2 from the fp32 result and the two are 4.6e-3 (~10 u) apart, max |Δ| 4% of the scale. What must agree
is the distribution. The fp16 bounds allow ~10x that for depth; recalibrate them from the figures a 20B
run prints. Subtle faults are for the fp32 run to catch.

    criterion                                    float32     float16
    relative L2 of logits (each prompt)          <= 1e-4     <= 5e-2
    max |Δlogit| / logit scale (any position)    <= 1e-3     reported only
    mean KL, nats (each prompt)                  <= 1e-6     <= 5e-3
    max KL, nats (any position)                  <= 1e-4     <= 0.25
    top-1 agreement off near-ties (pooled)       >= 0.999    >= 0.99
    near-tie margin tau, x logit scale           4e-4        8e-2
    greedy continuation                          may part only after a near-tie (see below)
    hidden state rel. L2 per layer (--per-layer) <= 1e-4     <= 5e-2

A near-tie is a step where the reference's top-1 and top-2 logits are closer than the implementations'
disagreement can be trusted to resolve: tau times the logit scale, or twice the largest |Δlogit| measured
on that prompt, whichever is larger. Greedy continuations that part after a near-tie are reported but
pass (a difference after a clear margin means the KV-cache decoder computes something else). Top-1
agreement is counted on positions whose reference margin exceeds tau times the logit scale and also
3x the RMS, over the prompt's positions, of how much the gap between the reference's two best logits
moved (the decisive margin, printed per prompt in the JSON as `decisive_margin`). The second bound
follows the perturbation actually measured: a correct implementation whose logits move by that much
flips a gap within ~2 RMS of it a few percent of the time, which a fixed tau cannot know (fp8 on the
GPU session's checkpoint: the gap moves by 0.16-0.20 of the scale, tau is 0.3, and 3 of 85 positions
just above tau flipped; docs/quantization.md). In fp32 and fp16 the measured gap moves far less than
tau, so tau decides there; a fault that moves it more is out of the relative-L2 and KL bounds anyway.

--tp-exact: the reference is GPT-NeoX's tensor-parallel computation (`parity.tensor_parallel`: one
torch.distributed process per rank, each reading only its own shards, all-reducing as Megatron did), and
neox_jax loads the shards in its exact tensor-parallel mode; the criteria are the same. The merged model
(neox_jax's default) is then also run and its distance from the exact reference reported per prompt (KL,
top-1 agreement, relative L2): how much merging the ranks changes the model. That figure is information,
not a criterion.

Quantized runs (`--quantize int8`, `fp8` or `int8-dynamic`): neox_jax quantizes its matmul weights while
loading (int8-dynamic its activations too, in every matmul), the reference stays unquantized in --dtype, so
the figures measure what quantization changes. Quantization
error dominates the dtype's rounding (int8 rounds each weight by up to 1/254 of its channel's largest,
fp16 by 1/2048 of itself), so a quantized run is judged on what a user of it needs, the distribution and
the chosen tokens, with bounds of ~3x what was measured on decisive synthetic weights (tests/test_quantize.py:
int8 relative L2 3.5e-2, mean KL 4e-3, max KL 2e-2; fp8 e4m3 0.14, 5e-2, 0.4; int8-dynamic 4.7e-2, 9e-3,
4e-2) and near-ties widened to the
logit change quantization itself makes:

    criterion                                    int8        fp8         int8-dynamic
    relative L2 of logits (each prompt)          <= 0.1      <= 0.4      <= 0.15
    mean KL, nats (each prompt)                  <= 2e-2     <= 0.2      <= 3e-2
    max KL, nats (any position)                  <= 0.25     <= 1.5      <= 0.25
    top-1 agreement off near-ties (pooled)       >= 0.99     >= 0.97     >= 0.99
    near-tie margin tau, x logit scale           0.1         0.3         0.1
    hidden state rel. L2 per layer (--per-layer) <= 0.1      <= 0.4      <= 0.15

Top-1 agreement at every position is reported beside it (near-ties flip under any perturbation of this
size; they are ~20% of the positions of random-weight models).

Exit status: 0 pass, 1 mismatch, 2 bad input (a one-line `error: ...` on stderr).
"""

from __future__ import annotations

from neox_jax.cli import exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # before torch and JAX load: Ctrl-C anywhere is exit 130, never a traceback or a crash

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import neox_jax
from neox_jax.checkpoints import CheckpointError
from neox_jax.config import PRESETS, ConfigError, NeoXConfig
from neox_jax.dtypes import DTYPES, default_dtype
from neox_jax.tokenizer import END_OF_TEXT

from .load import LoadError, deepspeed_config, load

DEFAULT_PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "Q: What is the boiling point of water at sea level?\nA:",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\nprint(",
]


@dataclasses.dataclass(frozen=True)
class Tolerances:
    rel_l2: float
    max_abs_rel: float | None  # None: reported only
    mean_kl: float
    max_kl: float
    top1: float
    tie: float  # near-tie margin, in units of the logit scale
    hidden_rel_l2: float


TOLERANCES = {
    "float32": Tolerances(rel_l2=1e-4, max_abs_rel=1e-3, mean_kl=1e-6, max_kl=1e-4, top1=0.999, tie=4e-4,
                          hidden_rel_l2=1e-4),
    "float16": Tolerances(rel_l2=5e-2, max_abs_rel=None, mean_kl=5e-3, max_kl=0.25, top1=0.99, tie=8e-2,
                          hidden_rel_l2=5e-2),
}
QUANTIZED_TOLERANCES = {  # with --quantize, whatever the dtype (see the module docstring)
    "int8": Tolerances(rel_l2=0.1, max_abs_rel=None, mean_kl=2e-2, max_kl=0.25, top1=0.99, tie=0.1,
                       hidden_rel_l2=0.1),
    "fp8": Tolerances(rel_l2=0.4, max_abs_rel=None, mean_kl=0.2, max_kl=1.5, top1=0.97, tie=0.3,
                      hidden_rel_l2=0.4),
    "int8-dynamic": Tolerances(rel_l2=0.15, max_abs_rel=None, mean_kl=3e-2, max_kl=0.25, top1=0.99, tie=0.1,
                               hidden_rel_l2=0.15),
}


class BadInput(Exception):
    """Exit 2: something the user gave cannot be used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def parse_args(argv):
    p = _Parser(prog="python -m parity.check", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="GPT-NeoX DeepSpeed checkpoint (or HF dir) for the reference")
    p.add_argument("--model", help="converted HF directory for neox_jax (default: neox_jax loads --checkpoint)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (HF tokenizers)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="file: a JSON list of strings, or one prompt per non-empty line")
    p.add_argument("--dtype", choices=list(TOLERANCES), help="default: float16 with CUDA, float32 without")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--per-layer", action="store_true", help="also compare the hidden state after each layer")
    p.add_argument("--mesh", help="split neox_jax over devices: model=N[,data=M] (as generate --mesh)")
    p.add_argument("--tp-exact", action="store_true",
                   help="compare the exact tensor-parallel mode against GPT-NeoX's tensor-parallel computation "
                        "(one torch.distributed process per rank), and report how far the merged model is from it")
    p.add_argument("--quantize", choices=list(QUANTIZED_TOLERANCES),
                   help="quantize neox_jax's matmul weights (the reference stays unquantized); its own criteria")
    config = p.add_mutually_exclusive_group()
    config.add_argument("--config", help="config for a DeepSpeed checkpoint: NeoX YAML or HF config.json")
    config.add_argument("--preset", choices=list(PRESETS), help="a built-in config instead")
    args = p.parse_args(argv)
    if args.quantize and args.tp_exact:
        raise BadInput(f"--quantize {args.quantize} and --tp-exact do not combine: the exact mode computes as the "
                       f"checkpoint's ranks did, and quantizing changes that; use one")
    if args.max_new_tokens < 0:
        raise BadInput(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    return args


# ---- inputs ----

def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = args.prompt
    elif args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise BadInput(f"{path}: no such prompts file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}...)") from None
        if path.suffix == ".json":
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: not valid JSON ({e})") from None
            if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
                raise BadInput(f"{path}: expected a JSON list of strings")
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = DEFAULT_PROMPTS
    if not prompts:
        raise BadInput("no prompts given")
    for i, s in enumerate(prompts):
        if not s.strip():
            raise BadInput(f"prompt {i} is empty")
    return prompts


def reference_config(args, checkpoint: Path) -> NeoXConfig:
    """--preset, --config, the checkpoint's own config.json or configs/*.yml, or --model's config.json."""
    try:
        if args.preset:
            return PRESETS[args.preset]
        if args.config:
            path = Path(args.config)
            if not path.is_file():
                raise BadInput(f"{path}: no such config file")
            return NeoXConfig.from_hf_json(path) if path.suffix == ".json" else deepspeed_config(checkpoint, [path])
        if (checkpoint / "config.json").is_file():
            return NeoXConfig.from_hf_json(checkpoint / "config.json")
        try:
            return deepspeed_config(checkpoint)
        except LoadError:
            if args.model and (Path(args.model) / "config.json").is_file():
                return NeoXConfig.from_hf_json(Path(args.model) / "config.json")
            raise
    except (ConfigError, LoadError) as e:
        raise BadInput(str(e)) from None


def stored_dtype(model_dir: Path) -> str | None:
    """The dtype a converted directory stores its weights in (config.json's torch_dtype), where known."""
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("torch_dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if name in DTYPES else None


def encode(tokenizer_path: Path, prompts: list[str], config: NeoXConfig) -> tuple[list[list[int]], int | None]:
    """-> the prompts' token ids, and the id of <|endoftext|>, where both sides' greedy continuations stop
    (None: the tokenizer has none, so they never stop)."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise BadInput(f"{tokenizer_path}: not a tokenizers JSON file ({e})") from None
    out = []
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text).ids
        if not ids:
            raise BadInput(f"prompt {i} encodes to no tokens")
        if max(ids) >= config.vocab_size:
            raise BadInput(f"prompt {i} has token id {max(ids)}, outside the model's vocabulary of "
                           f"{config.vocab_size}: wrong tokenizer?")
        if len(ids) > config.max_position_embeddings:
            raise BadInput(f"prompt {i} has {len(ids)} tokens, more than the model's context of "
                           f"{config.max_position_embeddings}")
        out.append(ids)
    return out, tokenizer.token_to_id(END_OF_TEXT)


# ---- the two sides ----

@dataclasses.dataclass
class SideOutput:
    logits: list[np.ndarray]  # per prompt [T, V] fp32
    hidden: list[np.ndarray] | None  # per prompt [L + 1, T, D] (reference: its own dtype)
    continuations: list[list[int]]
    margins: list[list[float]] | None  # reference only: top-1 minus top-2 logit per greedy step


def run_reference(checkpoint: Path, config: NeoXConfig, dtype: str, prompts, new_tokens, stop_token: int | None,
                  per_layer: bool, stored_as: str | None = None) -> SideOutput:
    """`stored_as`: the dtype a converted directory under test holds its merged weights in (`load._merge`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    try:
        model = load(checkpoint, config, DTYPES[dtype].torch, device, stored_as and DTYPES[stored_as].torch)
    except LoadError as e:
        raise BadInput(str(e)) from None
    log(f"reference loaded on {device} in {time.perf_counter() - start:.1f}s")
    out = SideOutput([], [] if per_layer else None, [], [])
    for ids, n in zip(prompts, new_tokens):
        if per_layer:
            logits, hidden = model(torch.tensor([ids], device=device), return_hidden=True)
            out.hidden.append(hidden[:, 0].cpu().numpy())
        else:
            logits = model(torch.tensor([ids], device=device))
        out.logits.append(logits[0].float().cpu().numpy())
        tokens, margins = model.generate(ids, n, stop_token=stop_token, return_margins=True) if n else ([], [])
        out.continuations.append(tokens)
        out.margins.append(margins)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # neox_jax runs next, on the same accelerator
    return out


def run_tensor_parallel_reference(checkpoint: Path, config: NeoXConfig, dtype: str, prompts, new_tokens,
                                  stop_token: int | None, per_layer: bool) -> SideOutput:
    from . import tensor_parallel

    start = time.perf_counter()
    try:
        out = tensor_parallel.run(checkpoint, config, DTYPES[dtype].torch, prompts, new_tokens, stop_token, per_layer)
    except LoadError as e:
        raise BadInput(str(e)) from None
    log(f"tensor-parallel reference ran in {time.perf_counter() - start:.1f}s")
    hidden = None if out["hidden"] is None else [h.float().numpy() for h in out["hidden"]]
    return SideOutput([x.numpy() for x in out["logits"]], hidden, out["continuations"], out["margins"])


def run_jax(path: Path, dtype: str, prompts, new_tokens, stop_token: int | None, per_layer: bool, ds_config=None,
            mesh: str | None = None, tp_exact: bool = False, logits_only: bool = False, quantize: str | None = None):
    """`ds_config`: a NeoXConfig or NeoX YAML path given on the command line, for neox_jax to read DeepSpeed
    shards with (it finds configs/*.yml by itself otherwise); a converted directory brings its own.
    `mesh`: model=N[,data=M], as `generate --mesh`. `tp_exact`: the exact tensor-parallel mode.
    `logits_only`: no greedy continuations (none are compared). `quantize`: as `neox_jax.load`."""
    from neox_jax.sharding import make_mesh, parse_mesh

    start = time.perf_counter()
    try:
        config = None if (path / "config.json").is_file() else ds_config
        model = neox_jax.load(path, dtype=dtype, config=config, mesh=make_mesh(**parse_mesh(mesh)) if mesh else None,
                              tp_exact=tp_exact, quantize=quantize)
    except (CheckpointError, ValueError, OSError) as e:  # covers neox_jax's ConfigError and ShardingError
        raise BadInput(f"neox_jax cannot load {path}: {e}") from None
    log(f"neox_jax{' (exact tensor-parallel mode)' if tp_exact else ''} loaded in {time.perf_counter() - start:.1f}s")
    out = SideOutput([], [] if per_layer else None, [], None)
    for ids, n in zip(prompts, new_tokens):
        out.logits.append(np.asarray(model.logits([ids])[0], np.float32))
        if per_layer:
            out.hidden.append(np.asarray(model.hidden_states([ids])[:, 0], np.float32))
        out.continuations.append(list(model.generate([ids], n, stop_token=stop_token)[0]) if n and not logits_only
                                 else [])
    return model.config, out


def merged_vs_exact(ref: SideOutput, merged: SideOutput, tol: Tolerances) -> dict:
    """How far the merged model is from the exact tensor-parallel reference: per prompt and overall."""
    metrics = [compare_logits(r, g, tol) for r, g in zip(ref.logits, merged.logits)]
    keys = ("rel_l2", "mean_kl", "max_kl", "top1")
    positions = sum(m.positions for m in metrics)
    return {"prompts": [{k: getattr(m, k) for k in keys} for m in metrics],
            "overall": {"rel_l2": math.sqrt(sum(m.sq_diff for m in metrics) / sum(m.sq_ref for m in metrics)),
                        "mean_kl": sum(m.mean_kl * m.positions for m in metrics) / positions,
                        "max_kl": max(m.max_kl for m in metrics),
                        "top1": sum(m.top1 * m.positions for m in metrics) / positions}}


# ---- comparison ----

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class LogitMetrics:
    """One prompt's logits, neox_jax against the reference ([T, V] each)."""

    positions: int
    logit_scale: float  # RMS of the reference logits
    max_abs: float
    max_abs_rel: float  # max_abs / logit_scale
    rel_l2: float
    mean_kl: float
    max_kl: float
    top1: float
    tie_margin: float  # a greedy step whose reference top-2 margin is below this is a near-tie
    pair_rms: float  # RMS over positions of Δ(reference top-1) - Δ(reference top-2): how far the gap moved
    decisive_margin: float  # max(tie x scale, TIE_SIGMAS x pair_rms): top-1 is judged above this margin
    decisive_positions: int  # positions whose reference top-2 margin is above the decisive margin
    decisive_agree: int
    sq_diff: float  # the sums behind rel_l2, for the relative L2 over all prompts
    sq_ref: float

    def report(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("sq_diff", "sq_ref")}

    def failures(self, tol: Tolerances) -> list[str]:
        """What is out of tolerance (NaN is out of every tolerance)."""
        out = []
        if not self.rel_l2 <= tol.rel_l2:
            out.append(f"relative L2 of logits {self.rel_l2:.2e} > {tol.rel_l2:g}")
        if tol.max_abs_rel is not None and not self.max_abs_rel <= tol.max_abs_rel:
            out.append(f"max |Δlogit| {self.max_abs:.2e} is {self.max_abs_rel:.2e} of the logit scale "
                       f"> {tol.max_abs_rel:g}")
        if not self.mean_kl <= tol.mean_kl:
            out.append(f"mean KL {self.mean_kl:.2e} > {tol.mean_kl:g}")
        if not self.max_kl <= tol.max_kl:
            out.append(f"max KL {self.max_kl:.2e} > {tol.max_kl:g}")
        return out


TIE_SIGMAS = 3.0  # a correct implementation flips a gap this many RMS of its measured change wide ~0.3% of the time


def compare_logits(ref: np.ndarray, got: np.ndarray, tol: Tolerances, chunk: int = 256) -> LogitMetrics:
    """[T, V] each. Works in float64, `chunk` positions at a time (a 2048 x 50k float64 block is 800 MB)."""
    sq_diff = sq_ref = 0.0
    max_abs = 0.0
    kl, agree, margins, pairs = [], [], [], []
    for s in range(0, ref.shape[0], chunk):
        r, g = ref[s:s + chunk].astype(np.float64), got[s:s + chunk].astype(np.float64)
        d = g - r
        sq_diff += float((d * d).sum())
        sq_ref += float((r * r).sum())
        max_abs = max(max_abs, float(np.abs(d).max()))
        lr, lg = _log_softmax(r), _log_softmax(g)
        kl.append((np.exp(lr) * (lr - lg)).sum(-1))
        agree.append(r.argmax(-1) == g.argmax(-1))
        top2 = np.argpartition(r, -2, axis=-1)[:, -2:]  # the reference's two best, in either order
        rows = np.arange(len(r))[:, None]
        first = np.take_along_axis(r, top2, -1).argmax(-1)[:, None]
        best, second = np.take_along_axis(top2, first, -1), np.take_along_axis(top2, 1 - first, -1)
        margins.append((r[rows, best] - r[rows, second])[:, 0])
        pairs.append((d[rows, best] - d[rows, second])[:, 0])
    kl, agree, margins, pairs = (np.concatenate(x) for x in (kl, agree, margins, pairs))
    scale = math.sqrt(sq_ref / ref.size)
    pair_rms = float(np.sqrt(np.mean(pairs ** 2)))
    # Top-1 is judged where neither the expected perturbation (tie x scale) nor the measured one (the gap
    # between the two best moves by pair_rms; a flip past TIE_SIGMAS of that is not noise) excuses a flip.
    decisive_margin = max(tol.tie * scale, TIE_SIGMAS * pair_rms)
    decisive = margins > decisive_margin
    return LogitMetrics(
        positions=int(ref.shape[0]), logit_scale=scale, max_abs=max_abs,
        max_abs_rel=max_abs / scale if scale else math.inf,
        rel_l2=math.sqrt(sq_diff / sq_ref) if sq_ref else math.inf,
        mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1=float(agree.mean()),
        tie_margin=max(tol.tie * scale, 2 * max_abs),  # for greedy steps, whose neox_jax logits are not seen
        pair_rms=pair_rms, decisive_margin=decisive_margin, decisive_positions=int(decisive.sum()), decisive_agree=int((agree & decisive).sum()),
        sq_diff=sq_diff, sq_ref=sq_ref)


def compare_greedy(ref: list[int], got: list[int], margins: list[float], tie: float) -> dict:
    n = min(len(ref), len(got))
    first = next((i for i in range(n) if ref[i] != got[i]), None)
    if first is None and len(ref) != len(got):
        first = n  # one side produced the stop token here
    result = {"reference": ref, "jax": got, "first_difference": first}
    if first is not None:
        result["margin"] = margins[first]
        result["near_tie"] = margins[first] <= tie
    return result


def compare_hidden(ref: list[np.ndarray], got: list[np.ndarray]) -> list[float]:
    """Relative L2 per hidden state (embedding, then each layer), worst over prompts."""
    worst = np.zeros(ref[0].shape[0])
    for r, g in zip(ref, got):
        for i in range(r.shape[0]):
            ri = r[i].astype(np.float64)
            worst[i] = max(worst[i], float(np.linalg.norm(g[i] - ri) / max(np.linalg.norm(ri), 1e-30)))
    return worst.tolist()


def hidden_name(i: int) -> str:
    return "embedding" if i == 0 else f"layer {i - 1}"


@dataclasses.dataclass(frozen=True)
class PromptResult:
    shapes: tuple[tuple, tuple]  # logits shape (reference, neox_jax)
    not_finite: tuple[str, ...]  # the sides whose logits hold a NaN or an infinity
    logits: LogitMetrics | None  # None when the shapes differ
    greedy: dict | None


def prompt_failures(p: PromptResult, tol: Tolerances) -> list[str]:
    """What fails in one prompt's logits (not its greedy continuation)."""
    if p.logits is None:
        return [f"logits shape {p.shapes[1]} (neox_jax) vs {p.shapes[0]} (reference)"]
    return [f"{side} logits are not finite" for side in p.not_finite] + p.logits.failures(tol)


def failures(prompts: list[PromptResult], overall: dict, hidden_rel_l2: list[float] | None,
             tol: Tolerances) -> list[str]:
    """Every check that fails, as one line each: the verdict is "pass" exactly when this is empty."""
    out = []
    for i, p in enumerate(prompts):
        out += [f"prompt {i}: {f}" for f in prompt_failures(p, tol)]
        g = p.greedy
        if g is not None and g["first_difference"] is not None and not g["near_tie"]:
            out.append(f"prompt {i}: greedy continuation differs at new token {g['first_difference']} "
                       f"(reference top-2 margin {g['margin']:.3g} > near-tie {p.logits.tie_margin:.3g}): "
                       f"KV-cache decoding diverges")
    if not overall["top1_off_ties"] >= tol.top1:
        decisive = sum(p.logits.decisive_positions for p in prompts if p.logits)
        agree = sum(p.logits.decisive_agree for p in prompts if p.logits)
        out.append(f"top-1 agreement off near-ties {overall['top1_off_ties']:.4f} < {tol.top1} "
                   f"({decisive - agree} of {decisive} positions disagree)")
    first = first_divergence(hidden_rel_l2, tol)
    if first is not None:
        out.append(f"hidden states diverge first after {hidden_name(first)} "
                   f"(relative L2 {hidden_rel_l2[first]:.2e} > {tol.hidden_rel_l2:g})")
    return out


def first_divergence(hidden_rel_l2: list[float] | None, tol: Tolerances) -> int | None:
    return next((i for i, x in enumerate(hidden_rel_l2 or []) if not x <= tol.hidden_rel_l2), None)


def overall_metrics(prompts: list[PromptResult]) -> dict:
    valid = [p.logits for p in prompts if p.logits]
    positions = sum(m.positions for m in valid)
    sq_diff, sq_ref = sum(m.sq_diff for m in valid), sum(m.sq_ref for m in valid)
    decisive = sum(m.decisive_positions for m in valid)
    return {
        "positions": positions,
        "max_abs": max((m.max_abs for m in valid), default=math.nan),
        "rel_l2": math.sqrt(sq_diff / sq_ref) if sq_ref else math.nan,
        "mean_kl": (sum(m.mean_kl * m.positions for m in valid) / positions) if positions else math.nan,
        "max_kl": max((m.max_kl for m in valid), default=math.nan),
        "top1": (sum(m.top1 * m.positions for m in valid) / positions) if positions else math.nan,
        "top1_off_ties": sum(m.decisive_agree for m in valid) / decisive if decisive else 1.0,
        "greedy_identical": sum(p.greedy["first_difference"] is None for p in prompts if p.logits),
    }


def evaluate(ref: SideOutput, jax_out: SideOutput, tol: Tolerances) -> dict:
    prompts = []
    for i, (r, g) in enumerate(zip(ref.logits, jax_out.logits)):
        not_finite = tuple(side for side, x in (("reference", r), ("neox_jax", g)) if not np.isfinite(x).all())
        if r.shape != g.shape:
            prompts.append(PromptResult((r.shape, g.shape), not_finite, None, None))
            continue
        m = compare_logits(r, g, tol)
        greedy = compare_greedy(ref.continuations[i], jax_out.continuations[i], ref.margins[i], m.tie_margin)
        prompts.append(PromptResult((r.shape, g.shape), not_finite, m, greedy))
    overall = overall_metrics(prompts)
    hidden = compare_hidden(ref.hidden, jax_out.hidden) if ref.hidden is not None else None
    report = {"prompts": [None if p.logits is None else {**p.logits.report(), "greedy": p.greedy,
                                                          "logits_ok": not prompt_failures(p, tol)}
                          for p in prompts],
              "overall": overall, "failures": failures(prompts, overall, hidden, tol)}
    if hidden is not None:
        first = first_divergence(hidden, tol)
        report["per_layer"] = {"names": [hidden_name(i) for i in range(len(hidden))], "rel_l2": hidden,
                               "first_divergence": None if first is None else hidden_name(first)}
    return report


# ---- output ----

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_greedy(g: dict, requested: int, logits_ok: bool) -> str:
    if g["first_difference"] is None:
        return f"identical ({len(g['reference'])} tokens)" if requested else "-"
    # With the logits already out of tolerance, the measured noise says nothing about ties.
    tie = "near-tie, " if g["near_tie"] and logits_ok else ""
    return f"differ at {g['first_difference']} ({tie}margin {g['margin']:.3g})"


def format_table(report: dict, prompts: list[str], tokens: list[list[int]], new_tokens: list[int]) -> str:
    head = f"{'prompt':<28} {'tokens':>6} {'max|Δ|':>9} {'rel L2':>9} {'mean KL':>9} {'max KL':>9} {'top-1':>7}  greedy"
    lines = [head, "-" * len(head)]
    for i, m in enumerate(report["prompts"]):
        label = f"{i}: " + prompts[i].replace("\n", "⏎")
        label = label if len(label) <= 28 else label[:27] + "…"
        if m is None:
            lines.append(f"{label:<28} {len(tokens[i]):>6}  (shapes differ)")
            continue
        lines.append(f"{label:<28} {len(tokens[i]):>6} {m['max_abs']:>9.2e} {m['rel_l2']:>9.2e} "
                     f"{m['mean_kl']:>9.2e} {m['max_kl']:>9.2e} {m['top1']:>7.2%}  "
                     f"{format_greedy(m['greedy'], new_tokens[i], m['logits_ok'])}")
    o = report["overall"]
    lines.append("-" * len(head))
    lines.append(f"{'all':<28} {o['positions']:>6} {o['max_abs']:>9.2e} {o['rel_l2']:>9.2e} {o['mean_kl']:>9.2e} "
                 f"{o['max_kl']:>9.2e} {o['top1']:>7.2%}  {o['greedy_identical']}/{len(report['prompts'])} identical")
    lines.append(f"top-1 agreement off near-ties: {o['top1_off_ties']:.2%}")
    if "per_layer" in report:
        pl = report["per_layer"]
        lines += ["", "hidden state after    rel L2 (worst prompt)"]
        for name, x in zip(pl["names"], pl["rel_l2"]):
            mark = "  <- first divergence" if name == pl["first_divergence"] else ""
            lines.append(f"  {name:<18} {x:.2e}{mark}")
    t = report["tolerances"]
    if "merged_vs_exact" in report:
        m = report["merged_vs_exact"]
        lines += ["", "the merged model against the exact tensor-parallel reference (information, not a criterion)",
                  f"{'prompt':<28} {'rel L2':>9} {'mean KL':>9} {'max KL':>9} {'top-1':>7}"]
        for i, x in enumerate([*m["prompts"], m["overall"]]):
            label = "all" if i == len(m["prompts"]) else f"{i}: " + prompts[i].replace("\n", "⏎")
            label = label if len(label) <= 28 else label[:27] + "…"
            lines.append(f"{label:<28} {x['rel_l2']:>9.2e} {x['mean_kl']:>9.2e} {x['max_kl']:>9.2e} {x['top1']:>7.2%}")
    criteria = report["dtype"] + (f", neox_jax quantized {report['quantize']}" if report.get("quantize") else "")
    lines += ["", f"tolerances ({criteria}): rel L2 <= {t['rel_l2']:g}"
              + (f", max|Δ|/scale <= {t['max_abs_rel']:g}" if t["max_abs_rel"] is not None else "")
              + f", mean KL <= {t['mean_kl']:g}, max KL <= {t['max_kl']:g}, top-1 off near-ties >= {t['top1']}"
              + f", near-tie margin {t['tie']:g} x scale (or {TIE_SIGMAS:g} x the RMS move of the top-2 gap)"]
    if report["failures"]:
        lines.append("MISMATCH:")
        lines += [f"  - {f}" for f in report["failures"]]
    else:
        lines.append("PASS")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


# ---- main ----

def check(args) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise BadInput(f"{checkpoint}: no such checkpoint directory")
    if args.model and not Path(args.model).is_dir():
        raise BadInput(f"{args.model}: no such model directory")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise BadInput(f"{args.json}: its folder does not exist")
    if args.json and Path(args.json).is_dir():
        raise BadInput(f"--json {args.json}: a directory, not a file to write the report to")
    tokenizer = Path(args.tokenizer)
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if not tokenizer.is_file():
        raise BadInput(f"{tokenizer}: no such tokenizer file")
    if args.tp_exact and args.model:
        raise BadInput("--tp-exact runs neox_jax on --checkpoint's shards in its exact tensor-parallel mode; --model "
                       "(a converted directory) holds only the merged weights: leave it out")
    if args.tp_exact and (checkpoint / "config.json").is_file():
        raise BadInput(f"{checkpoint}: --tp-exact needs GPT-NeoX DeepSpeed shards; a Hugging Face directory holds "
                       f"one merged copy of each LayerNorm and row-parallel bias, not each rank's")
    texts = read_prompts(args)

    config = reference_config(args, checkpoint)
    tokens, stop_token = encode(tokenizer, texts, config)
    new_tokens = [min(args.max_new_tokens, config.max_position_embeddings - len(t)) for t in tokens]

    dtype = args.dtype or default_dtype("cuda" if torch.cuda.is_available() else "cpu")
    tol = QUANTIZED_TOLERANCES[args.quantize] if args.quantize else TOLERANCES[dtype]
    if args.tp_exact:
        ref = run_tensor_parallel_reference(checkpoint, config, dtype, tokens, new_tokens, stop_token, args.per_layer)
    else:
        ref = run_reference(checkpoint, config, dtype, tokens, new_tokens, stop_token, args.per_layer,
                            stored_dtype(Path(args.model)) if args.model else None)
    jax_path = Path(args.model) if args.model else checkpoint
    given = None  # what neox_jax reads DeepSpeed shards with, when it reads them itself
    if args.config:
        given = config if Path(args.config).suffix == ".json" else Path(args.config)
    elif args.preset:
        given = config
    jax_config, got = run_jax(jax_path, dtype, tokens, new_tokens, stop_token, args.per_layer, given, args.mesh,
                              args.tp_exact, quantize=args.quantize)
    merged = None
    if args.tp_exact:
        merged = run_jax(jax_path, dtype, tokens, new_tokens, stop_token, False, given, args.mesh, logits_only=True)[1]

    differing = [f"{f.name} {getattr(jax_config, f.name)!r} (neox_jax) vs {getattr(config, f.name)!r} (reference)"
                 for f in dataclasses.fields(config) if getattr(jax_config, f.name) != getattr(config, f.name)]
    report = evaluate(ref, got, tol) if not differing else {"prompts": [], "overall": {}, "failures": []}
    if merged is not None and not differing:
        report["merged_vs_exact"] = merged_vs_exact(ref, merged, tol)
    report["failures"] = [f"config differs: {d}" for d in differing] + report["failures"]
    report.update({"dtype": dtype, "quantize": args.quantize, "tolerances": dataclasses.asdict(tol),
                   "checkpoint": str(checkpoint), "model": str(jax_path), "tp_exact": args.tp_exact,
                   "prompts_text": texts, "prompt_tokens": [len(t) for t in tokens],
                   "verdict": "mismatch" if report["failures"] else "pass"})
    if differing:
        print("MISMATCH:\n" + "\n".join(f"  - {f}" for f in report["failures"]))
    else:
        print(format_table(report, texts, tokens, new_tokens))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        except OSError as e:
            raise BadInput(f"--json {args.json}: cannot write the report ({e.strerror or e})") from None
    return 1 if report["failures"] else 0


def main(argv=None) -> int:
    try:
        return check(parse_args(argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: Ctrl-C now would only interrupt the interpreter's exit
    sys.exit(status)

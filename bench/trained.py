"""The shipped trained models on held-out text: docs/figures/trained.md and docs/figures/training-curve.png.

    python -m neox_jax.corpus corpus/            # after apt-get install python3.11-doc
    python -m bench.trained --corpus corpus/     # rewrites the page and the plot

For each model in `neox_jax/models/`: its held-out perplexity, loaded as shipped (fp16 weights, computed in
fp32), next to a unigram model of the same text (token frequencies of the training split, add-one smoothed
over the tokenizer's vocabulary, scored on exactly the tokens the models predict); and, quantized with
`--quantize int8` and `fp8`, its top-1 agreement with the unquantized model and the mean KL divergence
KL(unquantized || quantized) per token. The plot: each model's training loss (a 20-step mean) and
held-out loss against tokens trained on, from the `training_log.jsonl` shipped beside the weights.
Then the target on held-out text through lm-eval (`tests/data/pydocs_*.yaml`: perplexity and LAMBADA-style
last-word accuracy), neox-jax against lm-eval's own `hf` model (`bench.eval`), and the serving engine's
prefix-cache hits on a shared held-out prompt (`prefix_cache_hits`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from pathlib import Path

import jax
import numpy as np

import neox_jax
from neox_jax.decode import PREFILL_CHUNK
from neox_jax.demo import DRAFT, TARGET, trained_tokenizer
from neox_jax.train import eval_rows, read_corpus, token_stream, windows

from .common import markdown_page, utc_now, write_page
from .eval import render, run_bench

DOCS = Path(__file__).resolve().parents[1] / "docs" / "figures"
EVAL_TASKS = ("pydocs_lambada", "pydocs_perplexity")
PYDOCS_HELD_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "pydocs_heldout.jsonl"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def unigram_nll(train: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Mean -log p(token) of `targets` under add-one smoothed training-split frequencies."""
    counts = np.bincount(train, minlength=vocab)[:vocab].astype(np.float64) + 1.0
    return float(-np.log(counts[targets] / counts.sum()).mean())


def scores(models: dict, held_out: np.ndarray, batch: int) -> dict:
    """For each of `models` (name -> model, the first the reference): the mean held-out negative log-likelihood,
    and for the others their top-1 agreement with the reference and mean KL(reference || model), a batch of
    windows at a time (the log-probabilities of all of them would not fit in memory)."""
    names = list(models)
    nll = dict.fromkeys(names, 0.0)
    same = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    for start in range(0, len(held_out), batch):
        chunk = held_out[start:start + batch]
        reference = None
        for name in names:
            logp = log_softmax(models[name].logits(chunk[:, :-1]).astype(np.float64))
            nll[name] += float(-np.take_along_axis(logp, chunk[:, 1:, None], -1).sum())
            if reference is None:
                reference = logp
            else:
                same[name] += float((logp.argmax(-1) == reference.argmax(-1)).sum())
                kl[name] += float((np.exp(reference) * (reference - logp)).sum())
    count = held_out[:, 1:].size
    return {name: {"nll": nll[name] / count, "top1": same[name] / count, "kl": kl[name] / count} for name in names}


class _Collect:
    """An engine Sink that keeps a request's tokens and says when it has finished."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()

    def prompt_logprobs(self, scores) -> None:
        pass

    def token(self, token: int, logprobs) -> bool:
        self.tokens.append(token)
        return True

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done.set()


def prefix_cache_hits(tokenizer_file: Path, requests: int = 6, shared_tokens: int = 2 * PREFILL_CHUNK,
                      new_tokens: int = 16) -> dict:
    """Requests sharing a prompt of held-out text (`shared_tokens` tokens of tests/data/pydocs_heldout.jsonl),
    each followed by a passage of its own, one after the other through the serving engine with and without its
    prefix cache: the hits and misses the engine counts, the median time to first token of the cached requests
    (all but the first) against the same requests without the cache, and whether every request's greedy
    tokens are the same both ways.

    The engine caches whole prefill chunks of PREFILL_CHUNK (256) tokens, never the one holding a prompt's last
    token, so a prompt must be longer than 256 tokens to hit, and the trained models' context is 256: the
    target runs here at a context of 1024 (its config's max_position_embeddings raised in a copy; rotary
    positions have no table, so the weights are the same, and positions past 256 were never trained on)."""
    import tempfile

    from neox_jax.serve.engine import Engine, Request

    passages = [json.loads(line)["text"] for line in PYDOCS_HELD_OUT.read_text(encoding="utf-8").splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        longer = Path(tmp)
        for f in TARGET.iterdir():
            if f.name != "config.json":
                (longer / f.name).symlink_to(f)
        config = json.loads((TARGET / "config.json").read_text())
        (longer / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
        model = neox_jax.load(longer, "float32", progress=False, tokenizer=tokenizer_file)
    encode = model.tokenizer.encode
    shared = encode("\n".join(passages))[:shared_tokens]
    prompts = [shared + encode("\n" + passages[-1 - i]) for i in range(requests)]
    runs = {}
    for name, budget in (("uncached", 0), ("cached", 2 ** 30)):
        ttft = []
        engine = Engine(model, max_batch=4, context=1024, prefix_cache_bytes=budget,
                        on_first_token=ttft.append)
        engine.start()
        sinks = []
        for prompt in prompts:  # one at a time: each finds the blocks of the ones before
            sinks.append(_Collect())
            engine.submit([Request(prompt, new_tokens, sinks[-1])])
            sinks[-1].done.wait()
        engine.stop()
        runs[name] = dict(ttft=ttft, tokens=[s.tokens for s in sinks], cache=engine.prefix_cache)
    cache = runs["cached"]["cache"]
    cached_ttft = float(np.median(runs["cached"]["ttft"][1:]))
    cold_ttft = float(np.median(runs["uncached"]["ttft"][1:]))
    return dict(requests=requests, shared_tokens=len(shared), prompt_tokens=[len(p) for p in prompts],
                hits=cache.hits, misses=cache.misses, cached_ttft=cached_ttft, cold_ttft=cold_ttft,
                same_tokens=runs["cached"]["tokens"] == runs["uncached"]["tokens"])


def prefix_cache_section(figures: dict) -> list[str]:
    f = figures
    return [f"{f['requests']} requests, one after the other, each a shared prompt of {f['shared_tokens']} held-out "
            f"tokens followed by a held-out passage of its own ({min(f['prompt_tokens'])}-{max(f['prompt_tokens'])} "
            f"prompt tokens in all), 16 greedy tokens each, through `neox_jax.serve.engine.Engine` (max batch 4) "
            f"with a 1 GiB prefix cache and without one; the target at a context of 1024 "
            f"(`bench.trained.prefix_cache_hits` says why):", "",
            "| prefix-cache hits (blocks) | misses | TTFT cached, median ms | TTFT without the cache, median ms | "
            "ratio | same tokens |", "|---|---|---|---|---|---|",
            f"| {f['hits']} | {f['misses']} | {1e3 * f['cached_ttft']:.1f} | {1e3 * f['cold_ttft']:.1f} | "
            f"{f['cached_ttft'] / f['cold_ttft']:.2f} | {f['same_tokens']} |"]


def plot(models: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, path), color in zip(models.items(), ("tab:blue", "tab:orange")):
        records = [json.loads(line) for line in (path / "training_log.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        tokens = {r["step"]: r["tokens"] for r in steps}
        loss = np.convolve([r["loss"] for r in steps], np.ones(20) / 20, mode="valid")
        ax.plot([r["tokens"] / 1e6 for r in steps[19:]], loss, color=color, alpha=0.6, label=f"{name} training")
        ax.plot([tokens[r["step"]] / 1e6 for r in evals], [r["eval_loss"] for r in evals], "o-", color=color,
                label=f"{name} held-out")
    ax.set_xlabel("tokens trained on (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("GPT-NeoX trained on the Python documentation (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trained", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="python -m neox_jax.corpus's output directory")
    p.add_argument("--windows", type=int, default=0,
                   help="held-out windows scored, spread evenly over the split (default 0: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", type=Path, default=DOCS / "trained.md")
    p.add_argument("--plot", type=Path, default=DOCS / "training-curve.png")
    args = p.parse_args(argv)
    started = utc_now()

    models = {"pydocs-target": TARGET, "pydocs-draft": DRAFT}
    tokenizer_file = trained_tokenizer()
    if tokenizer_file is None:
        p.error("the GPT-NeoX-20B tokenizer is not found: set NEOX_TOKENIZER=FILE")
    first = neox_jax.load(TARGET, "float32", progress=False, tokenizer=tokenizer_file)
    tokenizer, context = first.tokenizer, first.config.max_position_embeddings
    train = token_stream(read_corpus(args.corpus, "train"), tokenizer)
    held_out = windows(token_stream(read_corpus(args.corpus, "heldout"), tokenizer), context)
    if args.windows:  # spread over the held-out pages, as the training tool's evaluation is
        held_out = held_out[eval_rows(len(held_out), args.windows)]
    unigram = math.exp(unigram_nll(train, held_out[:, 1:].ravel(), tokenizer.vocab_size))
    predicted = held_out[:, 1:].size
    lines = [f"Corpus: `{args.corpus.name}`, {len(train):,} training tokens, {predicted:,} held-out tokens "
             f"scored ({len(held_out)} windows of {context}). Unigram perplexity (training-split "
             f"frequencies, add-one smoothed): **{unigram:.1f}**.", "",
             "| model | layers x hidden | parameters | fp16 bytes | held-out perplexity | / unigram |",
             "|---|---|---|---|---|---|"]
    quant_rows = ["| model | format | top-1 agreement with fp32 | mean KL (nats/token) | held-out perplexity |",
                  "|---|---|---|---|---|"]
    for name, path in models.items():
        model = first if path == TARGET else neox_jax.load(path, "float32", progress=False)
        variants = {"fp32": model, **{mode: neox_jax.load(path, "float32", progress=False, quantize=mode)
                                      for mode in ("int8", "fp8")}}
        figures = scores(variants, held_out, args.batch)
        c = model.config
        ppl = math.exp(figures["fp32"]["nll"])
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(model.params))
        lines.append(f"| {name} | {c.num_layers} x {c.hidden_size} | {count / 1e6:.2f} M | {size / 1e6:.1f} MB "
                     f"| **{ppl:.1f}** | {ppl / unigram:.3f} |")
        print(lines[-1], flush=True)
        for mode in ("int8", "fp8"):
            f = figures[mode]
            quant_rows.append(f"| {name} | {mode} | {f['top1']:.4f} | {f['kl']:.2e} | {math.exp(f['nll']):.1f} |")
            print(quant_rows[-1], flush=True)
    plot(models, args.plot)
    evaluated = run_bench(argparse.Namespace(model=str(TARGET), tokenizer=tokenizer_file, task=",".join(EVAL_TASKS),
                                             batch_size=16, limit=None))
    print(render(evaluated, markdown=False), flush=True)
    prefix = prefix_cache_hits(tokenizer_file)
    body = "\n".join([*lines, "", "Quantized (`load(..., quantize=MODE)`, computed in fp32) against the same model "
                      "unquantized, over every held-out position:", "", *quant_rows, "",
                      f"Training curves: [training-curve.png]({args.plot.name}).", "",
                      "## lm-eval on held-out text: neox-jax against lm-eval's `hf` model", "",
                      "pydocs-target, as shipped (fp16 weights, computed in fp32), on the tasks of "
                      f"`tests/data/pydocs_*.yaml` ({len(PYDOCS_HELD_OUT.read_text().splitlines())} held-out "
                      "paragraphs, `tools/pydocs_eval_data.py`; `bench.eval`'s figures, run from here):",
                      "", render(evaluated, markdown=True).replace("## ", "### "),
                      "## Prefix cache on a shared held-out prompt", "", *prefix_cache_section(prefix)])
    write_page(args.out, markdown_page("Trained models on held-out text", "bench.trained",
                                       sys.argv[1:] if argv is None else argv, body, started))
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loaders for the reference model, spelled out key by key, sharing no code with `neox_jax`'s loader.

Two sources:

* GPT-NeoX DeepSpeed pipeline-module shards, `layer_{idx:02d}-model_{rank:02d}-model_states.pt`: idx 0 the
  embedding, idx 2 .. L+1 the layers, idx L+3 the final norm, idx L+4 the head (absent when tied); idx 1 and
  L+2 are parameterless pipeline stages and have no file. Tensor-parallel shards are merged as Megatron split
  them (see `LAYER_MERGE`).
* A Hugging Face GPT-NeoX directory (`config.json` + `model.safetensors`, or shards + index).
"""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from neox_jax.config import ConfigError, NeoXConfig

from .model import GPTNeoX

SHARD = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")

# How each per-layer tensor was split across tensor-parallel ranks, and so how to merge it.
#   cat0 / cat1: column- / row-parallel weight, concatenated along that dim (QKV rows stay head-major: rank r
#                holds heads r*H/tp .. (r+1)*H/tp - 1, each [(q, k, v), head_dim]);
#   row_bias:    bias of a row-parallel linear: see `_merge`;
#   mean:        a LayerNorm replica (see `_merge`).
LAYER_MERGE = {
    "input_layernorm.weight": "mean",
    "input_layernorm.bias": "mean",
    "attention.query_key_value.weight": "cat0",
    "attention.query_key_value.bias": "cat0",
    "attention.dense.weight": "cat1",
    "attention.dense.bias": "row_bias",
    "post_attention_layernorm.weight": "mean",
    "post_attention_layernorm.bias": "mean",
    "mlp.dense_h_to_4h.weight": "cat0",
    "mlp.dense_h_to_4h.bias": "cat0",
    "mlp.dense_4h_to_h.weight": "cat1",
    "mlp.dense_4h_to_h.bias": "row_bias",
}
IGNORED_LAYER_KEYS = ("attention.rotary_emb.inv_freq",)  # a buffer, recomputed from the config
# Buffers that older transformers versions saved next to the weights.
HF_BUFFERS = re.compile(r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


class LoadError(Exception):
    """A checkpoint that cannot be loaded (the message names the file and, where it applies, the tensor)."""


# ---- DeepSpeed shards ----

def find_step_dir(path: str | Path) -> Path:
    """The folder holding the shards: `path` itself, or `path/<latest>` where `path/latest` names a step."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path}: no such directory")
    if any(SHARD.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        step = path / latest.read_text().strip()
        if step.is_dir() and any(SHARD.match(p.name) for p in step.iterdir()):
            return step
        raise LoadError(f"{latest} names {step.name!r}, which holds no layer_XX-model_YY-model_states.pt shards")
    raise LoadError(f"{path}: no layer_XX-model_YY-model_states.pt shards (and no 'latest' file)")


def num_ranks(step_dir: Path) -> int:
    ranks = {int(m.group(2)) for p in step_dir.iterdir() if (m := SHARD.match(p.name))}
    if ranks != set(range(len(ranks))):
        raise LoadError(f"{step_dir}: tensor-parallel ranks {sorted(ranks)} are not 0..{len(ranks) - 1}")
    return len(ranks)


def _load_stage(step_dir: Path, idx: int, ranks: int, required: bool = True) -> list[dict] | None:
    """The state dicts of pipeline stage `idx`, one per rank (None if the stage has no files and is optional)."""
    files = [step_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt" for r in range(ranks)]
    if not required and not any(f.exists() for f in files):
        return None
    states = []
    for f in files:
        if not f.exists():
            raise LoadError(f"{f}: missing shard")
        states.append(_load_shard(f))
    return states


def _load_shard(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for corrupt or non-tensor pickles
        code = _code_in_pickle(f)
        if code:
            raise LoadError(f"{f}: refused to load: it would run code when unpickled (it calls "
                            f"{', '.join(code)}); a shard holds only tensors") from None
        # torch's message also advises loading with weights_only=False, which would run whatever the file holds.
        reason = next((line.strip() for line in str(e).splitlines()
                       if line.strip() and "weights_only" not in line and "Weights only" not in line),
                      type(e).__name__)
        raise LoadError(f"{f}: unreadable shard ({reason})") from None


def _code_in_pickle(f: Path) -> list[str]:
    """What `f`'s pickle would call beyond torch's tensor types, read from its opcodes alone (pickletools
    decodes, it never imports or calls): torch reports any pickle protocol above 2 as an "unsupported
    operand", whatever it holds, so its refusal alone does not tell a pickle that would run code from a
    damaged one.

    torch's zip format keeps its pickle in `data.pkl`; the legacy one writes four pickles (magic number,
    protocol version, system info, then the object) before the raw tensor bytes; a plain pickle has one.
    """
    names: set[str] = set()

    def scan(stream):
        strings, memo = [], {}  # the values pushed, strings only (else None), for STACK_GLOBAL's two operands
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                module, name = ([None, None] + strings)[-2:]
                names.add(f"{module or '?'}.{name or '?'}")
            if op.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(arg))
            elif op.name not in ("PROTO", "FRAME", "STOP"):
                strings.append(arg if "STRING" in op.name or "UNICODE" in op.name else None)

    try:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as archive, archive.open(
                    next(n for n in archive.namelist() if n.endswith("data.pkl"))) as stream:
                scan(stream)
        else:
            with open(f, "rb") as stream:
                for _ in range(4):
                    scan(stream)
    except Exception:  # undecodable bytes (the raw tensor data, or damage) end the scan
        pass
    safe = torch._weights_only_unpickler._get_allowed_globals()
    return sorted(n for n in names if n not in safe)


def _get(states: list[dict], key: str, step_dir: Path, idx: int) -> list[torch.Tensor]:
    for r, sd in enumerate(states):
        if key not in sd:
            raise LoadError(f"{step_dir / f'layer_{idx:02d}-model_{r:02d}-model_states.pt'}: no tensor {key!r}")
    return [sd[key] for sd in states]


def _merge(rule: str, parts: list[torch.Tensor], parallel_residual: bool,
           stored_as: torch.dtype | None = None) -> torch.Tensor:
    """Merge in fp32; the copy into the model rounds once to its dtype, so an fp32 reference holds the exact
    merge (as neox_jax does reading the shards). `stored_as`: round to this dtype first, as a converted
    directory stores the merge (an fp16 directory holds fp16-rounded sums and means), so that comparing
    against one measures the implementations, not where the merge was rounded."""
    merged = _merge_fp32(rule, [p.float() for p in parts], parallel_residual)
    return merged if stored_as is None else merged.to(stored_as)


def _merge_fp32(rule: str, parts: list[torch.Tensor], parallel_residual: bool) -> torch.Tensor:
    if rule == "cat0":
        return torch.cat(parts, dim=0)
    if rule == "cat1":
        return torch.cat(parts, dim=1)
    if rule == "row_bias":
        # Under the parallel (GPT-J) residual each rank added its own copy of the bias to its partial output
        # before the all-reduce, so the model saw their sum. Otherwise the bias is added once, after the
        # all-reduce, and the copies are replicas: take rank 0's.
        return torch.stack(parts).sum(0) if parallel_residual else parts[0]
    if rule == "mean":
        # LayerNorm parameters are replicated across ranks but drift apart by rounding-level amounts in
        # training. Any copy is a valid model; the mean is the best estimate of the shared value, and it is
        # what neox_jax's converter takes. (The minimal 20B reference takes rank 0; doing so here would make
        # the fp32 check measure the copies' drift rather than the implementations.)
        return torch.stack(parts).mean(0)
    raise AssertionError(rule)


def read_neox_yaml(files: list[Path], vocab_size: int) -> NeoXConfig:
    """The few GPT-NeoX YAML keys this model needs (files are merged in order; keys may use '-' or '_').

    The vocabulary size is not in the YAML (GPT-NeoX pads it at run time), so it comes from the shards.
    Defaults are GPT-NeoX's own (NeoXArgs), e.g. untied embeddings only with `no-weight-tying: true`.
    """
    import yaml

    conf = {}
    for f in files:
        try:
            data = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise LoadError(f"{f}: unreadable YAML ({e})") from None
        if not isinstance(data, dict):
            raise LoadError(f"{f}: not a GPT-NeoX YAML config (expected a mapping)")
        conf.update({str(k).replace("_", "-"): v for k, v in data.items()})

    where = ", ".join(map(str, files))

    def get(key, kind, default=None):
        """conf[key] as `kind`, read strictly: a bool is never a number, nor a string a bool. YAML 1.1
        reads `1e-5` as a string, which GPT-NeoX converts, so numeric strings are floats."""
        if key not in conf:
            if default is None:
                raise LoadError(f"{where}: no {key!r}")
            return default
        value = conf[key]
        if kind is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            raise LoadError(f"{where}: {key} = {value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
        return kind(value)

    # GPT-NeoX's default position embedding is "learned": a YAML that does not say "rotary" is not this model.
    if conf.get("pos-emb", "learned") != "rotary":
        raise LoadError(f"{where}: pos-emb {conf.get('pos-emb', 'learned')!r} is not supported (only rotary)")
    if conf.get("activation", "gelu") != "gelu":
        raise LoadError(f"activation {conf['activation']!r} is not supported (only gelu)")
    hidden = get("hidden-size", int)
    # GPT-NeoX's fused bias-GELU (and its openai-gelu option) is the tanh approximation; plain F.gelu is exact.
    tanh = get("bias-gelu-fusion", bool, False) or get("openai-gelu", bool, False)
    try:
        return NeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=get("num-layers", int),
            num_heads=get("num-attention-heads", int),
            intermediate_size=get("intermediate-size", int, 4 * hidden),
            rotary_pct=get("rotary-pct", float, 1.0),
            rotary_base=get("rotary-emb-base", float, 10000.0),
            layer_norm_eps=get("layernorm-epsilon", float, 1e-5),
            activation="gelu_tanh" if tanh else "gelu",
            parallel_residual=get("gpt-j-residual", bool, False),
            max_position_embeddings=get("max-position-embeddings" if "max-position-embeddings" in conf
                                        else "seq-length", int),
            tie_word_embeddings=not get("no-weight-tying", bool, False),
        )
    except ConfigError as e:
        raise LoadError(f"{where}: {e}") from None


def deepspeed_config(path: str | Path, yaml_files: list[Path] | None = None) -> NeoXConfig:
    """Config of a DeepSpeed checkpoint from its YAML files (given, or `configs/*.yml` next to the shards or
    one folder up) and the vocabulary size of its embedding shards."""
    step_dir = find_step_dir(path)
    if not yaml_files:
        for folder in (Path(path), step_dir, step_dir.parent):
            yaml_files = sorted((folder / "configs").glob("*.yml")) + sorted((folder / "configs").glob("*.yaml"))
            if yaml_files:
                break
        else:
            raise LoadError(f"{path}: no configs/*.yml; give the config (--config or --preset)")
    embed = _load_stage(step_dir, 0, num_ranks(step_dir))
    vocab = sum(int(t.shape[0]) for t in _get(embed, "word_embeddings.weight", step_dir, 0))
    return read_neox_yaml(yaml_files, vocab)


def _copy(param: torch.Tensor, value: torch.Tensor, where: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise LoadError(f"{where}: shape {tuple(value.shape)}, the config expects {tuple(param.shape)}")
    param.copy_(value)


def load_deepspeed(path: str | Path, config: NeoXConfig, dtype: torch.dtype = torch.float32,
                   device="cpu", stored_as: torch.dtype | None = None) -> GPTNeoX:
    """Build the reference from DeepSpeed shards, one pipeline stage in host memory at a time (`stored_as`:
    see `_merge`)."""

    step_dir = find_step_dir(path)
    ranks = num_ranks(step_dir)
    L = config.num_layers
    model = GPTNeoX(config, dtype, device="meta").to_empty(device=device).requires_grad_(False)

    def where(idx, key):
        return f"{step_dir}/layer_{idx:02d}-model_*-model_states.pt [{key}]"

    with torch.no_grad():
        embed = _load_stage(step_dir, 0, ranks)
        _copy(model.embed_in.weight, _merge("cat0", _get(embed, "word_embeddings.weight", step_dir, 0), False,
                                                 stored_as),
              where(0, "word_embeddings.weight"))
        for i in range(L):
            idx = i + 2
            states = _load_stage(step_dir, idx, ranks)
            extra = set(states[0]) - set(LAYER_MERGE) - set(IGNORED_LAYER_KEYS)
            if extra:
                raise LoadError(f"{where(idx, sorted(extra)[0])}: unexpected tensor")
            layer = model.layers[i]
            params = dict(layer.named_parameters())
            for key, rule in LAYER_MERGE.items():
                merged = _merge(rule, _get(states, key, step_dir, idx), config.parallel_residual, stored_as)
                _copy(params[key], merged, where(idx, key))
        norm = _load_stage(step_dir, L + 3, ranks)
        for key in ("weight", "bias"):
            _copy(getattr(model.final_layer_norm, key), _merge("mean", _get(norm, f"norm.{key}", step_dir, L + 3),
                                                                False, stored_as), where(L + 3, f"norm.{key}"))
        head = _load_stage(step_dir, L + 4, ranks, required=not config.tie_word_embeddings)
        if config.tie_word_embeddings:
            if head is not None:
                raise LoadError(f"{where(L + 4, 'final_linear.weight')}: present, but the config ties the "
                                f"embeddings (no-weight-tying is false)")
        else:
            _copy(model.embed_out.weight, _merge("cat0", _get(head, "final_linear.weight", step_dir, L + 4), False,
                                                  stored_as),
                  where(L + 4, "final_linear.weight"))
        if (step_dir / f"layer_{L + 5:02d}-model_00-model_states.pt").exists():
            raise LoadError(f"{step_dir}: shards beyond layer_{L + 4:02d}: the checkpoint has more than {L} layers")
    return model


# ---- Hugging Face directories ----

def _hf_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a safetensors index ({e})") from None
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise LoadError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
            config: NeoXConfig | None = None) -> GPTNeoX:
    path = Path(path)
    if config is None:
        try:
            config = NeoXConfig.from_hf_json(path / "config.json")
        except ConfigError as e:
            raise LoadError(str(e)) from None
    files = _hf_files(path)
    names = {"embed_in.weight": "gpt_neox.embed_in.weight",
             "final_layer_norm.weight": "gpt_neox.final_layer_norm.weight",
             "final_layer_norm.bias": "gpt_neox.final_layer_norm.bias"}
    for i in range(config.num_layers):
        for key in LAYER_MERGE:
            names[f"layers.{i}.{key}"] = f"gpt_neox.layers.{i}.{key}"
    if not config.tie_word_embeddings:
        names["embed_out.weight"] = "embed_out.weight"

    unexpected = [k for k in files if k not in names.values() and not HF_BUFFERS.match(k)
                  and not (config.tie_word_embeddings and k == "embed_out.weight")]
    if unexpected:
        raise LoadError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} for a GPT-NeoX model "
                        f"with {config.num_layers} layers")

    model = GPTNeoX(config, dtype, device="meta").to_empty(device=device).requires_grad_(False)
    params = dict(model.named_parameters())
    handles = {}
    with torch.no_grad():
        for ours, theirs in names.items():
            if theirs not in files:
                raise LoadError(f"{path}: no tensor {theirs!r}")
            f = files[theirs]
            if f not in handles:
                if not f.is_file():
                    raise LoadError(f"{f}: missing safetensors file")
                handles[f] = safe_open(f, "pt")
            _copy(params[ours], handles[f].get_tensor(theirs).float(), f"{f} [{theirs}]")
    return model


def load(path: str | Path, config: NeoXConfig | None = None, dtype: torch.dtype = torch.float32,
         device="cpu", stored_as: torch.dtype | None = None) -> GPTNeoX:
    """A Hugging Face directory (has config.json and safetensors) or DeepSpeed shards (config needed, or
    found as configs/*.yml)."""
    path = Path(path)
    if (path / "config.json").is_file() and ((path / "model.safetensors").is_file()
                                              or (path / "model.safetensors.index.json").is_file()):
        return load_hf(path, dtype, device, config)
    return load_deepspeed(path, config or deepspeed_config(path), dtype, device, stored_as)

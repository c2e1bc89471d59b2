"""GPT-NeoX DeepSpeed checkpoints (GPT-NeoX-20B "slim weights", Pythia): read safely, merge tensor-parallel ranks.

Pipeline layout: one `layer_{idx:02d}-model_{rank:02d}-model_states.pt` per pipeline index and rank, each a
state dict. idx 0 is the embedding, 2..L+1 the transformer layers, L+3 the final norm, L+4 the output
layer (absent with tied embeddings); idx 1 and L+2 are parameterless. Sequential layout: the same
indices as `sequential.{idx}.{key}` under `module` in `mp_rank_{rank:02d}_model_states.pt`.

Merging: column-parallel tensors concatenate on dim 0, row-parallel weights on dim 1. Row-parallel
biases are summed under the parallel (GPT-J) residual, where each rank adds its own bias before the
all-reduce, and are one replicated copy otherwise. LayerNorm copies drift slightly apart between ranks
in training: they are averaged and the largest difference is reported. Sums and averages are computed in
fp32 and rounded once, to the dtype the consumer asks for (`tensors(dtype=...)`).

Exact tensor-parallel mode (`per_rank_tensors`): nothing is merged; every rank's LayerNorm copies and
row-parallel biases stream as stored, stacked on a leading rank axis, for a model that computes as the
ranks did (see `neox_jax.model`). The Hugging Face format has one tensor per name and cannot hold them.

Every `.pt` file is a pickle: it is read with torch's weights-only unpickler (`safe_unpickle`), so nothing
in it can run. Tensors are memory-mapped and merged one pipeline index at a time. The NeoX YAML is read by
`neox_yaml`, and which tensors exist, their shapes and their split come from `neox_jax.params`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..config import NeoXConfig
from ..params import EMBED_IN, EMBED_OUT, ParamSpec, Split, model_params, split_sizes
from .stream import CheckpointError, check_finite
from .hf import torch_to_numpy
from .neox_yaml import config_from_neox_args, read_neox_yaml
from .safe_unpickle import load_weights_only

INV_FREQ = "attention.rotary_emb.inv_freq"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # numpy has no float8
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_STEP_DIR = re.compile(r"^global_step(\d+)$")


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter as DeepSpeed shards hold it: its declaration in `neox_jax.params` bound to a config."""

    spec: ParamSpec
    config: NeoXConfig

    @property
    def key(self) -> str:  # name inside the NeoX state dict
        return self.spec.neox_key

    @property
    def hf_name(self) -> str:
        return self.spec.hf_name

    @property
    def split(self) -> Split:
        return self.spec.split

    @property
    def shape(self) -> tuple[int, ...]:  # merged
        return self.spec.stored_shape(self.config)

    def shard_shape(self, ranks: int) -> tuple[int, ...]:
        return self.spec.shard_shape(self.config, ranks)


@dataclasses.dataclass(frozen=True)
class PipeLayer:
    idx: int
    params: tuple[Param, ...]  # in canonical stream order
    transformer: bool  # also stores attention.rotary_emb.inv_freq


Combine = Callable[[PipeLayer, Param, list[np.ndarray]], np.ndarray]  # one parameter's rank shards -> its tensor


def pipeline_index(spec: ParamSpec, config: NeoXConfig) -> int:
    """0 the embedding, 2..L+1 the transformer layers, L+3 the final norm, L+4 the output layer."""
    if spec.layer is not None:
        return spec.layer + 2
    return {EMBED_IN.path: 0, EMBED_OUT.path: config.num_layers + 4}.get(spec.path, config.num_layers + 3)


def pipeline_layout(config: NeoXConfig) -> list[PipeLayer]:
    """The pipeline indices holding parameters, in canonical stream order."""
    groups: dict[int, list[ParamSpec]] = {}
    for spec in model_params(config):
        groups.setdefault(pipeline_index(spec, config), []).append(spec)
    return [PipeLayer(idx, tuple(Param(spec, config) for spec in specs), specs[0].layer is not None)
            for idx, specs in groups.items()]


def shard_file(idx: int, rank: int) -> str:
    return f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"


def sequential_key(idx: int, key: str) -> str:
    return f"sequential.{idx}.{key}"


def rotary_inv_freq(config: NeoXConfig) -> torch.Tensor:
    """The rotary frequencies exactly as GPT-NeoX's training code computes them (float32)."""
    dim = config.rotary_dim
    return 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2).float() / dim))


def check_ranks_divide(config: NeoXConfig, ranks: int) -> None:
    """Refuse a rank count that does not divide the sizes split over the ranks (a broken checkpoint or request)."""
    for what, size in split_sizes(config).items():
        if size % ranks:
            raise CheckpointError(f"{what} {size} is not divisible by the {ranks} tensor-parallel ranks")


@dataclasses.dataclass
class MergeReport:
    """How the ranks were merged, filled in while tensors stream."""

    ranks: int
    row_bias_rule: str  # "sum", "copy" or "single"
    row_bias_reason: str
    max_layernorm_diff: float = 0.0  # largest |difference| between two ranks' copies of a norm parameter
    max_layernorm_diff_at: str | None = None
    max_row_bias_copy_diff: float | None = None  # copy rule: largest disagreement between the copies
    inv_freq_checked: int = 0  # transformer layers whose stored rotary frequencies matched the config

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def looks_like_deepspeed(path: str | os.PathLike) -> bool:
    """A step folder with GPT-NeoX shards, or its parent (with `latest` or `global_stepN/`)."""
    path = Path(path)
    return _has_shards(path) or any(_has_shards(d) for d in path.glob("global_step*") if d.is_dir())


def _has_shards(d: Path) -> bool:
    return any(_LAYER_FILE.match(f.name) or _MP_RANK_FILE.match(f.name) for f in d.glob("*.pt"))


class DeepSpeedCheckpoint:
    """A GPT-NeoX DeepSpeed checkpoint as the canonical stream.

    `path`: the step folder (`global_stepN/`) or its parent (`latest` names the step). `config`: a
    NeoXConfig, NeoX YAML file(s), or None to read `configs/*.yml` beside or above the step folder. With
    YAML the vocabulary size is the embedding shards' rows times the ranks (padding kept).
    """

    def __init__(self, path: str | os.PathLike,
                 config: NeoXConfig | str | os.PathLike | Sequence[str | os.PathLike] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: " + ("not a directory" if self.path.exists() else "no such directory"))
        self.step_dir, self.step = _find_step_dir(self.path)
        self.layout, self.ranks, self.files = _scan(self.step_dir)
        self.config, self.config_source = self._resolve_config(config)
        check_ranks_divide(self.config, self.ranks)
        self.layers = pipeline_layout(self.config)
        if self.layout == "pipeline":
            self._check_layer_files()
        else:
            self._check_sequential_keys()
        if self.config.parallel_residual and self.ranks > 1:
            rule, reason = "sum", ("the model uses the parallel (GPT-J) residual: each rank adds its own "
                                   "row-parallel bias before the all-reduce")
        elif self.ranks > 1:
            rule, reason = "copy", "sequential residual: the bias is added once after the all-reduce"
        else:
            rule, reason = "single", "one tensor-parallel rank: nothing to merge"
        self.report = MergeReport(self.ranks, rule, reason)

    # -- discovery --

    def _resolve_config(self, config) -> tuple[NeoXConfig, str]:
        if isinstance(config, NeoXConfig):
            return config, "given"
        if config is None:
            files = _find_yaml(self.step_dir)
            if not files:
                raise CheckpointError(
                    f"{self.path}: no model config: found no configs/*.yml beside or above {self.step_dir}; "
                    f"give a GPT-NeoX YAML (--config) or a preset (--preset)")
        else:
            files = [Path(config)] if isinstance(config, (str, os.PathLike)) else [Path(f) for f in config]
        args = read_neox_yaml(files)
        names = ", ".join(str(f) for f in files)
        mp = args.get("model_parallel_size")
        if mp is not None and int(mp) != self.ranks:
            raise CheckpointError(f"{names} says model-parallel-size {mp}, but {self.step_dir} holds "
                                  f"{self.ranks} tensor-parallel rank(s)")
        rows = sum(_tensor_shape(self._shard(0, r), "word_embeddings.weight", self._where(0, r))[0]
                   for r in range(self.ranks))
        return config_from_neox_args(args, rows, names), names

    def _check_layer_files(self) -> None:
        present = {(idx, rank) for idx, rank in self._indexed}
        expected_idx = [layer.idx for layer in self.layers]
        indices = {idx for idx, _ in present}
        for tied in (False, True):
            n = max(indices) - (3 if tied else 4)
            if n > 0 and n != self.config.num_layers and indices == set(_indices(n, tied)):
                raise CheckpointError(f"{self.step_dir} holds a {n}-layer model (layer files up to "
                                      f"layer_{max(indices):02d}), the config describes {self.config.num_layers} "
                                      f"layers")
        layout_hint = (f"expected the GPT-NeoX pipeline layout for {self.config.num_layers} layers: "
                       f"{describe_layout(self.config, self.ranks)}")
        for idx in expected_idx:
            for rank in range(self.ranks):
                if (idx, rank) not in present:
                    raise CheckpointError(f"missing layer file {self.step_dir / shard_file(idx, rank)} "
                                          f"({layout_hint})")
        extra = sorted(idx for idx, _ in present if idx not in expected_idx)
        if extra:
            raise CheckpointError(f"unexpected layer file {self.step_dir / shard_file(extra[0], 0)} "
                                  f"({layout_hint})")

    def _check_sequential_keys(self) -> None:
        prefixes = tuple(sequential_key(layer.idx, "") for layer in self.layers)
        for rank in range(self.ranks):
            for key in self._module(self._file(0, rank)):
                if not key.startswith(prefixes):
                    raise CheckpointError(
                        f"{self._file(0, rank)}: unexpected tensor {key!r} under 'module' (expected "
                        f"sequential.IDX.* for IDX in {', '.join(str(layer.idx) for layer in self.layers)}, "
                        f"the layout of a {self.config.num_layers}-layer model)")

    @property
    def _indexed(self) -> list[tuple[int, int]]:
        return [tuple(int(g) for g in _LAYER_FILE.match(f.name).groups()) for f in self.files]

    def _file(self, idx: int, rank: int) -> Path:
        if self.layout == "pipeline":
            return self.step_dir / shard_file(idx, rank)
        return self.step_dir / f"mp_rank_{rank:02d}_model_states.pt"

    def _where(self, idx: int, rank: int) -> str:
        return str(self._file(idx, rank))

    def _shard(self, idx: int, rank: int) -> Mapping[str, torch.Tensor]:
        """One rank's tensors of one pipeline index, keys as in the pipeline layout."""
        file = self._file(idx, rank)
        if self.layout == "pipeline":
            state = load_weights_only(file)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{file}: not a state dict (got {type(state).__name__})")
            return state
        # Reloaded per index so that the mapped pages of earlier layers are released.
        prefix = sequential_key(idx, "")
        return {k[len(prefix):]: v for k, v in self._module(file).items() if k.startswith(prefix)}

    @staticmethod
    def _module(file: Path) -> Mapping[str, Any]:
        state = load_weights_only(file, inert_globals=True)
        module = state.get("module") if isinstance(state, Mapping) else None
        if not isinstance(module, Mapping):
            raise CheckpointError(f"{file}: holds no weights under 'module' (a pipeline-layout checkpoint "
                                  f"whose layer_XX-model_YY-model_states.pt files are missing?)")
        return module

    # -- streaming --

    def validate(self) -> int:
        """Check every file's keys and shapes against the config without reading tensor data.

        Returns the size in bytes of the merged tensors in their stored dtypes.
        """
        total = 0
        for layer in self.layers:
            shards = [self._shard(layer.idx, r) for r in range(self.ranks)]
            self._check_shards(layer, shards)
            total += sum(int(np.prod(p.shape)) * shards[0][p.key].element_size() for p in layer.params)
        return total

    def tensors(self, on_file: Callable[[Path], None] | None = None, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
        """The merged canonical stream; `on_file(path)` is called once each input file has been read.

        Sums and averages are computed in float32 (float64 shards: float64) and rounded once, to `dtype`
        (the dtype the consumer will hold; default: the shards' own). Rounding them to fp16 shards' dtype
        and then casting to float32 would give a float32 model that is not the fp32 merge.
        """
        target = None if dtype is None else np.dtype(dtype)
        return self._stream(on_file, lambda layer, p, arrays: self._merge(layer, p, arrays, target))

    def per_rank_tensors(self, on_file: Callable[[Path], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """The stream of the exact tensor-parallel mode: every rank's tensors as stored, no arithmetic.

        A per-rank tensor (`ParamSpec.per_rank`: LayerNorm copies, row-parallel biases) comes as the ranks'
        copies stacked, `[ranks, *stored shape]`; a column- or row-parallel one as its blocks concatenated
        (the merged tensor, bit for bit). One tensor at a time, as `tensors`.
        """
        def keep(layer: PipeLayer, p: Param, arrays: list[np.ndarray]) -> np.ndarray:
            return np.stack(arrays) if p.spec.per_rank else self._merge(layer, p, arrays, None)

        return self._stream(on_file, keep)

    def _stream(self, on_file: Callable[[Path], None] | None, combine: Combine) -> Iterator[tuple[str, np.ndarray]]:
        last_use = {self._file(layer.idx, r): layer.idx for layer in self.layers for r in range(self.ranks)}
        for layer in self.layers:
            shards = [self._shard(layer.idx, r) for r in range(self.ranks)]
            self._check_shards(layer, shards)
            if layer.transformer:
                self._check_inv_freq(layer, shards)
            # One combined tensor at a time, so that the consumer can write it out before the next is built.
            for p in layer.params:
                arrays = [torch_to_numpy(s[p.key]) for s in shards]
                for rank, array in enumerate(arrays):
                    check_finite(p.key, array, self._where(layer.idx, rank))
                yield p.hf_name, combine(layer, p, arrays)
            del shards  # unmaps this index's files (unless a yielded single-rank array still views them)
            for r in range(self.ranks):
                file = self._file(layer.idx, r)
                if on_file is not None and last_use[file] == layer.idx:
                    on_file(file)

    def _check_shards(self, layer: PipeLayer, shards: list[Mapping[str, torch.Tensor]]) -> None:
        allowed = {p.key for p in layer.params} | ({INV_FREQ} if layer.transformer else set())
        for rank, shard in enumerate(shards):
            where = self._where(layer.idx, rank)
            for key in shard:
                if key not in allowed:
                    raise CheckpointError(f"{where}: unexpected tensor {key!r} at pipeline index {layer.idx} "
                                          f"(expected {', '.join(sorted(allowed))})")
            for p in layer.params:
                shape = _tensor_shape(shard, p.key, where)
                if shard[p.key].dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{where}: tensor {p.key!r} has dtype {shard[p.key].dtype}; model weights "
                                          f"are float16, bfloat16, float32 or float64")
                first = shards[0][p.key]
                if rank and (shape != tuple(first.shape) or shard[p.key].dtype != first.dtype):
                    raise CheckpointError(
                        f"{where}: ranks disagree on {p.key!r}: {tuple(shape)} {shard[p.key].dtype} here, "
                        f"{tuple(first.shape)} {first.dtype} in {self._where(layer.idx, 0)}")
                if shape != p.shard_shape(self.ranks):
                    raise CheckpointError(
                        f"{where}: tensor {p.key!r} ({p.hf_name}) has shape {shape}, the config expects "
                        f"{p.shard_shape(self.ranks)} per rank ({p.shape} merged over {self.ranks} rank(s))")

    def _check_inv_freq(self, layer: PipeLayer, shards: list[Mapping[str, torch.Tensor]]) -> None:
        expected = rotary_inv_freq(self.config).numpy()
        checked = False
        for rank, shard in enumerate(shards):
            if INV_FREQ not in shard:
                continue  # newer GPT-NeoX may not persist the buffer
            stored = shard[INV_FREQ]
            eps = torch.finfo(stored.dtype).eps if stored.dtype.is_floating_point else 1.0
            got = stored.float().numpy()
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=4 * eps, atol=0):
                raise CheckpointError(
                    f"{self._where(layer.idx, rank)}: {INV_FREQ} does not match the config's rotary settings "
                    f"(rotary_dim {self.config.rotary_dim} = head_dim {self.config.head_dim} x rotary_pct "
                    f"{self.config.rotary_pct}, base {self.config.rotary_base:g}): stored "
                    f"{_preview(got)}, expected {_preview(expected)}; check rotary-pct and rotary-emb-base")
            checked = True
        self.report.inv_freq_checked += checked

    def _merge(self, layer: PipeLayer, p: Param, shards: list[np.ndarray], dtype: np.dtype | None) -> np.ndarray:
        """Concatenations and the checked copy pass as stored; sums and means are rounded once, to `dtype`."""
        if len(shards) == 1:
            return shards[0]
        if p.split is Split.COLUMN:
            return np.concatenate(shards, axis=0)
        if p.split is Split.ROW:
            return np.concatenate(shards, axis=1)
        stack = np.stack([s.astype(np.promote_types(s.dtype, np.float32)) for s in shards])
        rounded = dtype or shards[0].dtype
        if p.split is Split.ROW_BIAS and self.report.row_bias_rule == "sum":
            return stack.sum(axis=0).astype(rounded)
        diff = float(np.max(np.abs(stack - stack[0])))
        if p.split is Split.ROW_BIAS:
            # Replicated copies receive identical updates; a real difference means the residual is misconfigured.
            if diff > 1e-2 * max(1.0, float(np.max(np.abs(stack[0])))):
                raise CheckpointError(
                    f"{self._where(layer.idx, 1)}: the ranks' copies of {p.key!r} differ by {diff:.3g}; with "
                    f"the sequential residual they should be identical. Does the model use the parallel "
                    f"residual (gpt-j-residual: true)?")
            self.report.max_row_bias_copy_diff = max(self.report.max_row_bias_copy_diff or 0.0, diff)
            return shards[0]
        if diff > self.report.max_layernorm_diff:
            self.report.max_layernorm_diff, self.report.max_layernorm_diff_at = diff, p.hf_name
        return stack.mean(axis=0).astype(rounded)


def _indices(num_layers: int, tied: bool) -> list[int]:
    return [0, *range(2, num_layers + 2), num_layers + 3, *([] if tied else [num_layers + 4])]


def describe_layout(config: NeoXConfig, ranks: int) -> str:
    n = config.num_layers
    last = [] if config.tie_word_embeddings else [f"layer_{n + 4:02d} output layer"]
    return ", ".join(["layer_00 embedding", f"layer_02..layer_{n + 1:02d} transformer layers",
                      f"layer_{n + 3:02d} final norm", *last]) + f", each as model_00..model_{ranks - 1:02d}"


def _tensor_shape(shard: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    if key not in shard:
        raise CheckpointError(f"{where}: missing tensor {key!r}")
    if not isinstance(shard[key], torch.Tensor):
        raise CheckpointError(f"{where}: {key!r} is a {type(shard[key]).__name__}, not a tensor")
    return tuple(shard[key].shape)


def _preview(a: np.ndarray) -> str:
    head = ", ".join(f"{x:.4g}" for x in a[:3])
    return f"[{head}{', ...' if a.size > 3 else ''}] ({a.size} values)"


def _find_step_dir(path: Path) -> tuple[Path, int | None]:
    if not _has_shards(path):
        latest = path / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (path / tag).is_dir():
                raise CheckpointError(f"{latest} names {tag!r}, which is not a directory in {path}")
            path = path / tag
        else:
            steps = sorted((d for d in path.glob("global_step*") if d.is_dir() and _has_shards(d)),
                           key=lambda d: int(_STEP_DIR.match(d.name).group(1)) if _STEP_DIR.match(d.name) else -1)
            if len(steps) != 1:
                found = f"several steps ({', '.join(d.name for d in steps)}): give one of them" if steps else \
                    "no layer_XX-model_YY-model_states.pt or mp_rank_YY_model_states.pt files"
                raise CheckpointError(f"{path}: not a GPT-NeoX DeepSpeed checkpoint: {found}")
            path = steps[0]
    m = _STEP_DIR.match(path.name)
    return path, int(m.group(1)) if m else None


def _scan(step_dir: Path) -> tuple[str, int, list[Path]]:
    """(layout, tensor-parallel ranks, weight files in read order)."""
    layer_files = sorted((f for f in step_dir.iterdir() if _LAYER_FILE.match(f.name)),
                         key=lambda f: tuple(int(g) for g in _LAYER_FILE.match(f.name).groups()))
    if layer_files:
        layout, files, rank_of = "pipeline", layer_files, lambda f: int(_LAYER_FILE.match(f.name).group(2))
    else:
        files = sorted(f for f in step_dir.iterdir() if _MP_RANK_FILE.match(f.name))
        if not files:
            raise CheckpointError(f"{step_dir}: no layer_XX-model_YY-model_states.pt or "
                                  f"mp_rank_YY_model_states.pt files")
        layout, rank_of = "sequential", lambda f: int(_MP_RANK_FILE.match(f.name).group(1))
    ranks = sorted({rank_of(f) for f in files})
    if ranks != list(range(len(ranks))):
        missing = min(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{step_dir}: tensor-parallel rank model_{missing:02d} has no files "
                              f"(found ranks {', '.join(f'{r:02d}' for r in ranks)})")
    return layout, len(ranks), files


def _find_yaml(step_dir: Path) -> list[Path]:
    for d in (step_dir / "configs", step_dir.parent / "configs"):
        files = sorted([*d.glob("*.yml"), *d.glob("*.yaml")])
        if files:
            return files
    return []

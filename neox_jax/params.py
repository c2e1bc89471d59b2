"""Every parameter of the model, declared once: the facts the model, the checkpoint readers and the
tensor-parallel code all need, and the functions deriving each of their views.

A `ParamSpec` names a parameter (Hugging Face name, params-tree path, GPT-NeoX state-dict key), gives its
logical axes grouped by the checkpoint's dims (`(("heads", "qkv", "head_dim"), ("embed",))` is stored as
`[3D, D]` and held as `[N, 3, H, D]`: the model's layout only names the head axes, it never transposes),
its tensor-parallel role (how GPT-NeoX's ranks split it and how their shards merge) and its kind. Axis
sizes come from the config, mesh axes from `LOGICAL_AXIS_RULES`.

Derived here: the checkpoint shapes (`stored_shape`, `expected_shapes`), the params-tree shapes
(`ParamSpec.shape`), the mesh axes of the partition specs (`mesh_axes`), the per-rank DeepSpeed shard
shapes (`shard_shape`) and the sizes a tensor-parallel split must divide (`split_sizes`). Derived from
those elsewhere: the model's `self.param` calls (`model.declared_param`), the partition specs and memory
plan (`sharding`), the abstract params and the stored-to-params reshape (`weights`), the DeepSpeed
pipeline layout and merge rules (`checkpoints.deepspeed`). The module imports no JAX, so that the
checkpoint converter does not pay for it.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from .config import NeoXConfig

LAYER_PREFIX = "gpt_neox.layers"
MODEL = "model"  # the mesh axis tensor parallelism splits over (sharding.py builds the mesh)

RANK = "rank"  # the leading axis of per-rank copies in the exact tensor-parallel mode (`ParamSpec.per_rank`)

# Logical axis -> mesh axis (maxtext's "logical axis rules"); an axis not listed is replicated.
# Heads, MLP columns and vocabulary rows split over the model axis: Megatron's tensor parallelism. The rank
# axis goes there too, so that a device holds the copies of the ranks whose heads and columns it holds.
LOGICAL_AXIS_RULES = {"heads": MODEL, "mlp": MODEL, "vocab": MODEL, RANK: MODEL}


# The config field giving each logical axis its size; "qkv" is the (q, k, v) triple of the fused projection.
AXIS_FIELDS = {"heads": "num_heads", "vocab": "vocab_size", "mlp": "intermediate_size", "embed": "hidden_size",
               "head_dim": "head_dim"}


def axis_size(config: NeoXConfig, axis: str, tp_ranks: int | None = None) -> int:
    if axis == RANK:
        return tp_ranks
    return 3 if axis == "qkv" else getattr(config, AXIS_FIELDS[axis])


class Split(enum.Enum):
    """A parameter's tensor-parallel role: how GPT-NeoX (Megatron) splits it over the ranks."""

    COLUMN = "column"  # column-parallel: split on dim 0 (the output of an [out, in] weight); concatenated
    ROW = "row"  # row-parallel: split on dim 1 (the input); concatenated
    ROW_BIAS = "row_bias"  # bias of a row-parallel matmul: summed across ranks under the parallel residual
    #                        (each rank adds its own before the all-reduce), one checked copy otherwise
    REPLICATED = "replicated"  # LayerNorm: a copy per rank, drifting slightly in training; averaged


SPLIT_DIM = {Split.COLUMN: 0, Split.ROW: 1}  # the stored dim each splitting role divides


class Kind(enum.Enum):
    MATMUL = "matmul"  # a matmul weight, what quantization acts on
    BIAS = "bias"
    NORM = "norm"  # a LayerNorm scale
    EMBEDDING = "embedding"  # looked up by token (also the output head when embeddings are tied)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str  # Hugging Face name; a layer's relative to `gpt_neox.layers.N.`
    path: tuple[str, ...]  # params-tree path; a layer's relative to `layers_N`
    neox_key: str  # key in GPT-NeoX's state dicts (DeepSpeed shards)
    dims: tuple[tuple[str, ...], ...]  # logical axes, grouped by the stored dims they make up
    split: Split
    kind: Kind
    layer: int | None = None  # the transformer layer; None for the embedding, final norm and head

    @property
    def hf_name(self) -> str:
        return self.name if self.layer is None else f"{LAYER_PREFIX}.{self.layer}.{self.name}"

    @property
    def tree_path(self) -> tuple[str, ...]:
        return self.path if self.layer is None else (f"layers_{self.layer}", *self.path)

    @property
    def per_rank(self) -> bool:
        """Whether each rank stores a whole tensor of its own: a LayerNorm copy, or its row-parallel bias. The
        merged params hold one (averaged, summed or checked); the exact tensor-parallel mode keeps all of
        them, stacked on a leading `RANK` axis. Column- and row-parallel tensors are blocks of one whole and
        are held concatenated in both modes (a rank's block is a slice of the heads, columns or rows)."""
        return self.split in (Split.REPLICATED, Split.ROW_BIAS)

    def tree_axes(self, tp_ranks: int | None = None) -> tuple[str, ...]:
        """Logical axes of the params-tree array; `tp_ranks`: the exact mode over that many ranks (None: merged)."""
        axes = tuple(axis for group in self.dims for axis in group)
        return (RANK, *axes) if tp_ranks and self.per_rank else axes

    @property
    def axes(self) -> tuple[str, ...]:
        """Logical axes of the merged params-tree array."""
        return self.tree_axes()

    def shape(self, config: NeoXConfig, tp_ranks: int | None = None) -> tuple[int, ...]:
        """Shape in the params tree (merged, or the exact mode over `tp_ranks` ranks)."""
        return tuple(axis_size(config, axis, tp_ranks) for axis in self.tree_axes(tp_ranks))

    def stored_shape(self, config: NeoXConfig) -> tuple[int, ...]:
        """Shape in checkpoints (HF and merged DeepSpeed), `[out, in]` for a weight."""
        return tuple(math.prod(axis_size(config, axis) for axis in group) for group in self.dims)

    def shard_shape(self, config: NeoXConfig, ranks: int) -> tuple[int, ...]:
        """One tensor-parallel rank's part of the stored tensor."""
        dim = SPLIT_DIM.get(self.split)
        return tuple(n // ranks if i == dim else n for i, n in enumerate(self.stored_shape(config)))

    def mesh_axes(self, tp_ranks: int | None = None) -> tuple[str | None, ...]:
        """The mesh axis each params-tree axis is split over (None: replicated), a PartitionSpec's entries."""
        return tuple(LOGICAL_AXIS_RULES.get(axis) for axis in self.tree_axes(tp_ranks))


def _layer(name: str, dims, split: Split, kind: Kind) -> ParamSpec:
    module, leaf = name.split(".", 1)
    return ParamSpec(name, (module, leaf), name, dims, split, kind)


def _norm(module: str) -> tuple[ParamSpec, ParamSpec]:
    return (_layer(f"{module}.weight", (("embed",),), Split.REPLICATED, Kind.NORM),
            _layer(f"{module}.bias", (("embed",),), Split.REPLICATED, Kind.BIAS))


QKV, HEADS = ("heads", "qkv", "head_dim"), ("heads", "head_dim")
EMBED_IN = ParamSpec("gpt_neox.embed_in.weight", ("embed_in",), "word_embeddings.weight",
                     (("vocab",), ("embed",)), Split.COLUMN, Kind.EMBEDDING)
LAYER = (  # one transformer layer, in the canonical stream's order
    *_norm("input_layernorm"),
    *_norm("post_attention_layernorm"),
    _layer("attention.query_key_value.weight", (QKV, ("embed",)), Split.COLUMN, Kind.MATMUL),
    _layer("attention.query_key_value.bias", (QKV,), Split.COLUMN, Kind.BIAS),
    _layer("attention.dense.weight", (("embed",), HEADS), Split.ROW, Kind.MATMUL),
    _layer("attention.dense.bias", (("embed",),), Split.ROW_BIAS, Kind.BIAS),
    _layer("mlp.dense_h_to_4h.weight", (("mlp",), ("embed",)), Split.COLUMN, Kind.MATMUL),
    _layer("mlp.dense_h_to_4h.bias", (("mlp",),), Split.COLUMN, Kind.BIAS),
    _layer("mlp.dense_4h_to_h.weight", (("embed",), ("mlp",)), Split.ROW, Kind.MATMUL),
    _layer("mlp.dense_4h_to_h.bias", (("embed",),), Split.ROW_BIAS, Kind.BIAS),
)
FINAL_NORM = (
    ParamSpec("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "weight"), "norm.weight",
              (("embed",),), Split.REPLICATED, Kind.NORM),
    ParamSpec("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias"), "norm.bias",
              (("embed",),), Split.REPLICATED, Kind.BIAS),
)
EMBED_OUT = ParamSpec("embed_out.weight", ("embed_out",), "final_linear.weight", (("vocab",), ("embed",)),
                      Split.COLUMN, Kind.MATMUL)
_LAYER_BY_PATH = {spec.path: spec for spec in LAYER}
_TOP_BY_PATH = {spec.path: spec for spec in (EMBED_IN, *FINAL_NORM, EMBED_OUT)}


def layer_params(layer: int) -> tuple[ParamSpec, ...]:
    return tuple(dataclasses.replace(spec, layer=layer) for spec in LAYER)


def model_params(config: NeoXConfig) -> list[ParamSpec]:
    """Every parameter of `config`'s model, in the canonical stream's order."""
    layers = [spec for i in range(config.num_layers) for spec in layer_params(i)]
    return [EMBED_IN, *layers, *FINAL_NORM, *([] if config.tie_word_embeddings else [EMBED_OUT])]


def spec_at(tree_path: tuple[str, ...]) -> ParamSpec:
    """The declaration of the params-tree leaf at `tree_path`, e.g. ("layers_3", "mlp", "dense_h_to_4h.bias")."""
    layer = tree_path[0].removeprefix("layers_") if tree_path else ""
    if layer.isdigit() and tree_path[1:] in _LAYER_BY_PATH:
        return dataclasses.replace(_LAYER_BY_PATH[tree_path[1:]], layer=int(layer))
    if tree_path in _TOP_BY_PATH:
        return _TOP_BY_PATH[tree_path]
    raise KeyError(f"no parameter at {'/'.join(tree_path)}")


def expected_shapes(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the canonical stream, in stream order, with its stored shape."""
    return {spec.hf_name: spec.stored_shape(config) for spec in model_params(config)}


def split_sizes(config: NeoXConfig) -> dict[str, int]:
    """The config sizes a tensor-parallel split must divide, by field name: those of the logical axes that
    go to the model axis, e.g. {"num_heads": 64, "vocab_size": 50432, "intermediate_size": 24576}."""
    split = {axis for spec in model_params(config) for axis in spec.axes if LOGICAL_AXIS_RULES.get(axis) == MODEL}
    return {field: axis_size(config, axis) for axis, field in AXIS_FIELDS.items() if axis in split}

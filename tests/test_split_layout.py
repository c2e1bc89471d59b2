"""The tensor-parallel split of every parameter against GPT-NeoX's published layout, written here as data.

GPT-NeoX (Megatron) splits a layer's tensors over the tensor-parallel ranks as follows: the fused QKV and
the MLP up-projection (weights and biases) are column-parallel, split on their output dimension (dim 0 of
the [out, in] weight); the attention output projection and the MLP down-projection weights are
row-parallel, split on their input dimension (dim 1); the row-parallel biases and every LayerNorm are
replicated. The word embeddings (VocabParallelEmbedding) and the output layer (final_linear) are split by
vocabulary, dim 0. Both the DeepSpeed shard reader (`pipeline_layout`) and the JAX partition specs
(`sharding.param_spec`), each derived from the parameter table in `neox_jax/params.py`, are checked
against this table; the device-side shards, per-device bytes and
memory plan are checked on 8 virtual devices in `sharded_cases.py`, with expectations computed from it too.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from neox_jax.checkpoints import expected_shapes
from neox_jax.checkpoints.deepspeed import Split, pipeline_layout
from neox_jax.sharding import MODEL, make_mesh, param_shardings, param_spec, plan_memory
from neox_jax.weights import abstract_params

from conftest import tiny_config

COLUMN, ROW, REPLICATED = "column", "row", "replicated"
SPLIT_DIM = {COLUMN: 0, ROW: 1, REPLICATED: None}  # dim of the [out, in] tensor split over the ranks

# The published layout, by Hugging Face name (layer tensors relative to `gpt_neox.layers.N.`).
LAYER_LAYOUT = {
    "input_layernorm.weight": REPLICATED,
    "input_layernorm.bias": REPLICATED,
    "attention.query_key_value.weight": COLUMN,
    "attention.query_key_value.bias": COLUMN,
    "attention.dense.weight": ROW,
    "attention.dense.bias": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED,
    "post_attention_layernorm.bias": REPLICATED,
    "mlp.dense_h_to_4h.weight": COLUMN,
    "mlp.dense_h_to_4h.bias": COLUMN,
    "mlp.dense_4h_to_h.weight": ROW,
    "mlp.dense_4h_to_h.bias": REPLICATED,
}
TOP_LAYOUT = {
    "gpt_neox.embed_in.weight": COLUMN,  # word_embeddings: by vocabulary
    "gpt_neox.final_layer_norm.weight": REPLICATED,
    "gpt_neox.final_layer_norm.bias": REPLICATED,
    "embed_out.weight": COLUMN,  # final_linear: by vocabulary
}
# GPT-NeoX's names in the pipeline shards, and their pipeline indices (L layers): 0 the embedding,
# 2..L+1 the layers, L+3 the final norm, L+4 the output layer.
NEOX_KEYS = {"gpt_neox.embed_in.weight": ("word_embeddings.weight", lambda L: 0),
             "gpt_neox.final_layer_norm.weight": ("norm.weight", lambda L: L + 3),
             "gpt_neox.final_layer_norm.bias": ("norm.bias", lambda L: L + 3),
             "embed_out.weight": ("final_linear.weight", lambda L: L + 4)}


def layout(hf_name: str) -> str:
    if hf_name in TOP_LAYOUT:
        return TOP_LAYOUT[hf_name]
    prefix, layers, index, rest = hf_name.split(".", 3)
    assert (prefix, layers) == ("gpt_neox", "layers") and index.isdigit(), hf_name
    return LAYER_LAYOUT[rest]


def shard_shape(shape, kind: str, ranks: int) -> tuple[int, ...]:
    """A rank's part of a tensor of `shape` ([out, in] or [n])."""
    dim = SPLIT_DIM[kind]
    return tuple(n // ranks if i == dim else n for i, n in enumerate(shape))


def hf_name(path: tuple[str, ...]) -> str:
    """Path in the JAX params pytree -> Hugging Face tensor name (written out here, not taken from weights.py)."""
    if path in (("embed_in",), ("embed_out",)):
        return {"embed_in": "gpt_neox.embed_in.weight", "embed_out": "embed_out.weight"}[path[0]]
    if path[0] == "final_layer_norm":
        return f"gpt_neox.final_layer_norm.{path[1]}"
    layer, module, leaf = path
    assert layer.startswith("layers_"), path
    return f"gpt_neox.layers.{layer.removeprefix('layers_')}.{module}.{leaf}"


def jax_split_axis(jax_shape, torch_shape, kind: str) -> int | None:
    """The axis of the JAX array that carries the split: its axes regroup the [out, in] tensor's dims
    (e.g. QKV [3D, D] is [N, 3, H, D], attention dense [D, D] is [D, N, H]), and splitting a dim into
    contiguous blocks over the ranks splits the first (outermost) axis of its group: heads, not (q, k, v)."""
    dim = SPLIT_DIM[kind]
    if dim is None:
        return None
    axis, product = 0, 1
    for d in range(dim):  # skip the axes making up the earlier dims
        while product < math.prod(torch_shape[:d + 1]):
            product *= jax_shape[axis]
            axis += 1
    return axis


def expected_jax_spec(path, jax_shape, config) -> tuple:
    name = hf_name(path)
    axis = jax_split_axis(jax_shape, expected_shapes(config)[name], layout(name))
    return tuple(MODEL if i == axis else None for i in range(len(jax_shape)))


def normalized(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def leaves(config):
    return [(tuple(k.key for k in path), leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(abstract_params(config, jnp.float32))[0]]


CONFIGS = {"untied": tiny_config(num_layers=3, num_heads=8, vocab_size=128),
           "tied": tiny_config(num_layers=2, tie_word_embeddings=True)}


def test_the_table_covers_every_tensor():
    for config in CONFIGS.values():
        for name in expected_shapes(config):
            layout(name)  # no KeyError


@pytest.mark.parametrize("case", CONFIGS)
def test_deepspeed_pipeline_layout_splits_as_gpt_neox(case):
    config = CONFIGS[case]
    L = config.num_layers
    seen = set()
    for pipe in pipeline_layout(config):
        for param in pipe.params:
            kind = layout(param.hf_name)
            seen.add(param.hf_name)
            assert tuple(param.shape) == expected_shapes(config)[param.hf_name]
            if kind == COLUMN:
                assert param.split is Split.COLUMN, param
            elif kind == ROW:
                assert param.split is Split.ROW, param
            else:  # one copy per rank: LayerNorms averaged, row-parallel biases merged by the residual rule
                assert param.split in (Split.REPLICATED, Split.ROW_BIAS), param
                assert (param.split is Split.ROW_BIAS) == param.hf_name.endswith(("dense.bias", "4h_to_h.bias"))
            for ranks in (1, 2, 4):
                assert tuple(param.shard_shape(ranks)) == shard_shape(param.shape, kind, ranks), (param, ranks)
            if param.hf_name in NEOX_KEYS:
                key, idx = NEOX_KEYS[param.hf_name]
                assert (param.key, pipe.idx) == (key, idx(L))
            else:
                layer = int(param.hf_name.split(".")[2])
                assert pipe.idx == layer + 2 and param.key == param.hf_name.split(".", 3)[3]
    assert seen == set(expected_shapes(config))


@pytest.mark.parametrize("case", CONFIGS)
def test_jax_partition_specs_split_as_gpt_neox(case):
    """Device side: QKV (weight [N, 3, H, D] and bias) and the MLP up-projection split on their output (head)
    axis, the attention output projection [D, N, H] and the MLP down-projection on their input axis, the
    embedding and output head by vocabulary; everything else replicated."""
    config = CONFIGS[case]
    shardings = param_shardings(abstract_params(config, jnp.float32), make_mesh(1, 1))
    split = set()
    for path, leaf in leaves(config):
        expected = expected_jax_spec(path, leaf.shape, config)
        assert normalized(param_spec(path), leaf.ndim) == expected, path
        node = shardings
        for key in path:
            node = node[key]
        assert normalized(node.spec, leaf.ndim) == expected, path
        if MODEL in expected:
            split.add(path[-1] if path[0].startswith("layers_") else path[0])
    assert split == {"query_key_value.weight", "query_key_value.bias", "dense.weight", "dense_h_to_4h.weight",
                     "dense_h_to_4h.bias", "dense_4h_to_h.weight", "embed_in"} | (
        set() if config.tie_word_embeddings else {"embed_out"})
    # Heads, not (q, k, v) and not head_dim: the split axes of the attention tensors are the head axes.
    assert expected_jax_spec(("layers_0", "attention", "query_key_value.weight"), (8, 3, 8, 64), CONFIGS["untied"]
                             ) == (MODEL, None, None, None)
    assert expected_jax_spec(("layers_0", "attention", "dense.weight"), (64, 8, 8), CONFIGS["untied"]
                             ) == (None, MODEL, None)


def weight_bytes_per_device(config, model: int, itemsize: int) -> int:
    """Per-device parameter bytes over `model` tensor-parallel devices, from the config and the table."""
    return itemsize * sum(math.prod(shard_shape(shape, layout(name), model))
                          for name, shape in expected_shapes(config).items())


def test_single_device_memory_plan_is_every_parameter():
    for config in CONFIGS.values():
        d, v, f, L = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_layers
        params = (v * d * (1 if config.tie_word_embeddings else 2) + 2 * d
                  + L * (4 * d + 3 * d * d + 3 * d + d * d + d + f * d + f + d * f + d))
        assert weight_bytes_per_device(config, 1, 2) == 2 * params
        plan = plan_memory(config, jnp.float16, make_mesh(1, 1), batch=3, context=40)
        assert plan.weights_per_device == 2 * params
        assert plan.cache_per_device == 2 * config.num_layers * 3 * config.num_heads * 40 * config.head_dim * 2

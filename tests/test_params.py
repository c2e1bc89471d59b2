"""The parameter table (neox_jax/params.py): it declares exactly the model's parameters, and its facts agree
with each other. Its tensor-parallel split is checked against GPT-NeoX's published layout in
test_split_layout.py; here are the checks that need no such reference."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from neox_jax import params
from neox_jax.checkpoints import CheckpointError
from neox_jax.checkpoints.deepspeed import check_ranks_divide
from neox_jax.model import NeoX, declared_param
from neox_jax.params import MODEL, Kind, Split, model_params, spec_at
from neox_jax.sharding import ShardingError, check_model_axis_divides, make_mesh
from neox_jax.weights import abstract_params

from conftest import tiny_config

CONFIGS = [tiny_config(num_layers=3, num_heads=8, vocab_size=128, intermediate_size=96),
           tiny_config(num_layers=2, tie_word_embeddings=True)]


@pytest.mark.parametrize("config", CONFIGS, ids=["untied", "tied"])
def test_abstract_params_are_what_the_model_creates(config):
    """The table lists exactly the model's parameters, with the shapes and dtype the model gives them."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    created = jax.eval_shape(lambda t: NeoX(config, jnp.float16).init(jax.random.PRNGKey(0), t, t)["params"], tokens)
    declared = abstract_params(config, jnp.float16)
    assert jax.tree_util.tree_structure(created) == jax.tree_util.tree_structure(declared)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(created)[0], jax.tree_util.tree_leaves(declared)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), path


@pytest.mark.parametrize("config", CONFIGS, ids=["untied", "tied"])
def test_names_paths_and_shapes_of_each_declaration_agree(config):
    specs = model_params(config)
    assert len({s.hf_name for s in specs}) == len({s.tree_path for s in specs}) == len(specs)
    for spec in specs:
        assert spec_at(spec.tree_path) == spec
        # The params layout regroups the stored dims (never transposes): same elements, same order of axes.
        assert math.prod(spec.shape(config)) == math.prod(spec.stored_shape(config))
        assert spec.axes == tuple(a for group in spec.dims for a in group)
        if spec.layer is None:
            assert not spec.hf_name.startswith(params.LAYER_PREFIX)
        else:
            assert spec.hf_name == f"gpt_neox.layers.{spec.layer}.{spec.neox_key}"
            assert spec.tree_path == (f"layers_{spec.layer}", *spec.hf_name.split(".", 3)[3].split(".", 1))
    assert [s.layer for s in specs if s.layer is not None] == sorted(s.layer for s in specs if s.layer is not None)


def test_each_role_splits_the_axis_its_stored_dim_begins_with():
    """Column-parallel tensors go to the model axis on the first logical axis of stored dim 0, row-parallel
    ones on that of dim 1 (heads, not (q, k, v) or head_dim); biases of row-parallel matmuls and LayerNorms
    are whole on every device."""
    for spec in model_params(CONFIGS[0]):
        split_axes = [axis for axis, mesh in zip(spec.axes, spec.mesh_axes()) if mesh == MODEL]
        if spec.split in (Split.COLUMN, Split.ROW):
            assert split_axes == [spec.dims[params.SPLIT_DIM[spec.split]][0]], spec
        else:
            assert split_axes == [], spec


def test_kinds():
    """Matmul weights (what quantization acts on) are the [out, in] weights of the linear maps and the
    untied output head; LayerNorm scales start at one, every bias at zero."""
    specs = {s.hf_name: s for s in model_params(CONFIGS[0])}
    matmuls = {name for name, s in specs.items() if s.kind is Kind.MATMUL}
    layer0 = {f"gpt_neox.layers.0.{n}" for n in ("attention.query_key_value.weight", "attention.dense.weight",
                                                 "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")}
    assert layer0 <= matmuls and "embed_out.weight" in matmuls and len(matmuls) == 4 * 3 + 1
    assert all(len(specs[name].dims) == 2 for name in matmuls)
    assert {name for name, s in specs.items() if s.kind is Kind.EMBEDDING} == {"gpt_neox.embed_in.weight"}
    assert all(name.endswith("layernorm.weight") or name.endswith("layer_norm.weight")
               for name, s in specs.items() if s.kind is Kind.NORM)
    assert all(name.endswith(".bias") for name, s in specs.items() if s.kind is Kind.BIAS)
    created = NeoX(CONFIGS[0]).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    layer = created["params"]["layers_0"]
    assert (layer["input_layernorm"]["weight"] == 1).all() and (layer["attention"]["dense.bias"] == 0).all()
    assert float(jnp.std(layer["mlp"]["dense_h_to_4h.weight"])) == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("path", [("layers_0", "embed_in"), ("embed_in", "weight"),
                                  ("layers_x", "mlp", "dense_h_to_4h.bias"), ("layers_0", "mlp", "dense.weight"), ()])
def test_an_undeclared_path_is_refused_by_name(path):
    with pytest.raises(KeyError, match="no parameter at"):
        spec_at(path)


def test_a_model_parameter_missing_from_the_table_cannot_be_created():
    class Stray(nn.Module):
        @nn.compact
        def __call__(self, x):
            return declared_param(self, "gate.weight", CONFIGS[0], jnp.float32)

    with pytest.raises(KeyError, match="no parameter at gate.weight"):
        Stray().init(jax.random.PRNGKey(0), 0)


def test_split_sizes_are_the_axes_the_partition_specs_split():
    config = CONFIGS[0]
    assert params.split_sizes(config) == {"num_heads": 8, "vocab_size": 128, "intermediate_size": 96}


def test_both_divisibility_checks_name_the_size_that_does_not_divide():
    config = CONFIGS[0]  # 8 heads, vocabulary 128, MLP 96
    with pytest.raises(CheckpointError, match="intermediate_size 96 is not divisible by the 64 tensor-parallel ranks"):
        check_ranks_divide(config.replace(num_heads=64, hidden_size=64 * 8, vocab_size=128), 64)
    with pytest.raises(CheckpointError, match="num_heads 8 is not divisible by the 3 tensor-parallel ranks"):
        check_ranks_divide(config, 3)
    check_ranks_divide(config, 8)
    check_model_axis_divides(config, make_mesh(1, 1))
    with pytest.raises(ShardingError, match="vocab_size 102 is not divisible by the mesh's model axis"):
        check_model_axis_divides(config.replace(vocab_size=102), FakeMesh(4))


class FakeMesh:
    """Only the axis sizes, which is all the check reads (CPU tests have one device)."""

    def __init__(self, model: int):
        self.shape = {MODEL: model, "data": 1}

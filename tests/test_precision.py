"""The numerics policy stated in model.py, read from the compiled program: no result needed to notice a breach.

On CPU an fp32 matmul at DEFAULT precision computes the same numbers as at HIGHEST, so comparisons of logits
cannot tell that a GPU would run it in TF32; and an fp16 matmul that accumulates in fp16, or whose weights were
promoted to fp32 copies, is only a little less accurate on a tiny model. The lowered program says it exactly.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from neox_jax.model import KVCache, NeoX

from conftest import tiny_config

CONFIG = tiny_config(num_layers=2)
# Per layer: QKV, scores and weights x values over the cache and over the new tokens (2 + 2), output
# projection, MLP up and down; then the output head.
DOTS = CONFIG.num_layers * 8 + 1
DOT = re.compile(r"stablehlo\.dot_general .*?(precision = \[(\w+), (\w+)\])? : "
                 r"\(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>\) -> tensor<[\dx]*x(\w+)>")


def lowered_dots(dtype) -> list[tuple[str, ...]]:
    """(precision, lhs type, rhs type, result type) of every matmul of a cached forward pass, lowered for CUDA
    (where the precision matters; on CPU fp32 decode matmuls are native kernels, tests/test_cpu_kernels.py)."""
    module = NeoX(CONFIG, dtype)
    tokens, positions = jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None]
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, positions))["params"]
    cache = KVCache.init(CONFIG, 1, 8, dtype)
    text = jax.jit(lambda p, t, q, c: module.apply({"params": p}, t, q, c)).trace(
        params, tokens, positions, cache).lower(lowering_platforms=("cuda",)).as_text()
    lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    matches = [DOT.search(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m][:1]  # the pattern reads every line
    return [(m.group(2) or "DEFAULT", m.group(4), m.group(5), m.group(6)) for m in matches]


def test_fp32_matmuls_run_at_full_precision():
    """fp32 mode is Precision.HIGHEST on every matmul (no TF32 on GPUs), so fp32 comparisons mean something."""
    dots = lowered_dots(jnp.float32)
    assert len(dots) == DOTS
    assert dots == [("HIGHEST", "f32", "f32", "f32")] * DOTS


@pytest.mark.parametrize("dtype, name", [(jnp.float16, "f16"), (jnp.bfloat16, "bf16")])
def test_half_precision_matmuls_read_half_precision_operands_and_accumulate_in_fp32(dtype, name):
    """Weights and activations meet in the model dtype (no fp32 copy of a weight), accumulation is fp32."""
    dots = lowered_dots(dtype)
    assert len(dots) == DOTS
    assert dots == [("DEFAULT", name, name, "f32")] * DOTS


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_is_created_in_the_model_dtype(dtype, tied):
    """The abstract params (what the memory plan and the loader's placement are computed from) all carry the
    model dtype, and the logits are fp32 whatever it is."""
    config = tiny_config(num_layers=2, tie_word_embeddings=tied)
    module = NeoX(config, dtype)
    tokens, positions = jnp.zeros((1, 3), jnp.int32), jnp.arange(3)[None]
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, positions))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert len(leaves) == 3 + 12 * config.num_layers + (0 if tied else 1)  # embedding, final norm (2), head
    assert [jax.tree_util.keystr(path) for path, leaf in leaves if leaf.dtype != dtype] == []
    logits = jax.eval_shape(lambda p: module.apply({"params": p}, tokens, positions), params).logits
    assert logits.dtype == jnp.float32 and logits.shape == (1, 3, config.vocab_size)

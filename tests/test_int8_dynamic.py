"""int8-dynamic (docs/quantization.md): the activations quantized per row when each matmul runs, int8 x int8 sums in
int32. Its XLA formulation against an independent NumPy reference and against the exact product (the rounding
bound); the native kernel of each instruction set against the XLA formulation, bit for bit, over shapes, thread
counts and extreme rows; bad operands refused; the decode program calling the kernel (and XLA's path, with the
same logits, when switched off); the mode explicit, never a default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neox_jax import cpu_kernels
from neox_jax import quantize as quantization
from neox_jax.api import NeoXModel
from neox_jax.checkpoints.synthetic import random_tensors
from neox_jax.decode import Decoder
from neox_jax.quantize import MODES, QuantizedWeight, dynamic_int8_product
from neox_jax.weights import abstract_params, build_params

from conftest import tiny_config

KERNELS = cpu_kernels.unavailable_reason() is None
needs_kernels = pytest.mark.skipif(not KERNELS, reason=f"native CPU kernels: {cpu_kernels.unavailable_reason()}")
# The fastest instruction set this CPU runs the int8-dynamic kernel with and every one below it.
ISAS = list(cpu_kernels.ISAS[cpu_kernels.ISAS.index(cpu_kernels.best_int8_dynamic_isa()):]) if KERNELS else []

xla_product = jax.jit(lambda x, values, scale: dynamic_int8_product("mk,nk->mn", x, values, scale))


def operands(rng, m: int, n: int, k: int):
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    return x, rng.integers(-128, 128, (n, k)).astype(np.int8), rng.uniform(1e-3, 1, n).astype(np.float32)


def numpy_reference(x, values, scale):
    """The definition, independently: NumPy's IEEE fp32 for the quantization and epilogue, int64 sums."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    q = np.rint(x * (np.float32(127) / amax)).astype(np.int64)
    sums = q @ values.astype(np.int64).T
    return (sums.astype(np.float32) * (amax * np.float32(1 / 127))) * scale


def assert_equal_bits(got, want):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 37, 19), (3, 300, 512), (8, 129, 100), (64, 50, 257)])
def test_the_xla_formulation_is_the_definition(m, n, k):
    x, values, scale = operands(np.random.default_rng(m * n * k), m, n, k)
    assert_equal_bits(xla_product(x, values, scale), numpy_reference(x, values, scale))


def test_the_error_is_the_activation_rounding():
    """Against the exact product of x and the stored values: each activation moves by at most half its row's
    step (amax / 127), so |y - exact| <= step / 2 * sum_k |values| * scale (plus fp32 rounding); and the moves
    are uniform, so the error's RMS is step / sqrt(12) * sqrt(sum_k (values * scale)^2), as measured."""
    rng = np.random.default_rng(0)
    x, values, scale = operands(rng, 16, 200, 300)
    exact = (x.astype(np.float64) @ values.astype(np.float64).T) * scale
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    error = np.asarray(xla_product(x, values, scale)) - exact
    assert (np.abs(error) <= step / 2 * (np.abs(values).sum(axis=1) * scale) * (1 + 1e-5)).all()
    expected = step / np.sqrt(12) * np.sqrt(((values.astype(np.float64) * scale[:, None]) ** 2).sum(axis=1))
    assert 0.9 < np.sqrt((error ** 2).mean() / (expected ** 2).mean()) < 1.1


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 37, 19), (1, 300, 512), (2, 17, 64), (5, 64, 33),
                                     (8, 129, 100), (13, 8, 7), (64, 50, 257), (8, 1037, 512), (1, 20, 4101),
                                     (3, 9, 4101), (1, 1037, 32), (1, 9, 33), (1, 16, 96), (1, 7, 64)])
def test_kernel_equals_xla_bit_for_bit(isa, m, n, k):
    """k off the vector widths and the activation rows' padding, n off the channel tiles, full and partial row
    tiles, rows long enough that the kernel prefetches into L2 rather than L1; one row (the streaming tile, on
    AVX-512 in 256-bit vectors) with k a whole number of its vectors, one over, and under one: the int32 sums are
    exact and the fp32 epilogue the same two roundings, so every ISA equals XLA."""
    x, values, scale = operands(np.random.default_rng(m * n * k), m, n, k)
    assert_equal_bits(cpu_kernels.int8_dynamic_matmul(x, values, scale, isa=isa, threads=2),
                      xla_product(x, values, scale))


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 64), n=st.integers(1, 96), k=st.integers(1, 200), threads=st.integers(1, 4),
       isa=st.sampled_from(ISAS or ["portable"]), seed=st.integers(0, 99))
def test_kernel_equals_xla_for_any_shape_and_thread_count(m, n, k, threads, isa, seed):
    x, values, scale = operands(np.random.default_rng(seed), m, n, k)
    assert_equal_bits(cpu_kernels.int8_dynamic_matmul(x, values, scale, isa=isa, threads=threads),
                      xla_product(x, values, scale))


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("m", [1, 8])
def test_thread_counts_split_the_channels_without_gaps_or_overlap(threads, m):
    x, values, scale = operands(np.random.default_rng(threads), m, 2053, 512)
    assert_equal_bits(cpu_kernels.int8_dynamic_matmul(x, values, scale, threads=threads), xla_product(x, values, scale))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_extreme_rows(isa):
    """Zeros (scale 0: no division by it), denormals and the smallest normals (below MIN_ROW_MAX: zeros), fp32's
    largest magnitudes, tiny ones above MIN_ROW_MAX, one huge outlier, halves (amax 127: ties, to even), the weights' -128; a row
    holding inf or NaN gives NaN, in the kernel as in XLA."""
    tiny, huge = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    k = 70
    rows = [np.zeros(k), np.full(k, 1e-40), np.full(k, tiny), np.linspace(-huge, huge, k),
            np.linspace(-1, 1, k) * 1e-30, np.r_[1e30, np.ones(k - 1)], np.r_[127, np.arange(k - 1) - 34.5],
            np.r_[np.inf, np.ones(k - 1)], np.r_[np.nan, np.ones(k - 1)]]
    x = np.asarray(rows, np.float32)
    values = np.random.default_rng(0).integers(-128, 128, (33, k)).astype(np.int8)
    values[:, 0] = -128
    scale = np.random.default_rng(1).uniform(1e-3, 1, 33).astype(np.float32)
    got, want = np.asarray(cpu_kernels.int8_dynamic_matmul(x, values, scale, isa=isa)), np.asarray(xla_product(
        x, values, scale))
    assert_equal_bits(got, want)
    assert (got[:3] == 0).all() and np.isnan(got[-2:]).all() and np.isfinite(got[4:-2]).all()


@needs_kernels
@pytest.mark.parametrize("x, values, scale, message", [
    (np.ones((2, 8), np.float16), np.ones((4, 8), np.int8), np.ones(4, np.float32), "fp32 x and scale and int8"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.uint8), np.ones(4, np.float32), "int8 values"),
    (np.ones((2, 8), np.float32), np.ones((4, 9), np.int8), np.ones(4, np.float32), r"x \[m, k\], values \[n, k\]"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(5, np.float32), r"scale \[n\]"),
    (np.ones((1, 2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float32), r"x \[m, k\]"),
    (np.ones((1, 2 ** 17 + 1), np.float32), np.ones((1, 2 ** 17 + 1), np.int8), np.ones(1, np.float32),
     "is over 131072"),
])
def test_bad_operands_are_refused_with_what_was_expected(x, values, scale, message):
    with pytest.raises(ValueError, match=message):
        cpu_kernels.int8_dynamic_matmul(x, values, scale)


@needs_kernels
def test_the_kernel_checks_its_operands_itself():
    """Called past the Python checks, the handler refuses mismatched shapes, a k whose int32 sums could overflow
    and an unknown ISA with its own messages."""
    cpu_kernels.best_isa()  # registers the targets
    call = jax.ffi.ffi_call(cpu_kernels.INT8_DYNAMIC_TARGET, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    no_bias = np.ones(0, np.float32)
    with pytest.raises(Exception, match=r"expected x \[m, k\], w \[n, k\], scale \[n\], bias \[n\] or \[0\]"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(3, np.float32), no_bias, isa="portable",
             threads=np.int64(0), gelu=False)
    with pytest.raises(Exception, match=r"bias \[5\]"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float32), np.ones(5, np.float32),
             isa="portable", threads=np.int64(0), gelu=False)
    with pytest.raises(Exception, match="is not one of avx512 \\(with VNNI\\), avx2, portable"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float32), no_bias, isa="neon",
             threads=np.int64(0), gelu=False)
    wide = jax.ffi.ffi_call(cpu_kernels.INT8_DYNAMIC_TARGET, jax.ShapeDtypeStruct((1, 1), jnp.float32))
    with pytest.raises(Exception, match="k = 131073 is over 131072"):
        np.asarray(wide(np.ones((1, 2 ** 17 + 1), np.float32), np.ones((1, 2 ** 17 + 1), np.int8),
                        np.ones(1, np.float32), no_bias, isa="portable", threads=np.int64(0), gelu=False))


# ---- the model ----

CONFIG = tiny_config(vocab_size=64)


@pytest.fixture(scope="module")
def dynamic_params():
    return build_params(CONFIG, random_tensors(CONFIG, seed=3).items(), jnp.float32, progress=False,
                        quantize="int8-dynamic")


def decode(params, quantize="int8-dynamic") -> tuple[list, str, np.ndarray]:
    """Greedy tokens of two prompts, the compiled decode program that made them and the prompts' logits."""
    model = NeoXModel(CONFIG, params, quantize=quantize)
    decoder = Decoder(model.module, model.params)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    tokens = decoder.generate(prompts, 8, stop_token=None).tokens
    (executable,) = decoder._decode._executables.values()
    return tokens, executable.as_text(), np.asarray(model.logits(np.asarray(prompts)))


def test_the_weights_are_int8_s_and_only_the_matmul_differs(dynamic_params):
    int8 = build_params(CONFIG, random_tensors(CONFIG, seed=3).items(), jnp.float32, progress=False, quantize="int8")
    qkv, int8_qkv = (p["layers_0"]["attention"]["query_key_value.weight"] for p in (dynamic_params, int8))
    assert qkv.dynamic_activations and not int8_qkv.dynamic_activations
    np.testing.assert_array_equal(qkv.values, int8_qkv.values)
    np.testing.assert_array_equal(qkv.scale, int8_qkv.scale)
    abstract = abstract_params(CONFIG, jnp.float32, quantize="int8-dynamic")
    assert jax.tree.structure(abstract) == jax.tree.structure(dynamic_params)  # the flag is static structure


@needs_kernels
def test_the_decode_program_calls_the_kernel_and_switched_off_xla_s_path_with_the_same_logits(dynamic_params,
                                                                                               monkeypatch):
    """Every matmul of a decode step is the int8-dynamic custom call (4 per layer and the head), none the
    weight-only one; with NEOX_JAX_CPU_KERNELS=0 none is, and the tokens are the same. The logits agree to fp32
    rounding, not bit for bit (measured: a few ulps): in the model XLA fuses its formulation with the ops around
    it (the LayerNorm before, the bias after), which a custom call's boundary keeps apart, and the fused code
    rounds a few of them differently."""
    native, hlo, native_logits = decode(dynamic_params)
    assert hlo.count(f'custom_call_target="{cpu_kernels.INT8_DYNAMIC_TARGET}"') == 4 * CONFIG.num_layers + 1, hlo
    assert f'"{cpu_kernels.TARGET}"' not in hlo
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    xla, hlo, xla_logits = decode(dynamic_params)
    assert cpu_kernels.INT8_DYNAMIC_TARGET not in hlo
    assert native == xla
    np.testing.assert_allclose(native_logits, xla_logits, rtol=0, atol=1e-5 * np.abs(xla_logits).max())


def test_xla_s_cpu_fallback_takes_the_weight_in_row_blocks_with_the_same_bits(monkeypatch):
    """Kernels switched off: XLA:CPU's path converts `CPU_BLOCK` weights at a time (no weight-sized buffer), as
    int8's fallback does, and the int32 sums do not depend on the blocking."""
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    x, values, scale = operands(np.random.default_rng(0), 3, 301, 512)  # 301 channels: a partial last block
    w = QuantizedWeight(jnp.asarray(values), jnp.asarray(scale), dynamic_activations=True)
    blocked = jax.jit(lambda x, w: quantization.quantized_contract("bd,fd->bf", x, w, None))
    assert "stablehlo.while" in blocked.lower(x, w).as_text()
    assert_equal_bits(blocked(x, w), xla_product(x, values, scale))


def test_a_program_lowered_for_cuda_holds_the_int8_dot():
    """On GPU the XLA formulation: an s8 x s8 dot accumulated in s32, no custom call."""
    w = QuantizedWeight(jnp.ones((256, 64), jnp.int8), jnp.ones((256,), jnp.float32), dynamic_activations=True)
    traced = jax.jit(lambda x, w: quantization.quantized_contract("btd,fd->btf", x, w, None)).trace(
        jnp.ones((2, 3, 64), jnp.float32), w)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert cpu_kernels.INT8_DYNAMIC_TARGET not in cuda
    assert "tensor<2x3x64xi8>, tensor<256x64xi8>) -> tensor<2x3x256xi32>" in cuda, cuda


def test_the_mode_is_never_a_default(dynamic_params):
    """int8 stays weight-only; int8-dynamic exists only when named, and a spec it cannot quantize by rows is
    refused rather than computed some other way."""
    assert not MODES["int8"].dynamic_activations and MODES["int8-dynamic"].dynamic_activations
    assert [m for m in MODES.values() if m.dynamic_activations] == [MODES["int8-dynamic"]]
    assert QuantizedWeight(jnp.ones((4, 8), jnp.int8), jnp.ones(4)).dynamic_activations is False
    w = QuantizedWeight(jnp.ones((4, 8), jnp.int8), jnp.ones(4, jnp.float32), dynamic_activations=True)
    with pytest.raises(ValueError, match="x's last axis must be the contracted one"):
        quantization.quantized_contract("kb,fk->bf", jnp.ones((8, 2)), w, None)


def test_the_commands_take_it_and_refuse_a_bad_mode(capsys):
    from neox_jax.eval import take_quantize
    from neox_jax.generate import main

    assert take_quantize(["--quantize", "int8-dynamic", "--tasks", "t"]) == (["--tasks", "t"], "int8-dynamic")
    with pytest.raises(quantization.QuantizationError, match="one of int8, fp8, int8-dynamic, got 'int8-dyn'"):
        take_quantize(["--quantize=int8-dyn"])
    assert main(["--demo", "--quantize", "int8-dynamic", "--prompt", "The", "--max-new-tokens", "2"]) == 0
    assert "int8-dynamic]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--quantize", "int8dynamic"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --quantize: invalid choice: 'int8dynamic'")

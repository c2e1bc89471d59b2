"""The native CPU matmul kernels (neox_jax.cpu_kernels): each instruction set's kernels against XLA's product over
shapes, weight dtypes and thread counts; bad operands refused with a message; the compiled decode program calling
the kernel when it is built, and XLA's path (with one log line) when it is not or is switched off."""

import logging
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neox_jax import cpu_kernels
from neox_jax import quantize as quantization
from neox_jax.api import NeoXModel
from neox_jax.checkpoints.synthetic import random_tensors
from neox_jax.decode import Decoder
from neox_jax.quantize import QuantizedWeight
from neox_jax.weights import build_params

from conftest import tiny_config

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                reason=f"native CPU kernels: {cpu_kernels.unavailable_reason()}")

# The fastest instruction set this CPU runs and every one below it (a CPU with AVX-512 runs the AVX2 kernels too).
ISAS = list(cpu_kernels.ISAS[cpu_kernels.ISAS.index(cpu_kernels.best_isa()):]) \
    if cpu_kernels.unavailable_reason() is None else []
DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}


def operands(rng, m: int, n: int, k: int, dtype):
    """x, stored values over the whole of the dtype's range (e4m3's subnormals included) and scales."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    if dtype == np.int8:
        values = rng.integers(-128, 128, (n, k)).astype(np.int8)
    else:
        values = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-3, 2.6, (n, k))).clip(-448, 448).astype(dtype)
    return x, values, rng.uniform(1e-3, 1, n).astype(np.float32)


def assert_matches_xla(got, x, values, scale):
    """XLA's product (fp32 values in an fp32 matmul at full precision, scaled after), to fp32 rounding: two
    summation orders of k products differ by at most ~2k ulps of the sum of their magnitudes."""
    want = jnp.einsum("mk,nk->mn", x, values.astype(np.float32), precision="highest") * scale
    bound = 2 * x.shape[1] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(values.astype(np.float32)).T) * scale
    np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(want)), bound + 1e-30)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 37, 19), (1, 300, 512), (2, 17, 16), (5, 64, 33),
                                     (8, 129, 100), (13, 8, 7), (64, 50, 257), (1, 20, 4101), (3, 9, 4101)])
def test_kernel_equals_xla_over_shapes(isa, mode, m, n, k):
    """Out not a multiple of the vector width or of the channel tile, k with a partial last vector, 1..64 rows
    (full and partial row tiles), rows long enough that the kernel prefetches into L2 rather than L1."""
    x, values, scale = operands(np.random.default_rng(m * n * k), m, n, k, DTYPES[mode])
    assert_matches_xla(cpu_kernels.weight_matmul(x, values, scale, isa=isa, threads=2), x, values, scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 37, 19), (3, 300, 512), (8, 129, 100), (64, 50, 257),
                                     (1, 20, 1030)])
def test_fp32_kernel_equals_xla_over_shapes(isa, m, n, k):
    rng = np.random.default_rng(m * n * k)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    assert_matches_xla(cpu_kernels.matmul(x, w, isa=isa, threads=2), x, w, np.ones(n, np.float32))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 64), n=st.integers(1, 96), k=st.integers(1, 96), threads=st.integers(1, 4),
       isa=st.sampled_from(ISAS or ["portable"]), mode=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 99))
def test_kernel_equals_xla_for_any_shape_and_thread_count(m, n, k, threads, isa, mode, seed):
    x, values, scale = operands(np.random.default_rng(seed), m, n, k, DTYPES[mode])
    assert_matches_xla(cpu_kernels.weight_matmul(x, values, scale, isa=isa, threads=threads), x, values, scale)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_counts_split_the_channels_without_gaps_or_overlap(threads):
    """A product large enough to be split into tasks, every channel's scale distinct: a channel computed twice
    with the wrong scale, or left unwritten, would show."""
    x, values, scale = operands(np.random.default_rng(threads), 8, 1037, 512, np.int8)
    assert_matches_xla(cpu_kernels.weight_matmul(x, values, scale, threads=threads), x, values, scale)


@pytest.mark.parametrize("kernel", [cpu_kernels.weight_matmul, cpu_kernels.int8_dynamic_matmul],
                         ids=["weight-only", "int8-dynamic"])
def test_concurrent_calls_each_get_their_own_result(kernel):
    """Two threads calling at once (XLA running two programs or devices): the second runs on its own thread
    (and the int8-dynamic kernel quantizes its x into that thread's own buffer)."""
    rng = np.random.default_rng(0)
    cases = [operands(rng, 4, 777, 256, np.int8) for _ in range(2)]
    product = jax.jit(kernel)
    wants = [np.asarray(product(*case)) for case in cases]
    failures = []

    def call(case, want):
        for _ in range(50):
            if not np.array_equal(np.asarray(product(*case)), want):
                failures.append(case)

    workers = [threading.Thread(target=call, args=pair) for pair in zip(cases, wants)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


@pytest.mark.parametrize("x, values, scale, message", [
    (np.ones((2, 8), np.float16), np.ones((4, 8), np.int8), np.ones(4, np.float32), "fp32 x and scale"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.float32), np.ones(4, np.float32), "int8 or float8_e4m3fn"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.int16), np.ones(4, np.float32), "int8 or float8_e4m3fn"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float64), "fp32 x and scale"),
    (np.ones((2, 8), np.float32), np.ones((4, 9), np.int8), np.ones(4, np.float32), r"x \[m, k\], values \[n, k\]"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(5, np.float32), r"scale \[n\]"),
    (np.ones((1, 2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float32), r"x \[m, k\]"),
])
def test_bad_operands_are_refused_with_what_was_expected(x, values, scale, message):
    with pytest.raises(ValueError, match=message):
        cpu_kernels.weight_matmul(x, values, scale)


@pytest.mark.parametrize("x, w, message", [
    (np.ones((2, 8), np.float16), np.ones((4, 8), np.float32), "fp32 x and w"),
    (np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), "fp32 x and w"),
    (np.ones((2, 8), np.float32), np.ones((4, 7), np.float32), r"x \[m, k\] and w \[n, k\]"),
])
def test_bad_fp32_operands_are_refused(x, w, message):
    with pytest.raises(ValueError, match=message):
        cpu_kernels.matmul(x, w)


def test_bad_isa_and_threads_are_refused():
    x, values, scale = operands(np.random.default_rng(0), 1, 4, 4, np.int8)
    with pytest.raises(ValueError, match="isa must be one of avx512, avx2, portable"):
        cpu_kernels.weight_matmul(x, values, scale, isa="neon")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        cpu_kernels.weight_matmul(x, values, scale, threads=-1)


def test_the_kernel_checks_its_operands_itself():
    """Called past the Python checks (another program naming the target), the handler refuses mismatched
    shapes with its own message rather than reading out of bounds."""
    cpu_kernels.best_isa()  # registers the target
    call = jax.ffi.ffi_call(cpu_kernels.TARGET, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    no_bias = np.ones(0, np.float32)
    with pytest.raises(Exception, match=r"expected x \[m, k\], w \[n, k\], scale \[n\], bias \[n\] or \[0\]"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(3, np.float32), no_bias, isa="avx2",
             threads=np.int64(0), gelu=False)
    with pytest.raises(Exception, match=r"bias \[3\]"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.int8), np.ones(4, np.float32), np.ones(3, np.float32),
             isa="avx2", threads=np.int64(0), gelu=True)
    with pytest.raises(Exception, match="weights must be int8 or float8_e4m3fn"):
        call(np.ones((2, 8), np.float32), np.ones((4, 8), np.uint8), np.ones(4, np.float32), no_bias, isa="portable",
             threads=np.int64(0), gelu=False)


# ---- the epilogue: a bias and the exact GELU applied to the kernels' outputs ----

KERNELS = {"int8": "weight-only", "fp8": "weight-only", "fp32": "fp32", "int8-dynamic": "int8-dynamic"}


def kernel_operands(rng, kind: str, m: int, n: int, k: int):
    """(kernel, its weight operands) for `kind` of KERNELS."""
    if kind == "fp32":
        return cpu_kernels.matmul, (rng.standard_normal((n, k)).astype(np.float32) * 0.1,)
    values, scale = operands(rng, 1, n, k, DTYPES["fp8" if kind == "fp8" else "int8"])[1:]
    scale = scale * (0.05 if kind == "fp8" else 0.01)  # outputs of a few units: GELU's curved part
    kernel = cpu_kernels.int8_dynamic_matmul if kind == "int8-dynamic" else cpu_kernels.weight_matmul
    return kernel, (values, scale)


def ulps_apart(a, b):
    """|a - b| in units in the last place of fp32 (counted across zero)."""
    def ordered(v):
        bits = np.asarray(v, np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return np.abs(ordered(a) - ordered(b))


GELU_ULPS = 16  # observed up to 9: see assert_gelu_matches


def assert_gelu_matches(got, want):
    """The kernels' GELU against XLA's jax.nn.gelu(approximate=False): the same erfc polynomials in the same order,
    but each exponential within 1 ulp of its own and XLA fusing multiply-adds the kernels round twice (they run the
    same plain fp32 operations on every CPU): a few ulps apart; results XLA flushes to zero (|x| < 1e-37) aside."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    tiny = finite & (np.abs(want) < 1e-37)
    assert np.abs(got[tiny]).max(initial=0) < 1e-37
    normal = finite & ~tiny
    assert ulps_apart(got[normal], want[normal]).max(initial=0) <= GELU_ULPS


def test_the_epilogue_s_gelu_is_xla_s_over_the_whole_range():
    """Every value the GELU meets, through a product that passes it on exactly (x = 1, k = 1): a dense grid over
    [-30, 30] (both erfc branches and their polynomials, the exponential down to its underflow), huge values,
    infinities, NaN and zeros."""
    rng = np.random.default_rng(0)
    values = np.concatenate([np.linspace(-30, 30, 200_001, dtype=np.float32),
                             (rng.standard_normal(50_000) * 3).astype(np.float32),
                             np.array([0, 1, -1, 2, -2, 1e-30, -1e-30, -13.3, 3e38, -3e38, np.inf, -np.inf, np.nan],
                                      np.float32)])
    got = jax.jit(lambda w: cpu_kernels.matmul(np.ones((1, 1), np.float32), w, gelu=True))(values[:, None])[0]
    assert_gelu_matches(got, jax.jit(lambda v: jax.nn.gelu(v, approximate=False))(values))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("m, n, k", [(1, 37, 19), (3, 300, 512), (8, 129, 100), (1, 1037, 512)])
def test_the_epilogue_is_xla_s_on_the_kernel_s_own_product(isa, kind, m, n, k):
    """The bias is one fp32 addition, bit for bit XLA's; bias then GELU, to a few ulps; on every ISA, with the
    channels split over threads (n = 1037: tasks of whole channel blocks and a partial last vector)."""
    if kind == "int8-dynamic" and isa == "avx512" and cpu_kernels.best_int8_dynamic_isa() != "avx512":
        pytest.skip("int8-dynamic's avx512 kernels need VNNI")
    rng = np.random.default_rng(m * n * k)
    kernel, weight = kernel_operands(rng, kind, m, n, k)
    x, bias = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    product = np.asarray(kernel(x, *weight, isa=isa, threads=2))
    np.testing.assert_array_equal(kernel(x, *weight, bias, isa=isa, threads=2), product + bias)
    assert_gelu_matches(kernel(x, *weight, bias, gelu=True, isa=isa, threads=2),
                        cpu_kernels.xla_epilogue(product, bias, gelu=True))


def test_the_epilogue_keeps_int8_dynamic_s_isas_bit_for_bit_equal():
    """int8-dynamic's kernels give the same bits on every ISA (exact int32 sums); the epilogue, plain fp32 in one
    translation unit for every ISA, keeps them equal."""
    rng = np.random.default_rng(1)
    kernel, weight = kernel_operands(rng, "int8-dynamic", 4, 300, 512)
    x, bias = rng.standard_normal((4, 512)).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    isas = cpu_kernels.ISAS[cpu_kernels.ISAS.index(cpu_kernels.best_int8_dynamic_isa()):]
    results = [np.asarray(kernel(x, *weight, bias, gelu=True, isa=isa, threads=2)) for isa in isas]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_a_bad_bias_is_refused():
    x, values, scale = operands(np.random.default_rng(0), 1, 4, 4, np.int8)
    with pytest.raises(ValueError, match=r"bias must be fp32 \[n\] = \[4\], got float32 \(3,\)"):
        cpu_kernels.weight_matmul(x, values, scale, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="bias must be fp32"):
        cpu_kernels.matmul(x, np.ones((4, 4), np.float32), np.ones(4, np.float16))


# ---- the model: the kernel in the decode program, and the fallback ----

CONFIG = tiny_config(vocab_size=64)


@pytest.fixture(scope="module")
def int8_params():
    return build_params(CONFIG, random_tensors(CONFIG, seed=3).items(), jnp.float32, progress=False, quantize="int8")


def decode(params) -> tuple[list, str]:
    """Greedy tokens of two prompts and the compiled decode program that made them."""
    model = NeoXModel(CONFIG, params, quantize="int8")
    decoder = Decoder(model.module, model.params)
    tokens = decoder.generate([[1, 2, 3, 4], [5, 6, 7, 8]], 8, stop_token=None).tokens
    (executable,) = decoder._decode._executables.values()
    return tokens, executable.as_text()


def test_the_decode_program_calls_the_kernel_and_switched_off_xla_s_path_with_the_same_tokens(int8_params,
                                                                                                monkeypatch):
    """Every quantized matmul of a decode step is a custom call (4 per layer and the head); with
    NEOX_JAX_CPU_KERNELS=0 none is, and the greedy tokens are the same."""
    native, hlo = decode(int8_params)
    assert hlo.count(f'custom_call_target="{cpu_kernels.TARGET}"') == 4 * CONFIG.num_layers + 1, hlo
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    xla, hlo = decode(int8_params)
    assert cpu_kernels.TARGET not in hlo and "while" in hlo  # XLA's blocked loop
    assert native == xla


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_the_up_projection_s_bias_and_exact_gelu_run_in_the_kernel(activation, monkeypatch):
    """The MLP's up-projection hands its bias to the kernel, and the exact GELU too (the tanh form stays XLA's):
    the decode program's calls say so, and the greedy tokens equal XLA's path's."""
    config = tiny_config(vocab_size=64, activation=activation)
    params = build_params(config, random_tensors(config, seed=3).items(), jnp.float32, progress=False,
                          quantize="int8")

    def run():
        model = NeoXModel(config, params, quantize="int8")
        decoder = Decoder(model.module, model.params)
        tokens = decoder.generate([[1, 2, 3, 4], [5, 6, 7, 8]], 8, stop_token=None).tokens
        (executable,) = decoder._decode._executables.values()
        return tokens, executable.as_text()

    native, hlo = run()
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{cpu_kernels.TARGET}"' in line]
    with_bias = [line for line in calls if f"f32[{config.intermediate_size}]{{0}}}}" in line]
    assert len(with_bias) == config.num_layers, calls
    assert sum("gelu = true" in line for line in calls) == (config.num_layers if activation == "gelu" else 0)
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    assert run()[0] == native


def test_an_fp32_model_decodes_with_the_fp32_kernel_and_prefills_with_xla(monkeypatch):
    """The decode step's matmuls (one row per sequence) call the fp32 kernel, the prefill's layers (more rows
    than FP32_MAX_ROWS) XLA's; greedy tokens equal XLA's own."""
    monkeypatch.setattr(cpu_kernels, "FP32_MAX_ROWS", 4)
    params = build_params(CONFIG, random_tensors(CONFIG, seed=3).items(), jnp.float32, progress=False)
    prompts = [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]]  # a prefill of 10 rows

    def run():
        model = NeoXModel(CONFIG, params)
        decoder = Decoder(model.module, model.params)
        tokens = decoder.generate(prompts, 6, stop_token=None).tokens
        (decode_step,) = decoder._decode._executables.values()
        (prefill,) = decoder._prefill._executables.values()
        return tokens, decode_step.as_text(), prefill.as_text()

    native, decode_step, prefill = run()
    assert decode_step.count(f'custom_call_target="{cpu_kernels.FP32_TARGET}"') == 4 * CONFIG.num_layers + 1
    assert prefill.count(f'custom_call_target="{cpu_kernels.FP32_TARGET}"') == 1  # the head: each row's last token
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    xla, decode_step, _ = run()
    assert cpu_kernels.FP32_TARGET not in decode_step and native == xla


def test_without_the_extension_the_model_falls_back_and_says_so_once(int8_params, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_extension", lambda: None)
    cpu_kernels._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        _, hlo = decode(int8_params)
        assert not cpu_kernels.enabled()
    assert cpu_kernels.TARGET not in hlo
    lines = [r.getMessage() for r in caplog.records if r.name == cpu_kernels.__name__]
    assert len(lines) == 1 and "not built" in lines[0] and "XLA's path" in lines[0], lines
    cpu_kernels._log_fallback.cache_clear()


def test_a_program_lowered_for_cuda_keeps_xla_s_matmul():
    """The platform the program is lowered for picks the branch: the custom call is the CPU program's only."""
    w = QuantizedWeight(jnp.ones((256, 64), jnp.int8), jnp.ones((256,), jnp.float32))
    traced = jax.jit(lambda x, w: quantization.quantized_contract("btd,fd->btf", x, w, None)).trace(
        jnp.ones((2, 3, 64), jnp.float32), w)
    cpu, cuda = (traced.lower(lowering_platforms=(platform,)).as_text() for platform in ("cpu", "cuda"))
    assert cpu_kernels.TARGET in cpu
    assert cpu_kernels.TARGET not in cuda and "tensor<256x64xi8>) -> tensor<256x64xf32>" in cuda


@pytest.mark.parametrize("quantized", [False, True])
def test_gradients_through_the_kernels_equal_xla_s(quantized, monkeypatch):
    """An FFI call has no derivative of its own: the model's matmuls that run the kernels are differentiated as
    XLA's product (`with_xla_derivative`), so `jax.grad` (neox_jax.train) works and agrees with the XLA path."""
    from neox_jax.model import contract

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(24), jnp.float32)
    if quantized:
        values, scale = operands(rng, 1, 24, 40, DTYPES["int8"])[1:]
        w = QuantizedWeight(jnp.asarray(values), jnp.asarray(scale))

    def loss(x, w, bias):  # with the epilogue, as the MLP's up-projection
        return jnp.sum(contract("bi,oi->bo", x, w, jnp.float32) ** 2) / 2 + \
            jnp.sum(contract("bi,oi->bo", x, w, jnp.float32, bias, gelu=True) ** 2) / 2

    argnums = (0, 2) if quantized else (0, 1, 2)
    native = jax.grad(loss, argnums)(x, w, bias)
    assert "custom_call" in jax.jit(jax.grad(loss, argnums)).lower(x, w, bias).as_text()
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    for got, want in zip(native, jax.grad(loss, argnums)(x, w, bias)):
        # The primal products differ by fp32 rounding (another summation order), which the backward pass's
        # cancellations can magnify: agreement is judged against the gradient's scale.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())

"""The native decode attention (neox_jax.cpu_kernels.decode_attention): each instruction set's kernel against XLA's
path (neox_jax.model.attend, the definition) over shapes, empty slots, all-masked rows and thread counts; a query's
output independent of the queries beside it and of where its keys lie; the compiled decode program calling it, the
prefill and GPU programs and NEOX_JAX_CPU_KERNELS=0 keeping XLA's path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neox_jax import cpu_kernels, speculative
from neox_jax.api import NeoXModel
from neox_jax.checkpoints.synthetic import random_tensors
from neox_jax.decode import Decoder
from neox_jax.model import attend, attention
from neox_jax.weights import build_params

from conftest import tiny_config

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                reason=f"native CPU kernels: {cpu_kernels.unavailable_reason()}")

ISAS = list(cpu_kernels.ISAS[cpu_kernels.ISAS.index(cpu_kernels.best_isa()):]) \
    if cpu_kernels.unavailable_reason() is None else []
EPS = np.finfo(np.float32).eps


def operands(rng, b: int, n: int, s: int, t: int, h: int, *, empty: float = 0.3, peak: float = 1.0):
    """q, positions, cache_k, cache_v, cache_positions, k, v: a cache with a share `empty` of empty slots (-1) and
    the rest at positions up to 2S, queries at positions -1 (padding: every key masked) .. 2S; `peak` scales q."""
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    cache_positions = np.where(rng.random((b, s)) < empty, -1, rng.integers(0, 2 * s + 1, (b, s))).astype(np.int32)
    positions = rng.integers(-1, 2 * s + 1, (b, t)).astype(np.int32)
    return (peak * normal(b, n, t, h), positions, normal(b, n, s, h), normal(b, n, s, h), cache_positions,
            normal(b, n, t, h), normal(b, n, t, h))


def xla(q, positions, cache_k, cache_v, cache_positions, k, v):
    return attend(q, positions, [(cache_k, cache_v, cache_positions), (k, v, positions)], jnp.float32)


def assert_matches_xla(got, ops):
    """XLA's path to fp32 rounding: the scores' summation orders differ by ~H ulps of |q| |k|, which the softmax
    turns into relative errors of the weights, and the weighted sums by ~S ulps of the largest value."""
    q, _, cache_k, cache_v, _, k, v = ops
    keys, values = np.concatenate([cache_k, k], axis=2), np.concatenate([cache_v, v], axis=2)
    score_error = q.shape[-1] * EPS * np.einsum("bnth,bnsh->bnt", np.abs(q), np.abs(keys)).max() / np.sqrt(q.shape[-1])
    bound = 4 * (score_error + keys.shape[2] * EPS) * np.abs(values).max() + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(xla(*ops))), bound)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b, n, s, t, h", [(1, 1, 1, 1, 1), (1, 16, 128, 1, 64), (8, 4, 130, 1, 80),
                                           (2, 3, 37, 3, 64), (3, 2, 9, 4, 5), (5, 2, 33, 2, 17), (8, 2, 64, 4, 80),
                                           (2, 2, 40, 17, 7), (1, 2, 2048, 1, 64)])
@pytest.mark.parametrize("peak", [1.0, 4.0])
def test_kernel_equals_xla_over_shapes(isa, b, n, s, t, h, peak):
    """Head sizes of whole vectors (64, 80), partial ones and a single float; partial key tiles; 1..17 queries
    (partial query tiles); empty slots and all-masked rows (padding queries); flat and peaked softmaxes."""
    ops = operands(np.random.default_rng(b * n * s * t * h), b, n, s, t, h, peak=peak)
    assert_matches_xla(cpu_kernels.decode_attention(*ops, isa=isa, threads=2), ops)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 8), n=st.integers(1, 6), s=st.integers(1, 80), t=st.integers(1, 5), h=st.integers(1, 96),
       threads=st.integers(1, 4), isa=st.sampled_from(ISAS or ["portable"]), empty=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 99))
def test_kernel_equals_xla_for_any_shape_and_thread_count(b, n, s, t, h, threads, isa, empty, seed):
    ops = operands(np.random.default_rng(seed), b, n, s, t, h, empty=empty)
    assert_matches_xla(cpu_kernels.decode_attention(*ops, isa=isa, threads=threads), ops)


@pytest.mark.parametrize("isa", ISAS)
def test_a_query_that_sees_no_key_averages_every_value_as_xla_s_path(isa):
    """Every score MASKED in XLA's path: each weight exp(0) = 1, so the output is the mean of all the values,
    empty slots' included."""
    rng = np.random.default_rng(0)
    q, _, cache_k, cache_v, _, k, v = operands(rng, 2, 3, 20, 2, 8)
    ops = (q, np.full((2, 2), -1, np.int32), cache_k, cache_v, np.full((2, 20), -1, np.int32), k, v)
    got = np.asarray(cpu_kernels.decode_attention(*ops, isa=isa))
    mean = np.concatenate([cache_v, v], axis=2).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(got, np.broadcast_to(mean, got.shape), rtol=1e-6, atol=1e-6)
    assert_matches_xla(got, ops)


@pytest.mark.parametrize("isa", ISAS)
def test_a_nan_score_makes_its_query_s_output_nan_as_xla_s_path(isa):
    """A NaN in a visible key wins XLA's max and poisons that query's softmax: the kernel's too, and only that
    query's (the serve engine ends a row whose logits are not finite)."""
    ops = operands(np.random.default_rng(4), 1, 2, 9, 2, 8, empty=0.0)
    q, positions, cache_k, cache_v, cache_positions, k, v = ops
    positions[:] = [[0, 100]]  # query 0 sees only its own new token; query 1 sees every key
    cache_positions[:] = np.arange(1, 10)
    cache_k[0, 1, 3, 2] = np.nan
    got = np.asarray(cpu_kernels.decode_attention(*ops, isa=isa))
    want = np.asarray(xla(*ops))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 1, 1]).all() and not np.isnan(got[0, 1, 0]).any() and not np.isnan(got[0, 0]).any()


@pytest.mark.parametrize("isa", ISAS)
def test_a_query_gets_the_same_bits_alone_or_beside_others_wherever_its_keys_lie(isa):
    """A speculative pass's queries (T = 4 new tokens after 6 cached, empty slots after them) against one-token
    steps that see the same keys, the earlier new tokens by then written to the cache: equal bit for bit (the
    kernel's sums run one key at a time in key order; an invisible key adds an exact zero)."""
    rng = np.random.default_rng(1)
    b, n, s, t, h, filled = 2, 3, 16, 4, 72, 6
    q, _, cache_k, cache_v, _, k, v = operands(rng, b, n, s, t, h)
    cache_positions = np.where(np.arange(s) < filled, np.arange(s), -1).astype(np.int32)[None].repeat(b, 0)
    positions = np.arange(filled, filled + t, dtype=np.int32)[None].repeat(b, 0)
    together = np.asarray(cpu_kernels.decode_attention(q, positions, cache_k, cache_v, cache_positions, k, v, isa=isa))
    for i in range(t):
        def written(cache, new):  # the new tokens before i in the cache's slots after the filled ones
            return np.concatenate([cache[:, :, :filled], new[:, :, :i], cache[:, :, filled + i:]], axis=2)  # noqa: B023

        step_positions = np.where(np.arange(s) < filled + i, np.arange(s), -1).astype(np.int32)[None].repeat(b, 0)
        alone = cpu_kernels.decode_attention(q[:, :, i:i + 1], positions[:, i:i + 1], written(cache_k, k),
                                             written(cache_v, v), step_positions, k[:, :, i:i + 1], v[:, :, i:i + 1],
                                             isa=isa)
        np.testing.assert_array_equal(np.asarray(alone)[:, :, 0], together[:, :, i])


def test_thread_counts_give_the_same_bits():
    """Each (batch, head) pair is one thread's, computed the same way whichever."""
    ops = operands(np.random.default_rng(2), 4, 8, 300, 2, 64)
    results = [np.asarray(cpu_kernels.decode_attention(*ops, threads=threads)) for threads in (1, 2, 3, 7)]
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


def test_bad_operands_are_refused_with_what_was_expected():
    ops = list(operands(np.random.default_rng(0), 2, 2, 8, 1, 4))
    with pytest.raises(ValueError, match=r"q, k, v \[B, N, T, H\], positions \[B, T\]"):
        cpu_kernels.decode_attention(*ops[:4], ops[4][:, :7], *ops[5:])
    with pytest.raises(ValueError, match=r"got q \(1, 4\)"):
        cpu_kernels.decode_attention(ops[0][0, 0], *ops[1:])
    with pytest.raises(ValueError, match="fp32 q, k, v, cache_k, cache_v and int32 positions"):
        cpu_kernels.decode_attention(ops[0].astype(np.float16), *ops[1:])
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_kernels.decode_attention(*ops, isa="neon")


def test_the_kernel_checks_its_operands_itself():
    """Called past the Python checks, the handler refuses mismatched shapes rather than reading out of bounds."""
    cpu_kernels.best_isa()  # registers the target
    q, positions, cache_k, cache_v, cache_positions, k, v = operands(np.random.default_rng(0), 2, 2, 8, 1, 4)
    call = jax.ffi.ffi_call(cpu_kernels.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    with pytest.raises(Exception, match=r"expected q, k, v \[B, N, T, H\]"):
        call(q, positions, cache_k, cache_v, cache_positions[:, :7], k, v, isa="portable", threads=np.int64(0))


def test_a_speculative_pass_runs_the_one_token_step_s_kernel():
    """A verify pass has up to MAX_DRAFT_TOKENS + 1 queries: it must take the kernel the one-token step takes."""
    assert cpu_kernels.DECODE_MAX_QUERIES >= speculative.MAX_DRAFT_TOKENS + 1


def test_a_program_lowered_for_cuda_keeps_xla_s_attention():
    ops = operands(np.random.default_rng(0), 1, 2, 8, 1, 4)
    q, positions, cache_k, cache_v, cache_positions, k, v = ops
    traced = jax.jit(lambda *ops: attention(ops[0], ops[1], [ops[2:5], (*ops[5:], ops[1])], jnp.float32)).trace(*ops)
    cpu, cuda = (traced.lower(lowering_platforms=(platform,)).as_text() for platform in ("cpu", "cuda"))
    assert cpu_kernels.ATTENTION_TARGET in cpu and cpu_kernels.ATTENTION_TARGET not in cuda


def test_gradients_through_the_kernel_are_xla_s(monkeypatch):
    ops = tuple(jnp.asarray(x) for x in operands(np.random.default_rng(3), 2, 2, 12, 2, 8, empty=0.0))

    def loss(q, k):
        return jnp.sum(attention(q, ops[1], [ops[2:5], (k, ops[6], ops[1])], jnp.float32) ** 2)

    native = jax.grad(loss, (0, 1))(ops[0], ops[5])
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    for got, want in zip(native, jax.grad(loss, (0, 1))(ops[0], ops[5])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# ---- the model: the kernel in the decode program, and the fallback ----

CONFIG = tiny_config(vocab_size=64)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_decode_program_calls_the_kernel_and_switched_off_xla_s_path_with_the_same_tokens(quantize, monkeypatch):
    """One custom call per layer in the decode step; the prefill of a prompt bucket over DECODE_MAX_QUERIES tokens
    keeps XLA's; with NEOX_JAX_CPU_KERNELS=0 neither has one, and the greedy tokens are the same."""
    params = build_params(CONFIG, random_tensors(CONFIG, seed=3).items(), jnp.float32, progress=False,
                          quantize=quantize)
    prompts = [list(range(1, 20)), [5, 6, 7]]  # bucket 32

    def run():
        model = NeoXModel(CONFIG, params, quantize=quantize)
        decoder = Decoder(model.module, model.params)
        tokens = decoder.generate(prompts, 8, stop_token=None).tokens
        (decode_step,) = decoder._decode._executables.values()
        (prefill,) = decoder._prefill._executables.values()
        return tokens, decode_step.as_text(), prefill.as_text()

    native, decode_step, prefill = run()
    assert decode_step.count(f'custom_call_target="{cpu_kernels.ATTENTION_TARGET}"') == CONFIG.num_layers
    assert cpu_kernels.ATTENTION_TARGET not in prefill
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    xla_tokens, decode_step, _ = run()
    assert cpu_kernels.ATTENTION_TARGET not in decode_step and native == xla_tokens

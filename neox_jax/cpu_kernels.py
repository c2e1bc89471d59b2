"""Native CPU kernels for the matmuls and the decode step's attention, called from jitted programs through XLA's FFI.

XLA:CPU does not fuse a weight's int8 -> fp32 conversion into its matmul (see `neox_jax.quantize`), so on CPU the
weight-only matmul `[m, k] x [n, k] -> [m, n]` runs as a custom call to C++ kernels (neox_jax/csrc, compiled by
`pip install -e .`, setup.py): each weight vector is converted in registers and multiplied into fp32
accumulators, a register tile of output channels by rows of x at a time, the scale applied once to each
channel's fp32 sum; the output channels are split across a small thread pool. Numerics as the XLA path's
(docs/design.md): the values meet the activations exactly, fp32 accumulation (in another order: the two agree
to fp32 rounding, tests/test_cpu_kernels.py), the scale on the fp32 result.

Which runs where: `neox_jax.quantize.quantized_contract` calls `weight_matmul` in the CPU branch of its
`platform_dependent` when `enabled()`: the extension is built, the CPU has AVX2 with FMA or AVX-512 (the
vectorised kernels, chosen at run time), and NEOX_JAX_CPU_KERNELS is not "0". Otherwise the program keeps the XLA
path, and one log line says why. The GPU branch is XLA's in every case.

`int8_dynamic_matmul` is the activation-quantized product of `--quantize int8-dynamic` (csrc/w8a8.cc): each row of
x quantized to int8 by its absolute maximum inside the call, int8 x int8 products summed exactly in int32 (AVX-512
VNNI's vpdpbusd, AVX2's vpmaddubsw), two fp32 multiplies per output. Its numerics are
`neox_jax.quantize.dynamic_int8_product`'s, bit for bit.

Epilogue: each kernel takes an optional fp32 bias [n] and a `gelu` flag, applied to its outputs by the thread that
computed them (csrc/matmul.h's Epilogue): `xla_epilogue` is the definition, XLA's own ops, and the XLA path's
formulation. The decode step uses it for the MLP's up-projection, whose bias and GELU XLA would otherwise run as a
fusion of its own between two kernel calls.

`decode_attention` is the decode step's attention over the KV cache (csrc/attention_tiles.h), in fp32: each (batch,
head) pair a task, its keys read once for all its queries, then its values; `neox_jax.model.attend` is the
definition and XLA's path, and `neox_jax.model.attention` chooses (`takes_attention`).

Threads: NEOX_JAX_CPU_THREADS (a positive integer), read once when the first kernel runs; by default the CPUs this
process may run on. The XLA thread that makes the call works too, so a call keeps at most that many busy.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

TARGET = "neox_jax_weight_matmul"  # the FFI targets' names, as the compiled program's custom calls name them
FP32_TARGET = "neox_jax_matmul"
INT8_DYNAMIC_TARGET = "neox_jax_int8_dynamic_matmul"
ATTENTION_TARGET = "neox_jax_decode_attention"
ISAS = ("avx512", "avx2", "portable")  # the kernels' instruction sets, fastest first
VECTORISED = ISAS[:2]  # those the model uses; on a CPU with neither, XLA's path is as fast as plain C++
WEIGHT_DTYPES = (np.dtype(np.int8), np.dtype(ml_dtypes.float8_e4m3fn))
SWITCH = "NEOX_JAX_CPU_KERNELS"  # "0": the model runs XLA's path on CPU (the fallback, also for comparison)

logger = logging.getLogger(__name__)


@functools.cache
def _extension():
    """The compiled module, its FFI target registered with XLA's CPU platform; None if it was not built."""
    try:  # by name: the compiled module, not a Python file of the package (which a relative import would name)
        _cpu_kernels = importlib.import_module(f"{__package__}._cpu_kernels")
    except ImportError:
        return None
    jax.ffi.register_ffi_target(TARGET, _cpu_kernels.weight_matmul_handler(), platform="cpu")
    jax.ffi.register_ffi_target(FP32_TARGET, _cpu_kernels.matmul_handler(), platform="cpu")
    jax.ffi.register_ffi_target(INT8_DYNAMIC_TARGET, _cpu_kernels.int8_dynamic_matmul_handler(), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, _cpu_kernels.decode_attention_handler(), platform="cpu")
    return _cpu_kernels


def unavailable_reason() -> str | None:
    """Why the model cannot use the kernels here, or None if it can."""
    extension = _extension()
    if extension is None:
        return "neox_jax._cpu_kernels is not built (`pip install -e .` compiles it with the C++ compiler)"
    if extension.best_isa() not in VECTORISED:
        return "this CPU has neither AVX2 with FMA nor AVX-512"
    return None


@functools.cache
def _log_fallback(reason: str) -> None:
    logger.warning("neox-jax: native CPU kernels unavailable: %s; quantized matmuls on CPU run XLA's path", reason)


def enabled() -> bool:
    """Whether quantized matmuls lowered for CPU call the kernels (decided when a program is traced)."""
    if os.environ.get(SWITCH) == "0":
        return False
    reason = unavailable_reason()
    if reason is not None:
        _log_fallback(reason)
    return reason is None


def best_isa() -> str:
    return _extension().best_isa()


def best_int8_dynamic_isa() -> str:
    """The fastest activation-quantized kernels this CPU runs: avx512 needs VNNI too (without it, avx2's)."""
    return _extension().best_int8_dynamic_isa()


def weight_matmul(x, values, scale, bias=None, *, gelu: bool = False, isa: str | None = None, threads: int = 0):
    """`xla_epilogue((x @ values.T) * scale, bias, gelu)` by the native kernel: x fp32 [m, k], values int8 or
    float8_e4m3fn [n, k] (a weight as stored, `[out, in]`), scale fp32 [n], bias fp32 [n] or None -> fp32 [m, n].

    isa: one of ISAS this CPU runs (default: the fastest); threads: how many threads the call may use (0:
    NEOX_JAX_CPU_THREADS or the CPUs). Raises ValueError for operands of other shapes or dtypes."""
    if jnp.ndim(x) != 2 or jnp.ndim(values) != 2 or jnp.ndim(scale) != 1 or x.shape[1] != values.shape[1] \
            or scale.shape[0] != values.shape[0]:
        raise ValueError(f"weight_matmul takes x [m, k], values [n, k] and scale [n], got {jnp.shape(x)}, "
                         f"{jnp.shape(values)} and {jnp.shape(scale)}")
    if x.dtype != jnp.float32 or scale.dtype != jnp.float32 or values.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_matmul takes fp32 x and scale and int8 or float8_e4m3fn values, got {x.dtype}, "
                         f"{scale.dtype} and {values.dtype}")
    return _call(TARGET, x, (values, scale), bias, gelu, isa, threads, best_isa)


def int8_dynamic_matmul(x, values, scale, bias=None, *, gelu: bool = False, isa: str | None = None, threads: int = 0):
    """`xla_epilogue(neox_jax.quantize.dynamic_int8_product(x, values, scale), bias, gelu)` by the native kernel:
    x fp32 [m, k], values int8 [n, k] (a weight as stored), scale fp32 [n], bias fp32 [n] or None -> fp32 [m, n];
    x's rows are quantized inside the call.

    isa: one of ISAS this CPU runs for it (default: the fastest); threads as `weight_matmul`'s.
    Raises ValueError for operands of other shapes or dtypes, or k over MAX_INT8_DYNAMIC_K."""
    if jnp.ndim(x) != 2 or jnp.ndim(values) != 2 or jnp.ndim(scale) != 1 or x.shape[1] != values.shape[1] \
            or scale.shape[0] != values.shape[0]:
        raise ValueError(f"int8_dynamic_matmul takes x [m, k], values [n, k] and scale [n], got {jnp.shape(x)}, "
                         f"{jnp.shape(values)} and {jnp.shape(scale)}")
    if x.dtype != jnp.float32 or scale.dtype != jnp.float32 or values.dtype != jnp.int8:
        raise ValueError(f"int8_dynamic_matmul takes fp32 x and scale and int8 values, got {x.dtype}, {scale.dtype} "
                         f"and {values.dtype}")
    if x.shape[1] > MAX_INT8_DYNAMIC_K:
        raise ValueError(f"int8_dynamic_matmul: k = {x.shape[1]} is over {MAX_INT8_DYNAMIC_K}, where the int32 sums "
                         f"could overflow")
    return _call(INT8_DYNAMIC_TARGET, x, (values, scale), bias, gelu, isa, threads, best_int8_dynamic_isa)


MAX_INT8_DYNAMIC_K = 2 ** 17  # |sum_k q_x q_w| <= 127 * 128 * k < 2^31 (csrc/w8a8.h's kMaxW8A8K)


def matmul(x, w, bias=None, *, gelu: bool = False, isa: str | None = None, threads: int = 0):
    """`xla_epilogue(x @ w.T, bias, gelu)` by the native kernel, in fp32: x [m, k], w [n, k] (a weight as stored),
    bias [n] or None -> [m, n]; isa and threads as `weight_matmul`'s."""
    if jnp.ndim(x) != 2 or jnp.ndim(w) != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"matmul takes x [m, k] and w [n, k], got {jnp.shape(x)} and {jnp.shape(w)}")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"matmul takes fp32 x and w, got {x.dtype} and {w.dtype}")
    return _call(FP32_TARGET, x, (w,), bias, gelu, isa, threads, best_isa)


def xla_epilogue(y, bias=None, gelu: bool = False):
    """What the kernels apply to their fp32 product y [..., n], in XLA's ops (the definition, and the XLA path's
    formulation): `y + bias` (fp32 [n]), then with `gelu` the exact GELU, `jax.nn.gelu(approximate=False)`."""
    if bias is not None:
        y = y + bias
    return jax.nn.gelu(y, approximate=False) if gelu else y


def decode_attention(q, positions, cache_k, cache_v, cache_positions, k, v, *, isa: str | None = None,
                     threads: int = 0):
    """`neox_jax.model.attend(q, positions, [(cache_k, cache_v, cache_positions), (k, v, positions)], float32)` by
    the native kernel: q, k, v fp32 [B, N, T, H] (the queries after rotary, the new tokens' keys and values), positions
    int32 [B, T], cache_k, cache_v fp32 [B, N, S, H], cache_positions int32 [B, S] (-1: empty) -> fp32 [B, N, T, H].

    The same sums in another order (to fp32 rounding): each query's weights and weighted values accumulate one key
    at a time in key order, so its output does not depend on how many queries share the call, nor on where the
    invisible keys lie (csrc/attention_tiles.h). isa and threads as `weight_matmul`'s. Raises ValueError for
    operands of other shapes or dtypes."""
    operands = dict(q=q, positions=positions, cache_k=cache_k, cache_v=cache_v, cache_positions=cache_positions, k=k,
                    v=v)
    b, n, t, h = jnp.shape(q) if jnp.ndim(q) == 4 else (-1,) * 4
    s = jnp.shape(cache_k)[2] if jnp.ndim(cache_k) == 4 else -1
    expected = {"q": (b, n, t, h), "positions": (b, t), "cache_k": (b, n, s, h), "cache_v": (b, n, s, h),
                "cache_positions": (b, s), "k": (b, n, t, h), "v": (b, n, t, h)}
    if any(jnp.shape(operands[name]) != shape for name, shape in expected.items()):
        raise ValueError("decode_attention takes q, k, v [B, N, T, H], positions [B, T], cache_k, cache_v [B, N, S, H] "
                         "and cache_positions [B, S], got " +
                         ", ".join(f"{name} {jnp.shape(x)}" for name, x in operands.items()))
    if any(jnp.result_type(x) != (jnp.int32 if "positions" in name else jnp.float32) for name, x in operands.items()):
        raise ValueError("decode_attention takes fp32 q, k, v, cache_k, cache_v and int32 positions, got " +
                         ", ".join(f"{name} {jnp.result_type(x)}" for name, x in operands.items()))
    _check_isa_and_threads(isa, threads)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, n, t, h), jnp.float32),
                            vmap_method="sequential")
    return call(q, positions, cache_k, cache_v, cache_positions, k, v, isa=isa or best_isa(), threads=np.int64(threads))


# Queries up to which attention over a cache runs the kernel: a speculative pass's K + 1 (speculative.MAX_DRAFT_TOKENS),
# so that it and the one-token step share the kernel and its bits; a prompt's prefill of up to 16 tokens too.
DECODE_MAX_QUERIES = 17


def takes_attention(q, parts, segments) -> bool:
    """Whether attention lowered for CPU runs `decode_attention`: a decode step's (few queries over a cache and their
    own keys: `parts` the cache's and the tokens' (keys, values, positions)), fp32, and the kernels enabled."""
    return (len(parts) == 2 and segments is None and q.shape[2] <= DECODE_MAX_QUERIES
            and all(x.dtype == jnp.float32 for x in (q, *parts[0][:2], *parts[1][:2])) and enabled())


def _check_isa_and_threads(isa: str | None, threads: int) -> None:
    if isa is not None and isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if _extension() is None:
        raise RuntimeError(unavailable_reason())


def _call(target: str, x, weight_operands: tuple, bias, gelu: bool, isa: str | None, threads: int, default_isa):
    n = weight_operands[0].shape[0]
    if bias is not None and (jnp.shape(bias) != (n,) or jnp.result_type(bias) != jnp.float32):
        raise ValueError(f"bias must be fp32 [n] = [{n}], got {jnp.result_type(bias)} {jnp.shape(bias)}")
    _check_isa_and_threads(isa, threads)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential")
    bias = jnp.zeros((0,), jnp.float32) if bias is None else bias  # empty: no bias
    return call(x, *weight_operands, bias, isa=isa or default_isa(), threads=np.int64(threads), gelu=bool(gelu))


FP32_MAX_ROWS = 64  # rows of x up to which the fp32 kernel beats XLA's matmul (a decode step's; prefill's are XLA's)


def rows_form(spec: str, x, w_shape) -> bool:
    """Whether `einsum(spec, x, w)` is `x` as rows `[m, in]` against a 2-D `[out, in]` weight: x's last axis
    contracted with the weight's second, the result x's other axes then the output channel."""
    operands, result = spec.split("->")
    x_axes, w_axes = operands.split(",")
    return len(w_shape) == 2 and x_axes[-1] == w_axes[1] and result == x_axes[:-1] + w_axes[0]


def with_xla_derivative(native, xla):
    """`native(*operands)`, differentiated as `xla(*operands)`: an FFI call has no derivative rule of its own,
    and `jax.grad` (neox_jax.train, whose small batches are decode-sized) needs one; `xla` computes the same
    product with ops JAX can differentiate and transpose."""
    call = jax.custom_jvp(native)
    call.defjvp(lambda primals, tangents: (call(*primals), jax.jvp(xla, primals, tangents)[1]))
    return call


def rows_product(kernel, x, *weight_operands, **epilogue):
    """`kernel` over x's leading axes flattened into rows, the result shaped back: [..., in] -> [..., out]."""
    lead, n = x.shape[:-1], weight_operands[0].shape[0]
    return kernel(x.reshape(-1, x.shape[-1]), *weight_operands, **epilogue).reshape(*lead, n)


def takes_fp32(spec: str, x, w) -> bool:
    """Whether an unquantized matmul lowered for CPU runs the fp32 kernel: fp32 operands in the rows form, few
    enough rows (decode), and the kernels enabled."""
    rows = int(np.prod(x.shape[:-1]))
    return (x.dtype == w.dtype == jnp.float32 and rows_form(spec, x, w.shape) and rows <= FP32_MAX_ROWS
            and enabled())

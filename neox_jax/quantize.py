"""Weight-only quantization: every matmul weight stored as int8 (or fp8 e4m3) with one fp32 scale per output
channel; the model reads it through `model.matmul` / `model.contract`, which take a `QuantizedWeight` wherever
they take an array.

What is quantized is what `neox_jax.params` declares `Kind.MATMUL`: the fused QKV, the attention output,
the MLP up- and down-projections and the output head. Weights are stored `[out, in]` (out axes first, the
params layout only names head axes), so a scale spans a declaration's first dim group (`ParamSpec.dims[0]`):
`[N, 3, H]` for the fused QKV, `[V]` for the head. It therefore has its weight's output-channel logical
axes and shards with them on a mesh (the QKV's scales by heads, the row-parallel weights' scales replicated,
as their outputs are). A per-output-channel scale factors out of the contraction over the input axis:
`sum_i x_i * (q_oi * s_o) = s_o * sum_i x_i * q_oi`, so the matmul contracts the stored values and scales
its fp32-accumulated output, once per output element; no dequantized weight is needed.

Modes:
- int8: symmetric, `s_o = max_i |w_oi| / 127`, `q = round(w / s)`. The rounding error is at most s/2 per
  weight, uniform over the channel's range.
- fp8: e4m3 (`float8_e4m3fn`, max 448), `s_o = max_i |w_oi| / 448`, `q = fp8(w / s)` (round to nearest
  even): 3 mantissa bits, a relative grid (finer than int8 near zero, coarser near the channel's maximum).
  Weight-only, like int8: the values are converted to the model dtype inside the matmul, which every
  backend can do, so fp8 needs no fp8 arithmetic. It is therefore emulated, not refused, where the hardware
  has none (CPU, GPUs before Hopper/Ada): the same program and the same bytes stored everywhere, so its
  quality can be checked on any machine.

- int8-dynamic: int8's stored weights, and the activations quantized too, when the matmul runs: each row of x
  (one token's input to the matmul) to int8 by its absolute maximum, `s_x = max_i |x_i| / 127`, the int8 x int8
  products summed exactly in int32, then `float(sum) * s_x * s_o` in fp32 (`dynamic_int8_product`; PyTorch's
  "dynamic quantization", CTranslate2's int8). It adds the activations' rounding to the weights' (another ~1/254
  of each row's largest value), so it is its own mode with its own parity thresholds, never a default; on CPU its
  integer dot products are cheaper than int8's convert-and-FMA, which matters when a step computes many rows.

The input embedding is a gather, not a matmul: a decode step reads one row per sequence, so int8 rows
would save no time per step, only memory (GPT-NeoX-20B: 0.3 GB of ~21 GB in int8). It stays in the model
dtype (exact), and a model with tied embeddings keeps its head in the model dtype too.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import cpu_kernels
from .config import NeoXConfig
from .params import Kind, ParamSpec, axis_size


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    storage: np.dtype  # what the values are stored in
    max_value: float  # the largest magnitude `storage` holds; a channel's maximum maps to it
    dynamic_activations: bool = False  # the matmuls quantize their activations too (`dynamic_int8_product`)

    def quantize(self, scaled: np.ndarray) -> np.ndarray:
        """fp32 weights divided by their scale (in [-max, max]) -> values in `storage`."""
        if self.storage == np.int8:
            return np.clip(np.rint(scaled), -self.max_value, self.max_value).astype(np.int8)
        return scaled.astype(self.storage)  # ml_dtypes rounds to nearest even


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("int8", np.dtype(np.int8), 127.0),
    Mode("fp8", np.dtype(ml_dtypes.float8_e4m3fn), 448.0),
    Mode("int8-dynamic", np.dtype(np.int8), 127.0, dynamic_activations=True),
)}
NAMES = tuple(MODES)  # the choices of every --quantize
SCALE_DTYPE = np.dtype(np.float32)  # one per output channel: negligible bytes, and exact for the fp32 product


class QuantizationError(ValueError):
    """An unknown quantization mode."""


def lookup(name: str | None) -> Mode | None:
    """The mode called `name`; None (no quantization) for None."""
    if name is None:
        return None
    if name not in MODES:
        raise QuantizationError(f"quantize must be one of {', '.join(NAMES)}, got {name!r}")
    return MODES[name]


@flax.struct.dataclass
class QuantizedWeight:
    """A matmul weight as stored values and their per-output-channel scales: `w ~ values * scale[..., None]`.

    `values` comes first: flax checks a param against its declared shape by its pytree leaves in order, so
    the declared shape is compared with the values' (the scale is derived from the same declaration)."""

    values: jax.Array  # the weight's params shape, in the mode's storage dtype
    scale: jax.Array  # fp32, the weight's output-channel axes (its first dim group)
    # Static (part of the tree's structure, not a leaf): its matmuls quantize their activations (int8-dynamic).
    dynamic_activations: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def reshape(self, *shape: int) -> "QuantizedWeight":
        """As a 2-D `[out, in]` matrix (the model's matmuls flatten the head axes; -1 allowed), the scale as
        `[out]`. The exact tensor-parallel mode's per-rank views split the input axis of row-parallel
        weights, which a per-output-channel scale cannot follow: quantized params are merged-mode only."""
        if len(shape) != 2:
            raise ValueError(f"a quantized weight is viewed as [out, in], not {shape}: quantized weights and the "
                             f"exact tensor-parallel mode do not combine")
        out, inner = shape
        values = self.values.reshape(out, inner)
        return QuantizedWeight(values, self.scale.reshape(values.shape[0]), self.dynamic_activations)


QUANTIZED_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedWeight)
                         if f.metadata.get("pytree_node", True))  # ("values", "scale")


def quantizes(spec: ParamSpec) -> bool:
    return spec.kind is Kind.MATMUL


def scale_axes(spec: ParamSpec) -> tuple[str, ...]:
    """The logical axes of a matmul weight's scale: its output channels, the first dim group of `[out, in]`."""
    return spec.dims[0]


def scale_shape(spec: ParamSpec, config: NeoXConfig) -> tuple[int, ...]:
    return tuple(axis_size(config, axis) for axis in scale_axes(spec))


def quantize(weight: np.ndarray, spec: ParamSpec, config: NeoXConfig, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """A host weight in its params shape -> (values, fp32 scale), one scale per output channel.

    Computed in fp32 whatever the checkpoint's dtype, `HOST_CHUNK` weights at a time along the first output
    axis (channels are independent), so the fp32 temporaries stay small next to the tensor itself (GPT-NeoX-20B's
    head is 1.2 GB in fp32). An all-zero channel gets scale 1 (its values are 0)."""
    out = scale_shape(spec, config)
    inner = tuple(range(len(out), weight.ndim))
    values = np.empty(weight.shape, mode.storage)
    scale = np.empty(out, SCALE_DTYPE)
    rows = max(1, HOST_CHUNK // (weight[0].size or 1))
    for start in range(0, weight.shape[0], rows):
        w = np.asarray(weight[start:start + rows], np.float32)
        amax = np.abs(w).max(axis=inner)  # [rows, other out axes]
        chunk_scale = np.where(amax > 0, amax / mode.max_value, 1.0).astype(SCALE_DTYPE)
        values[start:start + rows] = mode.quantize(w / chunk_scale.reshape(chunk_scale.shape + (1,) * len(inner)))
        scale[start:start + rows] = chunk_scale
    return values, scale


HOST_CHUNK = 2 ** 24  # weights quantized at a time on the host (64 MiB as fp32)


def dequantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Host values and scale -> the fp32 weight they stand for (tests, the optional converter's checks)."""
    scale = np.asarray(scale, np.float32)
    return np.asarray(values, np.float32) * scale.reshape(scale.shape + (1,) * (values.ndim - scale.ndim))


def check_merged(tp_ranks: int | None, mode: Mode | None) -> None:
    """Refuse quantized weights in the exact tensor-parallel mode: that mode keeps each rank's own numbers
    (and views row-parallel weights by input blocks, which a per-output-channel scale cannot follow)."""
    if tp_ranks and mode is not None:
        raise QuantizationError(f"--quantize {mode.name} and --tp-exact do not combine: the exact tensor-parallel "
                                f"mode computes as the checkpoint's ranks did, and quantizing changes that; use one")


def abstract_param(spec: ParamSpec, config: NeoXConfig, dtype, mode: Mode | None, tp_ranks: int | None = None):
    """The params leaf of `spec`, as shapes and dtypes: an array of `dtype` (`tp_ranks`: the exact
    tensor-parallel mode's), or a QuantizedWeight of them."""
    check_merged(tp_ranks, mode)
    array = jax.ShapeDtypeStruct(spec.shape(config, tp_ranks), jnp.dtype(dtype))
    if mode is None or not quantizes(spec):
        return array
    return QuantizedWeight(jax.ShapeDtypeStruct(array.shape, mode.storage),
                           jax.ShapeDtypeStruct(scale_shape(spec, config), SCALE_DTYPE), mode.dynamic_activations)


def abstract_leaves(spec: ParamSpec, config: NeoXConfig, dtype, mode: Mode | None,
                    tp_ranks: int | None = None) -> list[tuple[str | None, object]]:
    """(field, shape and dtype) of each array stored for `spec`: field None for a plain array, else
    "values" and "scale" (the memory plan sums these, each with its own sharding)."""
    leaf = abstract_param(spec, config, dtype, mode, tp_ranks)
    if isinstance(leaf, QuantizedWeight):
        return [(name, getattr(leaf, name)) for name in QUANTIZED_FIELDS]
    return [(None, leaf)]


def leaf_mesh_axes(spec: ParamSpec, field: str | None, tp_ranks: int | None = None) -> tuple[str | None, ...]:
    """The mesh axes of a params leaf: a plain array's (`field` None; `tp_ranks`: in the exact tensor-parallel
    mode) or a QuantizedWeight's `values` (the weight's own) or `scale` (its output channels': a scale lives
    with the channels it scales)."""
    if field == "scale":
        return tuple(spec.mesh_axes()[:len(scale_axes(spec))])
    return spec.mesh_axes(tp_ranks)


CPU_BLOCK = 2 ** 16  # weight elements converted at a time on CPU: 256 KiB as fp32, in L2 (2 ** 18 measured slower)


def quantized_contract(spec: str, x, w: QuantizedWeight, precision, bias=None, gelu: bool = False):
    """`einsum(spec, x, dequantized w)` accumulated in fp32, computed from the stored values: they meet `x` in
    its dtype (int8 and e4m3 values are exact in fp16, bf16 and fp32) and the per-channel scale multiplies
    the fp32 result; then `cpu_kernels.xla_epilogue(., bias, gelu)` (bias fp32 [out] or None). `w` is a 2-D
    `[out, in]` weight (the model's matmuls flatten head axes first); its output channel is the result's last
    axis. A weight of int8-dynamic (`w.dynamic_activations`) computes `dynamic_int8_product` instead.

    How the values reach the matmul differs by platform. XLA:GPU is expected to fuse the conversion into the
    matmul's operand loads (not yet run on a GPU; tests/test_quantize.py checks it there). XLA:CPU does not:
    `einsum(x, values.astype(f32))` writes a converted fp32 copy of the whole weight every step (4 bytes
    written and read again per 1 byte stored), and so does a mixed-type `dot_general`. On CPU the product is
    therefore the native kernel's (`neox_jax.cpu_kernels`: x as fp32 rows against the stored values, the bias and
    GELU applied by the kernel, when `cpu_kernels.enabled()`), or else XLA's converting `CPU_BLOCK` elements at a
    time in a loop over row blocks: each converted block is cache-sized and reused by the next, so no
    weight-sized float buffer exists (tests/test_quantize.py reads it from the compiled program).

    The form is chosen by the platform the program is lowered for (`jax.lax.platform_dependent`), not by
    the process's default backend: a program exported or compiled for CUDA from a CPU process holds the
    plain product only (tests/test_quantize.py lowers one for CUDA on CPU)."""
    operands, result = spec.split("->")
    if w.values.ndim != 2 or operands.split(",")[1][0] != result[-1]:
        raise ValueError(f"{spec}: a quantized weight must be [out, in], its output channel the result's last axis")
    if w.dynamic_activations:
        return dynamic_contract(spec, x, w, bias, gelu)

    def product(x, values):
        return jnp.einsum(spec, x, values.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)

    def plain(x, values, scale, *bias):
        return cpu_kernels.xla_epilogue(product(x, values) * scale, *bias, gelu=gelu)

    def native(x, values, scale, *bias):
        return cpu_kernels.rows_product(cpu_kernels.weight_matmul, x.astype(jnp.float32), values, scale, *bias,
                                        gelu=gelu)

    operands = (x, w.values, w.scale) + (() if bias is None else (bias,))
    if cpu_kernels.rows_form(spec, x, w.values.shape) and cpu_kernels.enabled():
        return jax.lax.platform_dependent(*operands, cpu=cpu_kernels.with_xla_derivative(native, plain), default=plain)
    if not row_blocks_needed(w.values.shape):
        return plain(*operands)

    def blocked(x, values, scale, *bias):
        return cpu_kernels.xla_epilogue(by_row_blocks(product, x, values) * scale, *bias, gelu=gelu)

    return jax.lax.platform_dependent(*operands, cpu=blocked, default=plain)


def row_blocks_needed(shape) -> bool:
    """Whether XLA:CPU's path takes an `[out, in]` weight in more than one block of `CPU_BLOCK` elements."""
    out, inner = shape
    return out > max(1, CPU_BLOCK // inner)


def by_row_blocks(product, x, values):
    """`product(x, values)` (fp32, the output channel last) computed `CPU_BLOCK` weights at a time."""
    out, inner = values.shape
    rows = max(1, CPU_BLOCK // inner)

    def add_block(i, acc):
        # The last block is shifted back to end at `out` (dynamic_slice clamps its start the same way), so it
        # recomputes a few rows of its neighbour with the same result instead of padding the weight.
        start = jnp.minimum(i * rows, out - rows)
        block = jax.lax.dynamic_slice_in_dim(values, start, rows)
        return jax.lax.dynamic_update_slice_in_dim(acc, product(x, block), start, acc.ndim - 1)

    acc = jnp.zeros((*x.shape[:-1], out), jnp.float32)
    return jax.lax.fori_loop(0, -(-out // rows), add_block, acc)


# ---- int8-dynamic: activations quantized per row when the matmul runs ----

# A row whose largest magnitude is below this quantizes to zeros: 127 / amax must be a finite fp32 (these are
# ~1e-36 and below, which XLA:CPU's flushed denormals are anyway).
MIN_ROW_MAX = np.float32(2.0 ** -120)
# A multiply, not `amax / 127`: XLA rewrites a division by a constant into this multiply (not the same rounding),
# so the definition is the multiply, which every compiler keeps.
INVERSE_127 = np.float32(1 / 127)


def quantize_activations(x):
    """x [..., in] -> (q int8 [..., in], scale fp32 [..., 1]), each row (the last axis) symmetric by its
    absolute maximum: `scale = amax * fp32(1 / 127)`, `q = round(x * (127 / amax))`, ties to even, so |q| <= 127.

    Computed in fp32 whatever x's dtype. A row with amax below MIN_ROW_MAX (zeros among them) gets q = 0 and so a
    zero product; a row holding inf or NaN gets q = 0 and scale inf or NaN, so a NaN product. Each step is one
    IEEE operation, so the native kernel (csrc/w8a8.cc) reproduces it exactly."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    quantized = (amax >= MIN_ROW_MAX) & (amax <= np.finfo(np.float32).max)
    inverse = 127 / jnp.where(quantized, amax, 1)
    return jnp.where(quantized, jnp.round(x * inverse), 0).astype(jnp.int8), amax * INVERSE_127


def dynamic_int8_product(spec: str, x, values, scale):
    """int8-dynamic's matmul, its definition on every platform: x quantized by `quantize_activations`, the int8
    x int8 products summed in int32 (exact for in <= 2^17: |sum| <= 127 * 128 * in), then
    `(float(sum) * x_scale) * scale`, two fp32 roundings. `spec` contracts x's last axis."""
    q, x_scale = quantize_activations(x)
    return int8_product(spec, q, values) * x_scale * scale


def int8_product(spec: str, q, values):
    return jnp.einsum(spec, q, values, preferred_element_type=jnp.int32).astype(jnp.float32)


def dynamic_contract(spec: str, x, w: QuantizedWeight, bias=None, gelu: bool = False):
    """`dynamic_int8_product` of x and `w`, then `cpu_kernels.xla_epilogue(., bias, gelu)`: on CPU by the native
    kernel (one custom call: it quantizes x itself and applies the epilogue), else XLA's, on CPU `CPU_BLOCK`
    weights at a time as `quantized_contract`'s fallback. Its derivative is XLA's formulation's: zero through the
    rounding of x."""
    if not cpu_kernels.rows_form(spec, x, w.values.shape):
        raise ValueError(f"{spec}: int8-dynamic quantizes x's rows, so x's last axis must be the contracted one "
                         f"and the result x's other axes then the output channel")

    def plain(x, values, scale, *bias):
        return cpu_kernels.xla_epilogue(dynamic_int8_product(spec, x, values, scale), *bias, gelu=gelu)

    def native(x, values, scale, *bias):
        return cpu_kernels.rows_product(cpu_kernels.int8_dynamic_matmul, x.astype(jnp.float32), values, scale,
                                        *bias, gelu=gelu)

    operands = (x, w.values, w.scale) + (() if bias is None else (bias,))
    if cpu_kernels.enabled():
        return jax.lax.platform_dependent(*operands, cpu=cpu_kernels.with_xla_derivative(native, plain), default=plain)
    if not row_blocks_needed(w.values.shape):
        return plain(*operands)

    def blocked(x, values, scale, *bias):
        q, x_scale = quantize_activations(x)
        product = by_row_blocks(lambda q, block: int8_product(spec, q, block), q, values) * x_scale * scale
        return cpu_kernels.xla_epilogue(product, *bias, gelu=gelu)

    return jax.lax.platform_dependent(*operands, cpu=blocked, default=plain)

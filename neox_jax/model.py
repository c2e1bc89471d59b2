"""The GPT-NeoX model as pure Flax modules: `(params, tokens, positions, cache) -> NeoXOutput(logits, cache)`.

Params are a plain nested dict mirroring the Hugging Face names, one entry per transformer layer
(`layers_0`, `layers_1`, ...). Linear weights keep the checkpoint's `[out, in]` orientation, reshaped only
to name heads, so loading never transposes.

Layers are separate arrays run by a Python loop rather than stacked and scanned: decoding reads every
weight once per token, and under a scan XLA copies each layer's slice of the stacked weights (and of the
cache) before using it, which doubled the bytes moved per step (Pythia-70M batch-1 decode on CPU: 10.5 ms
scanned, 7.3 ms unrolled; see docs/design.md). Compile time grows with depth instead: 10 s for GPT-NeoX-20B's
prefill and decode programs on CPU (`python -m bench.compile`).

Axis names in shape comments and einsums: B batch, T query tokens, S key slots, D hidden,
N heads, H head dim, C the (q, k, v) triple, F MLP width, V vocabulary.

Numerics (the one place they are decided):
- Parameters and activations are stored in `dtype` (fp16 as GPT-NeoX-20B was trained; fp32 or bf16 allowed).
- Every matmul accumulates in fp32 (`preferred_element_type`) and rounds once to `dtype`; in fp32 mode
  matmuls use full precision (no TF32) so fp32 comparisons are meaningful.
- LayerNorm statistics and affine, the GELU, rotary rotation, attention scores and softmax, and the final
  logits are computed in fp32: they are the reductions and transcendental ops where fp16 loses accuracy
  (a 2048-long softmax, a 6144-wide variance) while costing little next to the matmuls.
- Masking uses the most negative fp32, applied to fp32 scores, so it cannot overflow.
- The softmax's max, exponentials, sum and normalisation are fp32; the unnormalised weights (in (0, 1])
  meet the values in `dtype`, and the fp32 product is divided by the sum (flash attention's order).
- Quantized weights (`neox_jax.quantize`, `load(..., quantize="int8")`): the matmul weights are stored as
  int8 or fp8 e4m3 values with an fp32 scale per output channel. `matmul` and `contract` take them where
  they take arrays: the values meet the activations in `dtype` (exact: both formats fit in fp16, bf16 and
  fp32), the product accumulates in fp32 and the scale multiplies that fp32 result, per output channel
  (it factors out of the contraction), before the single rounding to `dtype`. Activations, the input
  embedding (a gather), LayerNorms, biases and softmax stay as above. Merged mode only: the exact
  tensor-parallel mode below keeps the checkpoint's own per-rank numbers, which quantizing would not.
  int8-dynamic (`QuantizedWeight.dynamic_activations`) quantizes each matmul's input rows to int8 as well, the
  products summed exactly in int32 and scaled in fp32 (`quantize.dynamic_int8_product`).
- On CPU the quantized matmuls, and an fp32 model's decode-step matmuls, run native kernels
  (`neox_jax.cpu_kernels`) with the same numerics: values converted to fp32 exactly, fp32 accumulation, the
  scale on the fp32 result. Their fp32 additions come in another order than XLA's, so the two agree to fp32
  rounding, not bit for bit. So does the decode step's fp32 attention (`attention`), by a native kernel too.
  Programs lowered for GPU keep XLA's matmuls and attention.
- Rotary angle tables are rounded to `rotary_dtype`, by default the model dtype except for bf16
  (`default_rotary_dtype`). With fp16 this reproduces GPT-NeoX's training code, whose `inv_freq` buffer,
  positions and angle products were fp16 (an angle between 512 and 1024 radians is rounded to a multiple
  of 0.5, above 1024 to a whole radian). The model learned with those angles; Hugging Face computes them
  in fp32 (`rotary_dtype=float32`). bf16 angles would be 8x coarser than anything the model saw, so bf16
  runs keep fp32 tables.
- Exact tensor-parallel mode (`tp_ranks`; see below): each rank's row-parallel output is rounded to `dtype`
  as that rank's matmul output was and its own bias is added in `dtype`; the all-reduce sums the ranks'
  partials in fp32 and rounds once. For two ranks (GPT-NeoX-20B) that is fp16 addition exactly; NCCL's
  ring sum over more ranks rounds after each addition, which can differ in the last bit.

Exact tensor-parallel mode (`tp_ranks=R`): the model computes as GPT-NeoX's R-way tensor-parallel training
code did, from params that keep each rank's LayerNorm copies and row-parallel biases on a leading rank
axis (`params.ParamSpec.per_rank`). The residual stream is held per rank, [R, B, T, D] (einsum letter R);
each rank normalises it with its own LayerNorm copies and computes its own block of heads, MLP columns and
vocabulary from that; each rank's row-parallel partial output plus its own bias is summed over the ranks
(`all_reduce`) where Megatron all-reduced: after both branches under the parallel residual, inside each
row-parallel layer (bias after the sum) under the sequential one. Merged mode is the same code with no
rank axis. On a mesh the rank axis lies on the `model` axis, so each device holds and runs its own ranks.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels
from .config import NeoXConfig
from .params import Kind, spec_at
from .quantize import QuantizedWeight, quantized_contract

F32 = jnp.float32
MASKED = float(np.finfo(np.float32).min)


@flax.struct.dataclass
class KVCache:
    """Keys and values of each layer at fixed-size slots, plus each slot's token position.

    Slots are filled left to right; `positions` is -1 for empty and padding slots, which are never
    attended to. A token at position p attends to slots holding positions 0..p, so left-padded batches
    of different prompt lengths share one write index (`length`, shape []). A batch of unrelated requests
    that come and go (`neox_jax.serve.engine`) gives each row its own write index instead (`length` [B]).
    Heads come before slots so that each head's keys are contiguous: the attention matmuls read the cache
    as stored, with no transposed copy.
    Each layer has its own arrays, read by attention and then updated in place (a stacked array would be
    sliced, i.e. copied, per layer).
    """

    k: tuple[jax.Array, ...]  # per layer [B, N, S, H]
    v: tuple[jax.Array, ...]  # per layer [B, N, S, H]
    positions: jax.Array  # [B, S] int32
    length: jax.Array  # [] or [B] int32: slots filled so far (in every row, or in each row)

    @classmethod
    def init(cls, config: NeoXConfig, batch: int, slots: int, dtype) -> "KVCache":
        shape = (batch, config.num_heads, slots, config.head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   positions=jnp.full((batch, slots), -1, jnp.int32), length=jnp.zeros((), jnp.int32))


def write_slots(slots, new, index, axis: int):
    """`slots` with `new` written from slot `index` on along `axis`: one index for every row ([]), or one
    per row ([B], a scatter that XLA also does in place)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(slots, new, tuple(index if i == axis else 0 for i in range(slots.ndim)))
    return jax.vmap(lambda s, n, i: write_slots(s, n, i, axis - 1))(slots, new, index)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def contract(spec: str, x, w, dtype, bias=None, gelu: bool = False):
    """einsum `x` with a weight (an array or a QuantizedWeight) accumulated in fp32, not rounded; then, in fp32,
    `bias` added (fp32, broadcasting against the result) and with `gelu` the exact GELU
    (`cpu_kernels.xla_epilogue`). On CPU a decode step's fp32 matmuls run the native kernel
    (`cpu_kernels.takes_fp32`), faster than XLA's there; the native kernels apply the bias and GELU themselves."""
    if isinstance(w, QuantizedWeight):
        return quantized_contract(spec, x, w, _precision(dtype), bias, gelu)

    def xla(x, w, *bias):
        product = jnp.einsum(spec, x, w, preferred_element_type=F32, precision=_precision(dtype))
        return cpu_kernels.xla_epilogue(product, *bias, gelu=gelu)

    def native(x, w, *bias):
        return cpu_kernels.rows_product(cpu_kernels.matmul, x, w, *bias, gelu=gelu)

    operands = (x, w) + (() if bias is None else (bias,))
    if cpu_kernels.takes_fp32(spec, x, w):
        return jax.lax.platform_dependent(*operands, cpu=cpu_kernels.with_xla_derivative(native, xla), default=xla)
    return xla(*operands)


def matmul(spec: str, x, w, dtype):
    """einsum with fp32 accumulation, rounded once to `dtype`."""
    return contract(spec, x, w, dtype).astype(dtype)


def rank_axis(tp_ranks: int | None) -> tuple[str, tuple[int, ...]]:
    """The exact mode's rank axis as an einsum letter and reshape dims: ("R", (R,)); merged ("", ())."""
    return ("R", (tp_ranks,)) if tp_ranks else ("", ())


def per_rank(p, ndim: int):
    """A parameter meeting activations of `ndim` dims: [X] as it is; the exact mode's [R, X] as [R, 1.., X],
    so that each rank's copy meets its own rank's activations [R, B, T, X]."""
    return p if p.ndim == 1 else p.reshape(p.shape[0], *(1,) * (ndim - 2), p.shape[-1])


def all_reduce(partials, tp_ranks: int | None):
    """The ranks' partial outputs [R, B, T, D] -> their sum on every rank (fp32, rounded once); merged: as is."""
    if not tp_ranks:
        return partials
    return jnp.broadcast_to(partials.astype(F32).sum(0).astype(partials.dtype), partials.shape)


def row_parallel_output(partial, bias, config: NeoXConfig, tp_ranks: int | None):
    """A row-parallel matmul's output plus its bias. Exact mode: each rank's partial [R, B, T, D] and own bias
    [R, D]; under the parallel residual left unreduced (the layer all-reduces both branches at once, as
    GPT-NeoX did), under the sequential one all-reduced before the bias is added (Megatron's
    RowParallelLinear with skip_bias_add, the bias added after)."""
    if tp_ranks and not config.parallel_residual:
        partial = all_reduce(partial, tp_ranks)
    return partial + per_rank(bias, partial.ndim)


def default_rotary_dtype(dtype):
    """The rotary tables' dtype for a model in `dtype`: the same, except fp32 for bf16 (see the numerics above)."""
    return jnp.dtype(jnp.float32 if jnp.dtype(dtype) == jnp.bfloat16 else dtype)


def rotary_tables(max_positions: int, rotary_dim: int, base: float, table_dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [max_positions, rotary_dim // 2], computed on the host as GPT-NeoX did.

    inv_freq is rounded to table_dtype (the buffer `.half()` converted), positions and inv_freq are
    exact in fp32 so their product is too, and rounding it to table_dtype is exactly what the training
    code's fp16 einsum produced. The angles are therefore bit-exact; cos and sin are taken in fp64 and
    rounded once, within one unit in the last place of any fp32 library's.
    """
    table_dtype = jnp.dtype(table_dtype)
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    inv_freq = inv_freq.astype(table_dtype).astype(np.float32)
    angles = (np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq).astype(table_dtype)
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(table_dtype), np.sin(angles).astype(table_dtype)


def rotary_cos_sin(positions, cos_table, sin_table):
    """[B, T] positions -> cos, sin [B, T, rotary_dim // 2]; padding (-1) reads row 0 and is masked anyway."""
    index = jnp.maximum(positions, 0)
    return jnp.asarray(cos_table)[index], jnp.asarray(sin_table)[index]


def apply_rotary(x, cos, sin, rotary_dim: int):
    """NeoX rotate_half rotary on the first rotary_dim of each head: [B, N, T, H] -> [B, N, T, H]."""
    rot, rest = x[..., :rotary_dim].astype(F32), x[..., rotary_dim:]
    x1, x2 = jnp.split(rot, 2, axis=-1)  # [B, N, T, R/2] each
    cos, sin = cos[:, None].astype(F32), sin[:, None].astype(F32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def gelu(x, activation: str):
    return jax.nn.gelu(x, approximate=(activation == "gelu_tanh"))


# Random initialisation (tests, benchmarks) by kind; real weights come from checkpoints.
_INIT = {Kind.MATMUL: nn.initializers.normal(0.02), Kind.EMBEDDING: nn.initializers.normal(0.02),
         Kind.BIAS: nn.initializers.zeros, Kind.NORM: nn.initializers.ones}


def declared_param(module: nn.Module, name: str, config: NeoXConfig, dtype) -> jax.Array:
    """`module.param(name)` with the shape its declaration in `neox_jax.params` gives, found by its path."""
    spec = spec_at((*module.path, name))
    return module.param(name, _INIT[spec.kind], spec.shape(config, module.tp_ranks), dtype)


# The modules declare their parameters in `setup` and compute in plain `__call__` methods (no `nn.compact`),
# so that the mutation-testing tool, which leaves decorated functions alone, mutates the model's arithmetic.
class LayerNorm(nn.Module):
    config: NeoXConfig
    dtype: Any
    tp_ranks: int | None = None  # the exact tensor-parallel mode's rank count (None: merged)

    def setup(self):
        self.weight = declared_param(self, "weight", self.config, self.dtype)  # [D] (exact mode [R, D])
        self.bias = declared_param(self, "bias", self.config, self.dtype)  # [D] (exact mode [R, D])

    def __call__(self, x):  # [..., D] -> [..., D]; exact mode [R, B, T, D], each rank with its own copy
        x = x.astype(F32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.config.layer_norm_eps)
        weight, bias = (per_rank(p, y.ndim).astype(F32) for p in (self.weight, self.bias))
        return (y * weight + bias).astype(self.dtype)


def attention(q, positions, parts, dtype, segments=None):
    """`attend`'s result; on CPU a decode step's (`cpu_kernels.takes_attention`: few fp32 queries over a cache) by
    the native kernel, which sums in another order (to fp32 rounding; see `cpu_kernels.decode_attention`)."""
    # The kernel's second part is the queries' own keys, at their positions.
    if not (cpu_kernels.takes_attention(q, parts, segments) and parts[-1][2] is positions):
        return attend(q, positions, parts, dtype, segments)
    (cache_k, cache_v, cache_positions), (k, v, _) = parts

    def xla(q, positions, cache_k, cache_v, cache_positions, k, v):
        return attend(q, positions, [(cache_k, cache_v, cache_positions), (k, v, positions)], dtype)

    operands = (q, positions, cache_k, cache_v, cache_positions, k, v)
    return jax.lax.platform_dependent(*operands, cpu=cpu_kernels.with_xla_derivative(cpu_kernels.decode_attention, xla),
                                      default=xla)


def attend(q, positions, parts, dtype, segments=None):
    """q [B, N, T, H] (after rotary) at `positions` [B, T] attending to `parts`, each (keys, values [B, N, S, H],
    their positions [B, S]) -> [B, N, T, H] in `dtype`: one softmax over all the parts' keys (`attention_scores`).

    In fp32 for scores and softmax, computed part by part (concatenated scores would be copied) and normalised
    after the product with the values, as flash attention does, so that each [B, N, T, S] array is made once: the
    fp32 scores, then the unnormalised weights (in (0, 1], safe in fp16). Prefill temporaries: ~14 -> ~6 bytes a
    score (fp32). A query that sees no key (all scores MASKED) weighs every key 1: the mean of all the values."""
    scores = [attention_scores(q, keys, positions, key_positions, dtype, segments) for keys, _, key_positions in parts]
    top = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])  # [B, N, T, 1]
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(-1, keepdims=True) for w in weights)  # [B, N, T, 1]
    attended = sum(jnp.einsum("BNTS,BNSH->BNTH", w.astype(dtype), values, preferred_element_type=F32,
                              precision=_precision(dtype))
                   for w, (_, values, _) in zip(weights, parts))
    return (attended / total).astype(dtype)


def attention_scores(q, keys, positions, key_positions, dtype, segments=None):
    """fp32 q.k / sqrt(H), [B, N, T, S]; a key is visible from its own position on, padding (-1) never,
    and with `segments` [B, T] (the keys are the tokens', S = T) only from segment 0 or the query's own."""
    scores = jnp.einsum("BNTH,BNSH->BNTS", q, keys, preferred_element_type=F32,
                        precision=_precision(dtype)) / np.sqrt(q.shape[-1]).astype(np.float32)
    visible = (key_positions[:, None, :] <= positions[:, :, None]) & (key_positions[:, None, :] >= 0)
    if segments is not None:
        visible &= (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    return jnp.where(visible[:, None], scores, MASKED)


class Attention(nn.Module):
    config: NeoXConfig
    dtype: Any
    tp_ranks: int | None = None

    def setup(self):
        # [N, 3, H, D], [N, 3, H], [D, N, H], [D]
        names = ("query_key_value.weight", "query_key_value.bias", "dense.weight", "dense.bias")
        self.qkv_w, self.qkv_b, self.out_w, self.out_b = (declared_param(self, name, self.config, self.dtype)
                                                          for name in names)

    def __call__(self, x, positions, rotary, cache_kv, cache_positions, write_index, segments=None):
        """x [B, T, D], positions [B, T], rotary (cos, sin) [B, T, rotary_dim // 2] -> [B, T, D], cache_kv.
        Exact mode: x [R, B, T, D] -> each rank's output [R, B, T, D] (see `row_parallel_output`).

        The tokens attend causally to each other and, with `cache_kv` (this layer's keys and values,
        [B, N, S, H] each, holding `cache_positions` [B, S]), to the cached slots; their keys and values
        are then written at slot `write_index`. With `segments` [B, T] (no cache), only to tokens of
        segment 0 or of their own segment (`scores`).
        """
        c = self.config
        n, h, d = c.num_heads, c.head_dim, c.hidden_size

        # The projections run as plain 2-D matmuls over the weights as stored ([N, 3, H] and [N, H] are
        # contiguous, so the reshapes are free); head axes are named on the small activations instead.
        # Contracting over a 4-D weight made XLA transpose the weight every step (measured: 1.6 of 11 ms
        # per Pythia-70M decode step on CPU).
        # Exact mode: rank r's block of heads from its own LayerNorm output; ranks hold consecutive heads,
        # so [.., R, E/R] is [.., N, 3, H].
        (r, ranks), (b, t) = rank_axis(self.tp_ranks), x.shape[-3:-1]
        qkv = matmul(f"{r}BTD,{r}ED->BT{r}E", x, self.qkv_w.reshape(*ranks, -1, d), self.dtype)
        qkv = qkv.reshape(b, t, n, 3, h)
        qkv = qkv.transpose(0, 2, 3, 1, 4) + self.qkv_b[:, :, None]  # [B, N, 3, T, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, T, H] each
        q = apply_rotary(q, *rotary, c.rotary_dim)
        k = apply_rotary(k, *rotary, c.rotary_dim)

        parts = [(k, v, positions)]  # [B, N, T or S, H] keys and values, [B, T or S] their positions
        if cache_kv is not None:
            parts.insert(0, (*cache_kv, cache_positions))

        attended = attention(q, positions, parts, self.dtype, segments)  # [B, N, T, H]

        if cache_kv is not None:
            # The cache is written after it was read. XLA updates it in place only if it can tell the
            # reads come first, so the write is made to depend on their result (adding zero); without
            # that it copied the whole cache, twice, every step.
            after_reads = 0 * attended[:, :, :1, :1]
            cache_kv = tuple(write_slots(slots, new + after_reads, write_index, axis=2)
                             for slots, new in zip(cache_kv, (k, v)))
        attended = attended.transpose(0, 2, 1, 3).reshape(b, t, *ranks, -1)  # [B, T, (N, H)]; exact [B, T, R, E/R]
        out = matmul(f"BT{r}E,D{r}E->{r}BTD", attended, self.out_w.reshape(d, *ranks, -1), self.dtype)
        return row_parallel_output(out, self.out_b, c, self.tp_ranks), cache_kv


class MLP(nn.Module):
    config: NeoXConfig
    dtype: Any
    tp_ranks: int | None = None

    def setup(self):
        # [F, D], [F], [D, F], [D]
        names = ("dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias")
        self.up_w, self.up_b, self.down_w, self.down_b = (declared_param(self, name, self.config, self.dtype)
                                                          for name in names)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]; exact mode [R, B, T, D], each rank its F/R columns
        (r, ranks), d = rank_axis(self.tp_ranks), self.config.hidden_size
        # The bias and the exact GELU, in fp32, go with the matmul: on CPU the native kernels apply them to their
        # outputs (a decode step would otherwise run them as an XLA fusion of their own).
        up_b = per_rank(self.up_b.reshape(*ranks, -1), x.ndim).astype(F32)
        exact = self.config.activation == "gelu"
        up = contract(f"{r}BTD,{r}FD->{r}BTF", x, self.up_w.reshape(*ranks, -1, d), self.dtype, up_b, gelu=exact)
        hidden = (up if exact else gelu(up, self.config.activation)).astype(self.dtype)  # [B, T, F]
        out = matmul(f"{r}BTF,D{r}F->{r}BTD", hidden, self.down_w.reshape(d, *ranks, -1), self.dtype)
        return row_parallel_output(out, self.down_b, self.config, self.tp_ranks)


class Layer(nn.Module):
    config: NeoXConfig
    dtype: Any
    tp_ranks: int | None = None

    def setup(self):
        c, ranks = self.config, self.tp_ranks
        self.input_layernorm = LayerNorm(c, self.dtype, ranks)
        self.post_attention_layernorm = LayerNorm(c, self.dtype, ranks)
        self.attention = Attention(c, self.dtype, ranks)
        self.mlp = MLP(c, self.dtype, ranks)

    def __call__(self, x, positions, rotary, cache_kv, cache_positions, write_index, segments=None):
        # [B, T, D] -> same, cache_kv
        attn_out, cache_kv = self.attention(self.input_layernorm(x), positions, rotary, cache_kv, cache_positions,
                                            write_index, segments)
        if self.config.parallel_residual:  # GPT-NeoX sums both branches (and all-reduces them) before the residual
            x = x + all_reduce(attn_out + self.mlp(self.post_attention_layernorm(x)), self.tp_ranks)
        else:
            x = x + attn_out
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_kv


@flax.struct.dataclass
class NeoXOutput:
    logits: jax.Array  # fp32 [B, T or 1, V]
    cache: KVCache | None  # the cache with the tokens written, when one was given
    hidden_states: jax.Array | None = None  # [L + 1, B, T, D] with `return_hidden_states`


class NeoX(nn.Module):
    config: NeoXConfig
    dtype: Any = jnp.float32
    rotary_dtype: Any = None  # None: default_rotary_dtype(dtype)
    tp_ranks: int | None = None  # the exact tensor-parallel mode over this many ranks (None: merged)

    @property
    def rotary_table_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.rotary_dtype or default_rotary_dtype(self.dtype))

    def setup(self):
        c = self.config
        self.embed_in = declared_param(self, "embed_in", c, self.dtype)  # [V, D]
        self.layers = [Layer(c, self.dtype, self.tp_ranks) for _ in range(c.num_layers)]
        self.final_layer_norm = LayerNorm(c, self.dtype, self.tp_ranks)
        if not c.tie_word_embeddings:
            self.embed_out = declared_param(self, "embed_out", c, self.dtype)  # [V, D]

    def __call__(self, tokens, positions, cache: KVCache | None = None, *, segments=None,
                 last_token_only: bool = False, return_hidden_states: bool = False) -> NeoXOutput:
        """tokens, positions [B, T] (position -1 marks padding) -> logits fp32 [B, T or 1, V] and the cache.

        With a cache, the tokens are written at slots `cache.length ...` and attend to everything
        cached; without one, they attend causally (by position) among themselves. `segments` [B, T] int
        (no cache) packs several sequences sharing a prefix in one row: a token attends to the earlier
        positions of segment 0 (the prefix) and of its own segment only, so a segment whose positions
        continue the prefix's computes as prefix + segment alone would. `return_hidden_states` adds the
        residual stream after the embedding and after each layer, [L + 1, B, T, D].
        """
        if segments is not None and cache is not None:
            raise ValueError("segments are for rows computed without a cache")
        x, rotary = self.embed(tokens, positions)
        cache_positions, write_index = (None, None) if cache is None else (cache.positions, cache.length)
        layer_caches = [None] * len(self.layers) if cache is None else list(zip(cache.k, cache.v))
        hidden = [x]
        for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches)):
            x, layer_caches[i] = layer(x, positions, rotary, layer_cache, cache_positions, write_index, segments)
            hidden.append(x)
        if cache is not None:
            k, v = zip(*layer_caches)
            filled = write_slots(cache.positions, positions, write_index, axis=1)
            cache = KVCache(k=k, v=v, positions=filled, length=write_index + tokens.shape[1])

        logits = self.head(x[..., -1:, :] if last_token_only else x)
        if not return_hidden_states:
            return NeoXOutput(logits, cache)
        # Exact mode: rank 0's stream (every rank's is the same under the parallel residual).
        hidden = jnp.stack(hidden)[:, 0] if self.tp_ranks else jnp.stack(hidden)
        return NeoXOutput(logits, cache, hidden)

    def embed(self, tokens, positions):
        """tokens, positions [B, T] -> the residual stream entering the first layer [B, T, D] (exact mode: each
        rank's, [R, B, T, D]) and the rotary (cos, sin) [B, T, rotary_dim // 2] that every layer uses."""
        c = self.config
        rotary = rotary_cos_sin(positions, *rotary_tables(c.max_position_embeddings, c.rotary_dim, c.rotary_base,
                                                          self.rotary_table_dtype))
        _, ranks = rank_axis(self.tp_ranks)
        # Exact mode: the vocab-parallel lookup's all-reduce adds zeros to the one rank holding each row, so
        # every rank starts from this lookup exactly.
        x = self.embed_in[tokens]  # [B, T, D]
        return jnp.broadcast_to(x, (*ranks, *x.shape)), rotary

    def head(self, x):
        """The final LayerNorm and the output projection: residual stream [B, T, D] (exact mode: each rank's,
        [R, B, T, D], or one stream that every rank takes) -> fp32 logits [B, T, V]."""
        c = self.config
        r, ranks = rank_axis(self.tp_ranks)
        x = self.final_layer_norm(jnp.broadcast_to(x, (*ranks, *x.shape[-3:])))
        # Exact mode: each rank's final LayerNorm copy feeds its own block of the vocabulary (vocab-parallel).
        head = (self.embed_in if c.tie_word_embeddings else self.embed_out).reshape(*ranks, -1, c.hidden_size)
        logits = contract(f"{r}BTD,{r}VD->BT{r}V", x, head, self.dtype)
        return logits.reshape(*logits.shape[:2], -1)  # [B, T, V]

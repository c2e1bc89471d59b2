"""A minimal PyTorch GPT-NeoX, written independently of `neox_jax`, to check it against.

It follows the original GPT-NeoX training code (the one that produced the 20B "slim weights") rather than any
port of it, so that a bug shared by `neox_jax` and a port cannot hide:

* fused QKV projection whose output rows are head-major `[heads, (q, k, v), head_dim]`;
* rotary embedding on the first `rotary_dim` dims of each head, "rotate_half" style, with the cos/sin tables
  computed in the model dtype exactly as GPT-NeoX did (see `rotary_tables`);
* attention scores `baddbmm(q, k^T, alpha=1/sqrt(head_dim))`, so that in fp16 the scale is applied before the
  result is rounded (as the training code did; scaling afterwards can overflow fp16);
* softmax in fp32, cast back to the model dtype: the fused scaled-masked-softmax kernel GPT-NeoX trained with
  reads fp16 scores and computes in fp32, so this is its arithmetic, not an extra liberty;
* parallel residual `x + (attn(ln1(x)) + mlp(ln2(x)))` (branches summed first, then the residual, as the
  all-reduce ordering of the training code does) or sequential `h = x + attn(ln1(x)); h + mlp(ln2(h))`.

In fp32 everything is fp32. In fp16 weights and activations are fp16; the only fp32 arithmetic is what the
kernels do internally (matmul accumulation, LayerNorm statistics, GELU, softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_jax.config import NeoXConfig


def rotary_tables(rotary_dim: int, base: float, length: int, dtype: torch.dtype, device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[length, rotary_dim]`, computed as GPT-NeoX's RotaryEmbedding did.

    There `inv_freq` is computed in fp32 and registered as a buffer, so `model.half()` turns it fp16;
    positions are `arange(seq).type_as(inv_freq)` and the outer product, cos and sin all run in that dtype.
    In fp16 the angles are therefore rounded to fp16 before cos/sin, which the 20B weights were trained with.
    """
    inv_freq = (1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))).to(dtype)
    t = torch.arange(length, device=device).type_as(inv_freq)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: `[B, T, H, head_dim]`; cos/sin: `[T, rotary_dim]`. Only the first rotary_dim dims of each head turn."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class KVCache:
    """Rotated keys and values of every layer, `[B, H, S, head_dim]`, for incremental decoding."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, config: NeoXConfig, dtype, device):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = nn.Linear(d, 3 * d, dtype=dtype, device=device)
        self.dense = nn.Linear(d, d, dtype=dtype, device=device)

    def forward(self, x, cos, sin, cache: KVCache | None, index: int):
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        # Fused QKV rows are [heads, (q, k, v), head_dim]: split per head, not in three thirds.
        q, k, v = self.query_key_value(x).view(b, t, h, 3, hd).unbind(dim=3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        if cache is not None:
            if cache.k[index] is not None:
                k = torch.cat((cache.k[index], k), dim=2)
                v = torch.cat((cache.v[index], v), dim=2)
            cache.k[index], cache.v[index] = k, v
        s = k.shape[2]
        scores = torch.baddbmm(
            torch.empty(b * h, t, s, dtype=q.dtype, device=q.device),
            q.reshape(b * h, t, hd), k.reshape(b * h, s, hd).transpose(1, 2),
            beta=0.0, alpha=1.0 / math.sqrt(hd)).view(b, h, t, s)
        # Query i sits at absolute position s - t + i and sees keys 0 ..= that position.
        causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
        probs = torch.softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h * hd)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, config: NeoXConfig, dtype, device):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)
        # GPT-NeoX's fused bias-GELU is the tanh approximation; without the fusion it used the exact erf form.
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Layer(nn.Module):
    def __init__(self, config: NeoXConfig, dtype, device):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        self.attention = Attention(config, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x, cos, sin, cache, index):
        attn = self.attention(self.input_layernorm(x), cos, sin, cache, index)
        if self.parallel_residual:
            # GPT-NeoX adds the two branches (and all-reduces them across ranks) before adding the residual.
            return x + (self.mlp(self.post_attention_layernorm(x)) + attn)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoX(nn.Module):
    """Parameter names are the Hugging Face ones without the `gpt_neox.` prefix (`layers.3.attention.dense.weight`)."""

    def __init__(self, config: NeoXConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_in = nn.Embedding(config.vocab_size, d, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Layer(config, dtype, device) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.embed_out = (None if config.tie_word_embeddings
                          else nn.Linear(d, config.vocab_size, bias=False, dtype=dtype, device=device))
        self._rotary = None  # (cos, sin) for positions 0 .. len-1, grown on demand

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_in.weight.device

    def _rotary_slice(self, start: int, stop: int):
        if self._rotary is None or self._rotary[0].shape[0] < stop or self._rotary[0].device != self.device:
            length = max(stop, self.config.max_position_embeddings)
            self._rotary = rotary_tables(self.config.rotary_dim, self.config.rotary_base, length,
                                         self.dtype, self.device)
        cos, sin = self._rotary
        return cos[start:stop], sin[start:stop]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False):
        """tokens `[B, T]` -> logits `[B, T, V]` in the model dtype.

        With `cache`, the tokens continue the cached sequence (positions start at `cache.length`) and the cache
        is extended. With `return_hidden`, also returns the residual stream `[L + 1, B, T, D]`: the embedding
        output, then the output of each layer (before the final LayerNorm).
        """
        start = cache.length if cache is not None else 0
        cos, sin = self._rotary_slice(start, start + tokens.shape[1])
        x = self.embed_in(tokens)
        hidden = [x] if return_hidden else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
            if return_hidden:
                hidden.append(x)
        head = self.embed_in.weight if self.embed_out is None else self.embed_out.weight
        logits = F.linear(self.final_layer_norm(x), head)
        return (logits, torch.stack(hidden)) if return_hidden else logits

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, stop_token: int | None,
                 return_margins: bool = False):
        """Greedy decoding with a KV cache. Returns the new tokens, ending before `stop_token` (None: never).

        With `return_margins`, also returns, for each step (the one that produced the stop token included),
        the top-1 minus top-2 logit in fp32: how close that greedy choice was to a tie.
        """
        cache = KVCache(len(self.layers))
        tokens, margins = greedy(
            lambda ids: self(torch.tensor([ids], dtype=torch.long, device=self.device), cache=cache)[0, -1],
            prompt_ids, max_new_tokens, stop_token)
        return (tokens, margins) if return_margins else tokens


def greedy(next_logits, prompt_ids: list[int], max_new_tokens: int, stop_token: int | None):
    """Greedy decoding through `next_logits(ids)`, which feeds token ids to a model keeping its own KV cache and
    returns the logits after the last of them -> the new tokens, ending before `stop_token` (None: never), and
    each step's top-1 minus top-2 logit in fp32 (the stop token's step included)."""
    tokens, margins, ids = [], [], prompt_ids
    for _ in range(max_new_tokens):
        logits = next_logits(ids).float()
        top2 = torch.topk(logits, 2).values
        token = int(torch.argmax(logits))
        margins.append(float(top2[0] - top2[1]))
        if token == stop_token:
            break
        tokens.append(token)
        ids = [token]
    return tokens, margins

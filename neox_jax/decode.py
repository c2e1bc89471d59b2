"""Greedy decoding: a jit-compiled prefill, then an on-device `lax.while_loop` over a fixed-shape KV cache.

Prompts are left-padded to a shared length so one write index serves the whole batch; each row keeps
its own positions (padding has position -1 and is never attended to), so a prompt decoded in a batch
gives the same tokens as alone. Batch size, prompt length and cache size are rounded up to buckets and
`max_new_tokens` and the stop token are traced values, so new prompt lengths within a bucket, or a
different number of new tokens within the cache bucket, reuse the compiled programs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import NeoXConfig
from .model import KVCache, NeoX

NO_STOP = -1


class GenerationError(ValueError):
    """Bad generation request: empty prompt, unknown token id, too long for the context."""


def length_bucket(n: int) -> int:
    """Powers of two up to 256, then multiples of 256: few shapes, at most ~12% padding past 256."""
    for size in (16, 32, 64, 128, 256):
        if n <= size:
            return size
    return -(-n // 256) * 256


def batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Compiled:
    """`jax.jit` compiled ahead of time per input signature, so compilations are counted and timed."""

    def __init__(self, fn: Callable, donate_argnums=()):
        self._jit = jax.jit(fn, donate_argnums=donate_argnums)
        self._executables: dict = {}
        self.compiles = 0
        self.compile_seconds = 0.0

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
        if key not in self._executables:
            start = time.perf_counter()
            self._executables[key] = self._jit.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self.compiles += 1
        return self._executables[key](*args)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, without the stop token
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # forward passes after the prefill (the batch advances together)
    compile_seconds: float


def validate_request(config: NeoXConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        if len(prompt) + max_new_tokens > config.max_position_embeddings:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(prompt) + max_new_tokens}, beyond the model's context of {config.max_position_embeddings}")


def left_pad(prompts: Sequence[Sequence[int]], batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens, positions [batch, length]; padding (extra rows too) has token 0 and position -1."""
    tokens = np.zeros((batch, length), np.int32)
    positions = np.full((batch, length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, length - n:] = prompt
        positions[row, length - n:] = np.arange(n)
    return tokens, positions


class Decoder:
    def __init__(self, module: NeoX, params):
        self.module = module
        self.params = params
        self._prefill = Compiled(self._prefill_fn, donate_argnums=(3,))
        self._decode = Compiled(self._decode_fn, donate_argnums=(1,))

    @property
    def compiles(self) -> int:
        return self._prefill.compiles + self._decode.compiles

    def _prefill_fn(self, params, tokens, positions, cache):
        logits, cache = self.module.apply({"params": params}, tokens, positions, cache, last_token_only=True)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def _decode_fn(self, params, cache, first, next_positions, active, max_new_tokens, stop_token):
        """Greedy steps until every row stopped or max_new_tokens are out -> tokens [B, slots], steps, cache.

        The cache is donated and returned so the loop updates it in place."""
        batch, slots = cache.positions.shape
        out = jnp.full((batch, slots), NO_STOP, jnp.int32).at[:, 0].set(first)
        done = ~active | (first == stop_token)

        def keep_going(state):
            step, _, _, done, _, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def step_fn(state):
            step, token, positions, done, out, cache = state
            logits, cache = self.module.apply({"params": params}, token[:, None], positions[:, None], cache)
            token = jnp.where(done, NO_STOP, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
            done = done | (token == stop_token)
            return step + 1, jnp.maximum(token, 0), positions + 1, done, out, cache

        state = (jnp.int32(1), first, next_positions, done, out, cache)
        step, _, _, _, out, cache = jax.lax.while_loop(keep_going, step_fn, state)
        return out, step, cache

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_token: int | None = 0) -> Generation:
        config = self.module.config
        validate_request(config, prompts, max_new_tokens)
        batch = batch_bucket(len(prompts))
        prompt_len = length_bucket(max(len(p) for p in prompts))
        slots = length_bucket(prompt_len + max_new_tokens - 1)
        tokens, positions = left_pad(prompts, batch, prompt_len)
        prefill_compile, decode_compile = self._prefill.compile_seconds, self._decode.compile_seconds

        start = time.perf_counter()
        cache = KVCache.init(config, batch, slots, self.module.dtype)
        first, cache = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(positions), cache)
        first.block_until_ready()
        prefill_compile = self._prefill.compile_seconds - prefill_compile
        prefill_seconds = time.perf_counter() - start - prefill_compile

        start = time.perf_counter()
        lengths = np.zeros(batch, np.int32)
        lengths[:len(prompts)] = [len(p) for p in prompts]
        active = np.arange(batch) < len(prompts)
        stop = NO_STOP if stop_token is None else stop_token
        out, steps, _ = self._decode(self.params, cache, first, jnp.asarray(lengths), jnp.asarray(active),
                                  jnp.int32(max_new_tokens), jnp.int32(stop))
        out, steps = np.asarray(out), int(steps)
        decode_compile = self._decode.compile_seconds - decode_compile
        decode_seconds = time.perf_counter() - start - decode_compile

        completions = []
        for row in out[:len(prompts), :steps]:
            row = row[row != NO_STOP].tolist()
            completions.append(row[:row.index(stop)] if stop in row else row)
        return Generation(completions, prefill_seconds, decode_seconds, steps - 1,
                          prefill_compile + decode_compile)

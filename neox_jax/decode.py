"""Decoding: a jit-compiled prefill, then an on-device `lax.while_loop` over a fixed-shape KV cache.

Prompts are left-padded to a shared length so one write index serves the whole batch; each row keeps
its own positions (padding has position -1 and is never attended to), so a prompt decoded in a batch
gives the same tokens as alone. Batch size, prompt length and cache size are rounded up to buckets and
`max_new_tokens`, the stop token and the sampling settings are traced values, so new prompt lengths
within a bucket, another number of new tokens within the cache bucket, or other sampling settings reuse
the compiled programs. Streaming runs the same loop a chunk of steps at a time, the state staying on device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import NeoXConfig
from .model import KVCache, NeoX
from .sampling import NONFINITE, Sampling, row_salt, select_token
from .sharding import BATCH_SPEC, CACHE_SPEC, DATA, make_mesh, put, to_host

FINISHED = -1  # what a finished (or padding) row holds after its stop token in the decoder's output
# Long prompts are prefilled this many tokens at a time through the cache, so the fp32 attention scores
# ([B, N, chunk, slots]) stay small: 4.3 GB per layer for 20B at batch 32 and 2048 slots, instead of 34 GB.
# Prompt buckets above 256 are multiples of 256, so every long prompt shares one prefill program.
PREFILL_CHUNK = 256


class GenerationError(ValueError):
    """Bad generation request: empty prompt, unknown token id, too long for the context."""


class NonFiniteLogitsError(ArithmeticError):
    """The model's logits for a row held a NaN or an infinity, so no token could be chosen."""

    def __init__(self, row: int, step: int):
        self.row, self.step = row, step
        super().__init__(f"prompt {row}, generated token {step}: the model's logits are not finite (NaN or "
                         f"infinity), so no token was chosen; non-finite weights, or activations overflowing "
                         f"the dtype (try --dtype float32)")


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

    def __init__(self, fn: Callable, donate_argnums=(), **jit_options):
        self._jit = jax.jit(fn, donate_argnums=donate_argnums, **jit_options)
        self._executables: dict = {}
        self.compiles = 0
        self.compile_seconds = 0.0

    def lower(self, *args):
        """The program for these arguments (arrays or abstract shapes), lowered but not compiled."""
        return self._jit.lower(*args)

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
        if key not in self._executables:
            start = time.perf_counter()
            self._executables[key] = self.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self.compiles += 1
        return self._executables[key](*args)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]] = dataclasses.field(default_factory=list)  # new tokens per prompt, no stop token
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # forward passes after the prefill (the batch advances together)
    compile_seconds: float = 0.0

    @contextlib.contextmanager
    def measure(self, phase: str, compiled: Compiled):
        """Add the wall time of the block to `{phase}_seconds`, less any compilation inside it."""
        start, compiling = time.perf_counter(), compiled.compile_seconds
        yield
        compile_seconds = compiled.compile_seconds - compiling
        self.compile_seconds += compile_seconds
        setattr(self, f"{phase}_seconds",
                getattr(self, f"{phase}_seconds") + time.perf_counter() - start - compile_seconds)


def check_stop_token(config: NeoXConfig, stop_token: int | None) -> None:
    if stop_token is not None and (isinstance(stop_token, bool) or not isinstance(stop_token, (int, np.integer))
                                   or not 0 <= stop_token < config.vocab_size):
        raise GenerationError(f"stop token {stop_token!r} is outside the vocabulary [0, {config.vocab_size})")


def validate_request(config: NeoXConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_token: int | None = None) -> None:
    check_stop_token(config, stop_token)
    if not prompts:
        raise GenerationError("no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
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


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries between chunks; it stays on device."""

    cache: KVCache
    token: jax.Array  # [B] last chosen token, the next step's input
    positions: jax.Array  # [B] its position
    done: jax.Array  # [B] bool: stopped, or a padding row
    step: jax.Array  # [] int32: tokens chosen so far (seeds each step's random draw)
    salt: jax.Array  # [B] uint32: each row's part of its random key (a hash of its prompt)


class Decoder:
    def __init__(self, module: NeoX, params, mesh: Mesh | None = None):
        self.module = module
        self.params = params
        self.mesh = mesh or make_mesh(1, 1)
        self._prefill = Compiled(self._prefill_fn, donate_argnums=(3,))
        self._decode = Compiled(self._decode_fn, donate_argnums=(1,))

    @property
    def compiles(self) -> int:
        return self._prefill.compiles + self._decode.compiles

    def _sharded(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _constrain(self, state: DecodeState) -> DecodeState:
        """Keep the carried state split as planned: the cache by heads and batch, per-row values by batch."""
        kv, rows = self._sharded(CACHE_SPEC), self._sharded(BATCH_SPEC)
        constrain = jax.lax.with_sharding_constraint  # of a pytree: of each of its arrays
        cache = state.cache.replace(k=constrain(state.cache.k, kv), v=constrain(state.cache.v, kv),
                                    positions=constrain(state.cache.positions, rows))
        token, positions, done, salt = constrain((state.token, state.positions, state.done, state.salt), rows)
        return DecodeState(cache, token, positions, done, state.step, salt)

    def place_rows(self, array: np.ndarray) -> jax.Array:
        """Host array with a leading batch axis -> device array split over the mesh's data axis."""
        return put(array, self._sharded(BATCH_SPEC))

    def batch_size(self, rows: int) -> int:
        """Rows padded to a bucket that the data axis divides."""
        data = self.mesh.shape[DATA]
        return -(-batch_bucket(rows) // data) * data

    def new_cache(self, batch: int, slots: int) -> KVCache:
        """An empty cache made on device in its shards (made inside a program, its constant empty slots would
        be constant-folded through attention at compile time)."""
        return _cache_initializer(self.module.config, batch, slots, jnp.dtype(self.module.dtype), self.mesh)()

    def _prefill_fn(self, params, tokens, positions, cache, sampling, stop_token, active, salt):
        out = self.module.apply({"params": params}, tokens, positions, cache, last_token_only=True)
        first = select_token(out.logits[:, -1], sampling, jnp.int32(0), salt)
        done = ~active | (first == stop_token) | (first == NONFINITE)
        return self._constrain(DecodeState(out.cache, first, positions[:, -1] + 1, done, jnp.int32(1), salt))

    def _decode_fn(self, params, state: DecodeState, sampling, stop_token, steps):
        """Up to `steps` more tokens, fewer once every row is done -> tokens [B, slots], count, state.

        The state (with the cache) is donated and returned, so the loop updates the cache in place and
        the next chunk continues from it."""
        batch, slots = state.cache.positions.shape
        out = jnp.full((batch, slots), FINISHED, jnp.int32)

        def keep_going(carry):
            i, state, _ = carry
            return (i < steps) & ~jnp.all(state.done)

        def step_fn(carry):
            i, state, out = carry
            forward = self.module.apply({"params": params}, state.token[:, None], state.positions[:, None], state.cache)
            chosen = select_token(forward.logits[:, -1], sampling, state.step, state.salt)
            token = jnp.where(state.done, FINISHED, chosen)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            state = DecodeState(forward.cache, jnp.maximum(token, 0), state.positions + 1,
                                state.done | (token == stop_token) | (token == NONFINITE), state.step + 1,
                                state.salt)
            return i + 1, state, out

        count, state, out = jax.lax.while_loop(keep_going, step_fn, (jnp.int32(0), state, out))
        return out, count, self._constrain(state)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None, *,
               stop_token: int | None, chunk: int | None = None, timing: "Generation | None" = None):
        """Yield new tokens as [rows, n] int arrays, `chunk` steps at a time (default: all at once).

        A row ends after `stop_token` (None: never); finished rows then hold FINISHED. `timing`, if given,
        accumulates seconds.
        Raises NonFiniteLogitsError, naming the row and step, if a row's logits are not finite.
        """
        config = self.module.config
        validate_request(config, prompts, max_new_tokens, stop_token)
        sampling = sampling or Sampling.create()
        stop = jnp.int32(-1 if stop_token is None else stop_token)  # no chosen token is negative: never matches
        batch = self.batch_size(len(prompts))
        prompt_len = length_bucket(max(len(p) for p in prompts))
        slots = length_bucket(prompt_len + max_new_tokens - 1)
        tokens, positions = left_pad(prompts, batch, prompt_len)
        rows = len(prompts)
        timing = timing or Generation()

        with timing.measure("prefill", self._prefill):
            cache, active = self.new_cache(batch, slots), self.place_rows(np.arange(batch) < rows)
            salt = self.place_rows(np.array([row_salt(p) for p in prompts] + [0] * (batch - rows), np.uint32))
            piece = min(prompt_len, PREFILL_CHUNK)
            for start in range(0, prompt_len, piece):  # the last piece's choice is the first new token
                state = self._prefill(self.params, self.place_rows(tokens[:, start:start + piece]),
                                      self.place_rows(positions[:, start:start + piece]), cache, sampling, stop,
                                      active, salt)
                cache = state.cache
            first = to_host(state.token)[:rows, None]
        _check_finite(first, 0)
        yield first

        produced = 1
        while produced < max_new_tokens and not to_host(state.done).all():
            with timing.measure("decode", self._decode):
                out, count, state = self._decode(self.params, state, sampling, stop,
                                                 jnp.int32(min(chunk or max_new_tokens, max_new_tokens - produced)))
                count = int(to_host(count))
                out = to_host(out)[:rows, :count]
            timing.decode_steps += count
            _check_finite(out, produced)
            produced += count
            yield out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None, *,
                 stop_token: int | None) -> Generation:
        timing = Generation()
        chunks = list(self.stream(prompts, max_new_tokens, sampling, stop_token=stop_token, timing=timing))
        timing.tokens = [completion_tokens(row, stop_token) for row in np.concatenate(chunks, axis=1)]
        return timing


def _check_finite(chunk: np.ndarray, first_step: int) -> None:
    """Raise for the first row of a [rows, n] chunk of new tokens that holds the NONFINITE marker."""
    rows, steps = np.nonzero(chunk == NONFINITE)
    if len(rows):
        raise NonFiniteLogitsError(int(rows[0]), first_step + int(steps[0]))


@functools.lru_cache(maxsize=None)
def _cache_initializer(config: NeoXConfig, batch: int, slots: int, dtype, mesh: Mesh):
    """A jitted zero cache created directly in its shards."""
    rows, kv = NamedSharding(mesh, BATCH_SPEC), NamedSharding(mesh, CACHE_SPEC)
    shardings = KVCache(k=kv, v=kv, positions=rows, length=NamedSharding(mesh, P()))
    return jax.jit(lambda: KVCache.init(config, batch, slots, dtype), out_shardings=shardings)


def completion_tokens(row: np.ndarray, stop_token: int | None) -> list[int]:
    """A row of decoder output -> its new tokens, ending before the stop token."""
    tokens = row[row != FINISHED].tolist()
    return tokens[:tokens.index(stop_token)] if stop_token in tokens else tokens

"""Continuous batching: a fixed set of decode slots over one KV cache; requests join and leave between turns.

One thread owns the model. Each loop turn it admits waiting requests into free slots (each prefilled on its
own, a row of the cache at a time; while others decode, about one prefill chunk of prompt tokens a turn),
then decodes every slot at once, hands each active request its tokens, and frees at once the slots whose
requests finished, stopped or were cancelled. A turn decodes `decode_chunk` steps in one on-device loop while
no request waits for a slot (one while some do, so that they are admitted at the next step): the host's part
of a step (dispatching the program, copying a slot bucket's rows in and out, handing out tokens) is paid once
per chunk, not per token. The device ends a row at its stop token, a non-finite token or its token budget;
stop strings and cancellations are seen by the host after the chunk, and a row's tokens past its end are
dropped. So a stream's tokens come in bursts: the first of a chunk waits for the chunk's last.

The cache: every row has its own write index (`KVCache.length` [B], see neox_jax/model.py) and holds one
request laid out from slot 0, at slot = position. So a request's keys and values lie in the same slots, and
every sum over them runs in the same order, whatever the other rows hold: decoded in a full batch it gives
exactly the tokens it gives alone (greedy, and sampled with the same seed). The left-padded layout of
`decode.Decoder` shares one write index and so cannot take a newcomer mid-batch without moving every row;
a ring buffer shared by all rows would place a request's slots by its arrival time, changing its sums'
order. The per-row write is a scatter that XLA does in place (tests/test_serve_engine.py checks the step
moves no cache-sized array), and it costs nothing measurable: a Pythia-70M-shaped forward step at batch 8
over 128 slots took 20.5 ms with a write index per row and 20.0 ms with one shared index (CPU, one run, best
of four); the whole engine step, sampling included, 20.9 ms, and `Decoder`'s on-device loop 20.6 ms a step.
Each row's first prefill chunk clears the row, so nothing of the previous request can reach the next (masked
slots weigh exactly 0, but 0 * inf would be NaN).

Slot buckets: active requests are kept in the lowest rows (when one ends, the request in the highest row moves
into its row: a copy of that row's cache), and each decode step computes only the first b rows, b the
smallest of 1, 2, 4, ..., max_batch that holds them, so a lone request costs a batch-1 step, not a
max_batch one. A matmul over b rows need not round as one over 8 does (XLA:CPU picks its kernel by shape:
Pythia-70M's logits moved by up to 2.5e-6 between batch 1 and 8), so with buckets a request's tokens can
depend, in near-ties, on how many others run with it, as `generate`'s depend on its batch bucket.
`exact_batching=True` (`serve --exact-batching`) computes every slot at every step instead, and a request
then gives bit for bit the tokens and log-probabilities it gives alone. A turn over b < max_batch rows copies
those rows of the cache out and back (XLA does not update a slice of the donated cache in place): 2 x b rows'
keys and values more moved per turn, against max_batch - b rows' weights-sized work saved per step.

Programs are compiled for fixed shapes when the engine is built, before the first request: the decode loop
for each slot bucket ([b] tokens over the cache's first b rows, up to `decode_chunk` steps) and one prefill per
prompt-length bucket (16, 32, ..., 256; longer prompts are prefilled 256 tokens at a time, as `decode.Decoder`
does). Requests coming and going never recompile; `compiles` counts compilations so tests can check that.

Prefix caching (`prefix_cache.py`): each full prefill chunk of a prompt is kept, after it is computed, as a block
of keys and values named by a digest of its tokens and every token before them; a later prompt that starts with
the same tokens copies those blocks into its row instead of prefilling them (two more compiled programs: a block
out of a row, a block into one). The chunk holding a prompt's last token is always computed (its logits choose
the first token), as is every chunk of a request that asks for the prompt's log-probabilities. The copied bits
are the ones the prefill would have written, so a request's tokens and log-probabilities are identical with or
without the cache.

Speculative decoding (`draft=`, `serve --draft`; the algorithm and what it guarantees: neox_jax/speculative.py):
each turn runs one pass over the slot bucket instead of one step. The draft proposes K tokens per row (a model
draft from its own cache, rows and slots as the target's, prefilled with each prompt but its last token;
prompt lookup from each row's prompt and tokens so far, kept on the host), the target computes its logits after
[last token, d_1 .. d_K] in one forward pass, `speculative.verify` keeps each row's agreeing prefix and the
target's next token, and each row's write index moves back past its rejected tokens. Rows accept different
numbers; each row draws with its own settings and steps (1 + its passes x (K + 1), as `Speculator`), so a
request gets the tokens `generate(..., draft=)` gives it. Cache rows hold K slots more (a pass writes K + 1).
Log-probabilities come from the pass's logits: the plain step's, to rounding.

Sampling reuses `sampling.select_token` row by row (vmapped), with the decoder's random keys: the seed, the
token's index and a hash of the prompt, so a seeded request gives the same tokens here as through
`Decoder.generate` whenever the logits agree. When every active row is greedy, one argmax serves the batch
(no sort). Log-probabilities are those of the model's distribution (a log-softmax of the raw logits, before
temperature, top-k and top-p), with up to MAX_LOGPROBS alternatives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
import time
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ..decode import PREFILL_CHUNK, Compiled, GenerationError, length_bucket
from ..drafts import ModelDraft, rewind_cache, rowwise
from ..model import KVCache, NeoX
from ..sampling import NONFINITE, Sampling, row_salt, select_token
from ..speculative import DEFAULT_DRAFT_TOKENS, check_num_draft_tokens, draft_for, verify
from ..sharding import BATCH_SPEC, CACHE_SPEC, DATA, put, to_host
from .prefix_cache import PrefixCache, block_digests

logger = logging.getLogger("neox_jax.serve")

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's completions API allows
DECODE_CHUNK = 4  # decode steps per host turn while no request waits (the first token of a chunk waits 3 steps)


class QueueFull(RuntimeError):
    """The bounded queue of waiting requests is full: try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass
class TokenLogprobs:
    logprob: float  # of the token, under the model's distribution
    top: list[tuple[int, float]]  # the likeliest tokens and their log-probabilities, likeliest first


class Sink(Protocol):
    """Where a request's results go; called on the engine's thread, so it must be quick."""

    def prompt_logprobs(self, scores: list[TokenLogprobs | None]) -> None:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""

    def token(self, token: int, logprobs: TokenLogprobs | None) -> bool:
        """A new token; return False to end the request here (a stop string was completed)."""

    def finish(self, reason: str, error: str | None = None) -> None:
        """Called once: "length", "stop" (the stop token, or token() returned False), "cancelled" or "error"."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int  # 0: only prefill (prompt scoring)
    sink: Sink
    sampling: Sampling = dataclasses.field(default_factory=Sampling.create)
    stop_token: int | None = None
    logprobs: int | None = None  # alternatives per generated token (0..MAX_LOGPROBS); None: no log-probs
    prompt_logprobs: bool = False  # score the prompt (OpenAI's echo with logprobs)
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    generated: int = 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def cancel(self) -> None:
        """Thread-safe: the engine frees the request's slot before its next step, or drops it from the queue."""
        self.cancelled = True


class Engine:
    def __init__(self, model, max_batch: int = 8, context: int | None = None, max_queue: int = 64,
                 on_first_token=None, on_step=None, prefix_cache_bytes: int = 0, exact_batching: bool = False,
                 draft=None, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, on_pass=None,
                 decode_chunk: int = DECODE_CHUNK):
        """`model`: a NeoXModel. `context`: the most tokens (prompt + new) of one request, at most the model's
        context (default). `max_queue`: requests waiting for a slot before `submit` raises QueueFull.
        `prefix_cache_bytes`: the prefix cache's budget on device (0: no prefix cache; prompts longer than one
        prefill chunk only can use it). `exact_batching`: every step computes every slot (see the module's
        docstring), else only the slot bucket that holds the active requests.
        `draft`: speculative decoding (see the module's docstring) with a NeoXModel of the same tokenizer or
        "ngram", `num_draft_tokens` (K) proposed per pass; `on_pass(rows, accepted, tokens)` is called after
        each pass with the rows it served, the drafts they accepted and the tokens handed out.
        `decode_chunk`: decode steps per turn on the device while no request waits (1: a turn per token).
        `on_first_token(seconds)`: called with each request's time from submission to its first token;
        `on_step(seconds)` with each decode step's time (the device's, and handing out its tokens; a turn of
        several steps counts each as its share)."""
        config = model.config
        context = context or config.max_position_embeddings
        if not 1 <= context <= config.max_position_embeddings:
            raise GenerationError(f"context {context} must be in [1, {config.max_position_embeddings}] "
                                  f"(the model's context)")
        data = model.mesh.shape[DATA]
        if max_batch < 1 or max_batch % data:
            raise GenerationError(f"max batch {max_batch} must be a positive multiple of the mesh's data axis ({data})")
        if max_queue < 1:
            raise GenerationError(f"max queue {max_queue} must be >= 1")
        if decode_chunk < 1:
            raise GenerationError(f"the decode chunk must be >= 1 step, got {decode_chunk}")
        if prefix_cache_bytes < 0:
            raise GenerationError(f"the prefix cache's budget must be >= 0 bytes, got {prefix_cache_bytes}")
        self.model, self.module, self.params, self.mesh = model, model.module, model.params, model.mesh
        self.config, self.context, self.batch, self.max_queue = config, context, max_batch, max_queue
        self.k = 0 if draft is None else check_num_draft_tokens(num_draft_tokens)
        self.draft, self.draft_params = (None, None) if draft is None else draft_for(model, draft)
        self.draft_model = draft if isinstance(self.draft, ModelDraft) else None
        if self.draft_model is not None and context > self.draft_model.config.max_position_embeddings:
            raise GenerationError(f"the draft's context is {self.draft_model.config.max_position_embeddings} "
                                  f"tokens, shorter than the served context of {context}")
        # Any prompt of up to `context` tokens is written in chunks that end within length_bucket(context); a
        # speculative pass writes K + 1 slots from a row's last token, so it needs K more.
        self.slots_per_row = length_bucket(context + self.k)
        self.prefill_buckets = tuple(b for b in (16, 32, 64, 128, 256)
                                     if b <= min(length_bucket(context), PREFILL_CHUNK))
        self.on_first_token, self.on_step, self.on_pass = on_first_token, on_step, on_pass
        self.exact_batching, self.decode_chunk = exact_batching, decode_chunk
        # Slot buckets the data axis divides: each is split over it as the full batch is.
        buckets = {max_batch} if exact_batching else {1 << i for i in range(max_batch.bit_length())} | {max_batch}
        self.slot_buckets = tuple(sorted(b for b in buckets if b % data == 0 and b <= max_batch))
        self._rows = NamedSharding(self.mesh, BATCH_SPEC)
        # The cache comes back in the shards it went in with, so each program's output is its next input.
        placed = self._cache_shardings()
        self._prefill = Compiled(self._prefill_fn, donate_argnums=(1,), out_shardings=(placed,) + (None,) * 7)
        self._step = Compiled(self._step_fn, donate_argnums=(1,), out_shardings=(placed,) + (None,) * 5)
        itemsize = jnp.dtype(self.module.dtype).itemsize
        block_bytes = 2 * config.num_layers * config.hidden_size * PREFILL_CHUNK * itemsize
        # Only a prompt longer than a chunk has a chunk before its last token's.
        self.prefix_cache = PrefixCache(prefix_cache_bytes, block_bytes) \
            if context > PREFILL_CHUNK and prefix_cache_bytes >= block_bytes else None
        self._save_block = Compiled(self._save_block_fn)
        self._load_block = Compiled(self._load_block_fn, donate_argnums=(0,), out_shardings=placed)
        self._move_row = Compiled(self._move_row_fn, donate_argnums=(0,), out_shardings=placed)
        self._cache = self._new_cache(self.module)
        if self.draft is not None:
            self._speculate = Compiled(self._speculate_fn, donate_argnums=(2, 3),
                                       out_shardings=(placed, placed if self.draft_model else None) + (None,) * 5)
        self._draft_cache = None
        if self.draft_model is not None:
            self._draft_prefill = Compiled(functools.partial(self._fill_fn, self.draft_model.module),
                                           donate_argnums=(1,), out_shardings=placed)
            self._draft_cache = self._new_cache(self.draft_model.module)
        self._requests: list[Request | None] = [None] * max_batch
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Per-slot state, on the host: what each decode step needs besides the cache.
        self._token = np.zeros(max_batch, np.int32)
        self._position = np.zeros(max_batch, np.int32)
        self._salt = np.zeros(max_batch, np.uint32)
        self._temperature = np.zeros(max_batch, np.float32)
        self._top_k = np.zeros(max_batch, np.int32)
        self._top_p = np.ones(max_batch, np.float32)
        self._key = np.zeros((max_batch, 2), np.uint32)
        # With a draft: the token before each slot's last (a model draft's first step feeds both), the passes
        # each slot has run (they key its random draws), and its prompt and tokens so far (prompt lookup reads them).
        self._prev = np.zeros(max_batch, np.int32)
        self._passes = np.zeros(max_batch, np.int32)
        lookup = self.draft is not None and self.draft_model is None
        self._history = np.zeros((max_batch, self.slots_per_row if lookup else 1), np.int32)
        self._filled = np.zeros(max_batch, np.int32)
        self._compile()

    # ---- programs ----

    def _cache_shardings(self) -> KVCache:
        kv = NamedSharding(self.mesh, CACHE_SPEC)
        return KVCache(k=kv, v=kv, positions=self._rows, length=self._rows)

    def _new_cache(self, module: NeoX) -> KVCache:
        def init():
            cache = KVCache.init(module.config, self.batch, self.slots_per_row, jnp.dtype(module.dtype))
            return cache.replace(length=jnp.zeros(self.batch, jnp.int32))

        return jax.jit(init, out_shardings=self._cache_shardings())()

    def _prefill_fn(self, params, cache: KVCache, row, start, tokens, positions, targets, last, end, sampling, salt,
                    want_logprobs, want_prompt_scores):
        """Prefill one chunk of one request into cache row `row`, from slot `start` (0: the first chunk, which
        clears the row). tokens, positions, targets [1, T] (padding: position -1; targets[t] is the prompt
        token after position t); last, end: the chunk's last real index and the row's filled length after it.
        -> the cache, the token chosen after `last`, its log-probability and alternatives [K] (zeros unless
        `want_logprobs`), and each chunk position's target log-probability and alternatives [T], [T, K] (zeros
        unless `want_prompt_scores`)."""
        # The logits of the chunk's last real token (it is right-padded), and of every token only when the
        # prompt is scored: the output projection over all positions costs more than the rest of a short prefill.
        cache, out = _write_row(self.module, params, cache, row, start, tokens, positions, end,
                                return_hidden_states=True)
        final = out.hidden_states[-1]  # [1, T, D]: the residual stream before the final LayerNorm
        head = lambda x: self.module.apply({"params": params}, x, method=NeoX.head)[0]  # noqa: E731  [T, D] -> [T, V]
        logits = head(jax.lax.dynamic_slice_in_dim(final, last, 1, axis=1))[0]  # [V]
        first = select_token(logits[None], sampling, jnp.int32(0), salt[None])[0]

        def first_scores():
            logprobs = jax.nn.log_softmax(logits)
            top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
            return logprobs[jnp.maximum(first, 0)], top_ids.astype(jnp.int32), top_lp

        none = (jnp.float32(0), jnp.zeros(MAX_LOGPROBS, jnp.int32), jnp.zeros(MAX_LOGPROBS))
        first_lp, first_top_ids, first_top_lp = jax.lax.cond(want_logprobs, first_scores, lambda: none)

        def scores():
            logprobs = jax.nn.log_softmax(head(final))  # [T, V]
            top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
            return jnp.take_along_axis(logprobs, targets[0][:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

        t = tokens.shape[1]
        nothing = (jnp.zeros(t), jnp.zeros((t, MAX_LOGPROBS), jnp.int32), jnp.zeros((t, MAX_LOGPROBS)))
        target, top_ids, top_lp = jax.lax.cond(want_prompt_scores, scores, lambda: nothing)
        return cache, first, first_lp, first_top_ids, first_top_lp, target, top_ids, top_lp

    @staticmethod
    def _fill_fn(module: NeoX, params, cache: KVCache, row, start, tokens, positions, end) -> KVCache:
        """A draft's prefill: one chunk into its cache row `row`, as `_prefill_fn` writes the model's."""
        return _write_row(module, params, cache, row, start, tokens, positions, end)[0]

    def _save_block_fn(self, cache: KVCache, row, start):
        """The keys and values of row `row`'s slots start .. start + PREFILL_CHUNK: per layer [N, chunk, H] each."""
        take = lambda x: jax.lax.dynamic_slice(x, (row, 0, start, 0), (1, x.shape[1], PREFILL_CHUNK, x.shape[3]))[0]  # noqa: E731
        return tuple(map(take, cache.k)), tuple(map(take, cache.v))

    def _load_block_fn(self, cache: KVCache, row, start, k_block, v_block):
        """Row `row` with a block written at slots start .. start + PREFILL_CHUNK and filled up to its end; from
        slot 0, the row is cleared first (as a first prefill chunk clears it)."""
        fresh = start == 0

        def put_block(slots, block):
            old = jax.lax.dynamic_slice_in_dim(slots, row, 1, axis=0)
            new = jax.lax.dynamic_update_slice(jnp.where(fresh, 0, old).astype(slots.dtype), block[None], (0, 0, start, 0))
            return jax.lax.dynamic_update_slice_in_dim(slots, new, row, axis=0)

        old = jax.lax.dynamic_slice_in_dim(cache.positions, row, 1, axis=0)
        positions = jax.lax.dynamic_update_slice(jnp.where(fresh, -1, old),
                                                 (start + jnp.arange(PREFILL_CHUNK, dtype=jnp.int32))[None], (0, start))
        return KVCache(k=tuple(map(put_block, cache.k, k_block)), v=tuple(map(put_block, cache.v, v_block)),
                       positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, row, axis=0),
                       length=cache.length.at[row].set(start + PREFILL_CHUNK))

    def _move_row_fn(self, cache: KVCache, source, target):
        """The cache with row `source` copied into row `target` (keys, values, positions, write index)."""
        move = lambda x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            x, jax.lax.dynamic_slice_in_dim(x, source, 1, axis=0), target, axis=0)
        return KVCache(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)), positions=move(cache.positions),
                       length=move(cache.length))

    def _step_fn(self, params, cache: KVCache, tokens, positions, active, sampling: Sampling, steps, salts,
                 want_logprobs, stop_tokens, budgets, count):
        """Up to `count` decode steps (at most `decode_chunk`) for the first b slots, fewer once every row has
        ended: tokens, positions, active, steps, salts, stop_tokens (-1: none), budgets (tokens each row may
        still make) [b]; `sampling` holds [b] settings. A row ends at its stop token, a non-finite token or its
        budget, and is then masked as an empty slot is. -> the cache, the steps run, the chosen tokens [b, N],
        their log-probabilities [b, N] and alternatives [b, N, MAX_LOGPROBS] (N = `decode_chunk`; column i is
        step i, valid while the row had not ended)."""
        b, n = tokens.shape[0], self.decode_chunk
        first = lambda x: x[:b]  # noqa: E731
        # Empty slots count as greedy, so a batch whose active rows all are takes one batched argmax (`rowwise`).
        sampling = sampling.replace(temperature=jnp.where(active, sampling.temperature, 0.0))

        def step(carry):
            i, rows, token, position, live, out = carry
            forward = self.module.apply({"params": params}, token[:, None], jnp.where(live, position, -1)[:, None],
                                        rows)
            logits = forward.logits[:, -1]  # [b, V]
            chosen = rowwise(select_token, sampling, steps + i, salts, logits)

            def scores():
                logprobs = jax.nn.log_softmax(logits)
                top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
                return jnp.take_along_axis(logprobs, jnp.maximum(chosen, 0)[:, None], axis=-1)[:, 0], \
                    top_ids.astype(jnp.int32), top_lp

            nothing = (jnp.zeros(b), jnp.zeros((b, MAX_LOGPROBS), jnp.int32), jnp.zeros((b, MAX_LOGPROBS)))
            scored = jax.lax.cond(jnp.any(want_logprobs & live), scores, lambda: nothing)
            out = tuple(jax.lax.dynamic_update_index_in_dim(o, x, i, axis=1) for o, x in zip(out, (chosen,) + scored))
            rows = forward.cache.replace(length=jnp.where(live, forward.cache.length, rows.length))
            live = live & (chosen != stop_tokens) & (chosen != NONFINITE) & (i + 1 < budgets)
            return i + 1, rows, jnp.maximum(chosen, 0), position + 1, live, out

        out = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n)), jnp.zeros((b, n, MAX_LOGPROBS), jnp.int32),
               jnp.zeros((b, n, MAX_LOGPROBS)))
        carry = (jnp.int32(0), jax.tree.map(first, cache), tokens, positions, active, out)
        ran, rows, _, _, _, out = jax.lax.while_loop(lambda c: (c[0] < count) & jnp.any(c[4]), step, carry)
        back = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)  # noqa: E731
        return (jax.tree.map(back, cache, rows), ran) + out

    def _speculate_fn(self, params, draft_params, cache: KVCache, draft_cache, prev, token, position, active,
                      history, filled, sampling: Sampling, steps, salts, want_logprobs):
        """One speculative pass for the first b slots: K draft steps and one target pass over each row's last
        token and the K drafts (`speculative.verify` keeps the agreeing prefix and the target's next token).
        prev, token, position, active, filled, steps, salts [b]: the tokens before and at each row's last
        position, its tokens in `history` [b, H] (prompt lookup; [b, 1] otherwise), its pass's first random step;
        `sampling` holds [b] settings. -> both caches (each row kept up to its last accepted token), the new
        tokens [b, K + 1] (the first accepted + 1 of each row), drafts accepted [b], and the tokens'
        log-probabilities [b, K + 1] and alternatives [b, K + 1, MAX_LOGPROBS] (zeros unless asked for)."""
        b, k = token.shape[0], self.k
        first = lambda x: x[:b]  # noqa: E731
        rows, draft_rows = jax.tree.map(first, cache), jax.tree.map(first, draft_cache)
        proposal = self.draft.propose(draft_params, draft_rows, prev, token, position, history, filled, sampling,
                                      steps, salts, k)
        inputs = jnp.concatenate([token[:, None], proposal.tokens], axis=1)  # [b, K + 1]
        out = self.module.apply({"params": params}, inputs,
                                jnp.where(active[:, None], position[:, None] + jnp.arange(k + 1), -1), rows)
        accepted, target_token = verify(out.logits, proposal.tokens, proposal.probs, sampling, steps + k, salts)
        emitted = jnp.where(jnp.arange(k + 1) < accepted[:, None], jnp.pad(proposal.tokens, ((0, 0), (0, 1))),
                            target_token[:, None])
        length = jnp.where(active, rows.length + accepted + 1, rows.length)

        def scores():
            logprobs = jax.nn.log_softmax(out.logits)  # [b, K + 1, V]
            top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
            return jnp.take_along_axis(logprobs, jnp.maximum(emitted, 0)[..., None], axis=-1)[..., 0], \
                top_ids.astype(jnp.int32), top_lp

        nothing = (jnp.zeros((b, k + 1)), jnp.zeros((b, k + 1, MAX_LOGPROBS), jnp.int32),
                   jnp.zeros((b, k + 1, MAX_LOGPROBS)))
        chosen_lp, top_ids, top_lp = jax.lax.cond(jnp.any(want_logprobs & active), scores, lambda: nothing)
        back = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)  # noqa: E731
        cache = jax.tree.map(back, cache, rewind_cache(out.cache, length))
        draft_cache = jax.tree.map(back, draft_cache, self.draft.rewind(proposal.state, length))
        return cache, draft_cache, emitted, accepted, chosen_lp, top_ids, top_lp

    def _run_prefill(self, row: int, start: int, chunk: Sequence[int], targets: Sequence[int], sampling: Sampling,
                     salt: int, want_logprobs: bool, want_prompt_scores: bool):
        t = length_bucket(len(chunk))
        tokens, target = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        positions = np.full((1, t), -1, np.int32)
        tokens[0, :len(chunk)] = chunk
        positions[0, :len(chunk)] = np.arange(start, start + len(chunk))
        target[0, :len(targets)] = targets
        i32 = np.int32
        out = self._prefill(self.params, self._cache, i32(row), i32(start), tokens, positions, target,
                            i32(len(chunk) - 1), i32(start + len(chunk)), sampling, np.uint32(salt),
                            np.bool_(want_logprobs), np.bool_(want_prompt_scores))
        self._cache = out[0]
        return out[1:]

    def _run_draft_prefill(self, row: int, prompt: Sequence[int]) -> None:
        """The draft's cache row: every prompt token but the last (the first pass feeds it with the first new
        token); a one-token prompt leaves the row empty (one chunk of padding clears it)."""
        for start in range(0, max(len(prompt) - 1, 1), PREFILL_CHUNK):
            chunk = prompt[start:min(start + PREFILL_CHUNK, len(prompt) - 1)]
            tokens = np.zeros((1, length_bucket(len(chunk))), np.int32)
            positions = np.full(tokens.shape, -1, np.int32)
            tokens[0, :len(chunk)] = chunk
            positions[0, :len(chunk)] = np.arange(start, start + len(chunk))
            self._draft_cache = self._draft_prefill(self.draft_params, self._draft_cache, np.int32(row),
                                                    np.int32(start), tokens, positions, np.int32(start + len(chunk)))

    def _run_speculate(self, active: np.ndarray, want_logprobs: np.ndarray):
        """A speculative pass over the first len(active) slots (a slot bucket)."""
        b = len(active)
        sampling = Sampling(self._temperature[:b], self._top_k[:b], self._top_p[:b], self._key[:b])
        rows = lambda x: put(x[:b], self._rows)  # noqa: E731
        history = self._history[:b] if self.draft_model is None else np.zeros((b, 1), np.int32)
        steps = 1 + self._passes[:b] * (self.k + 1)  # as `Speculator`'s: the prefill drew at step 0
        out = self._speculate(self.params, self.draft_params, self._cache, self._draft_cache, rows(self._prev),
                              rows(self._token), rows(self._position), rows(active), rows(history),
                              rows(self._filled), jax.tree.map(rows, sampling), rows(steps), rows(self._salt),
                              rows(want_logprobs))
        self._cache, self._draft_cache = out[:2]
        return tuple(to_host(x) for x in out[2:])

    def _run_step(self, active: np.ndarray, steps: np.ndarray, want_logprobs: np.ndarray, stop_tokens: np.ndarray,
                  budgets: np.ndarray, count: int):
        """Up to `count` decode steps over the first len(active) slots (a slot bucket)."""
        b = len(active)
        sampling = Sampling(self._temperature[:b], self._top_k[:b], self._top_p[:b], self._key[:b])
        rows = lambda x: put(x[:b], self._rows)  # noqa: E731
        out = self._step(self.params, self._cache, rows(self._token), rows(self._position), rows(active),
                         jax.tree.map(rows, sampling), rows(steps), rows(self._salt), rows(want_logprobs),
                         rows(stop_tokens), rows(budgets), np.int32(count))
        self._cache = out[0]
        return tuple(to_host(x) for x in out[1:])

    @property
    def compiles(self) -> int:
        programs = [self._prefill, self._step, self._save_block, self._load_block, self._move_row]
        programs += [self._speculate] if self.draft is not None else []
        programs += [self._draft_prefill] if self.draft_model is not None else []
        return sum(p.compiles for p in programs)

    def _compile(self) -> None:
        """Compile every program before the first request, by running each once on an idle row."""
        start = time.perf_counter()
        greedy = Sampling.create()
        for bucket in self.prefill_buckets:
            for want in (False, True):  # one program; both branches of its scoring switches are run once
                self._run_prefill(0, 0, [0] * bucket, [0] * bucket, greedy, 0, want, want)
        for bucket in self.slot_buckets:
            off = np.zeros(bucket, bool)
            for want in (off, ~off):
                if self.draft is None:
                    none = np.zeros(bucket, np.int32)
                    self._run_step(off, none, want, none - 1, none, 1)
                else:
                    self._run_speculate(off, want)
        if self.draft_model is not None:
            for bucket in self.prefill_buckets:
                self._run_draft_prefill(0, [0] * (bucket + 1))
        if not self.exact_batching:
            self._cache = self._move_row(self._cache, np.int32(0), np.int32(0))
        if self.prefix_cache is not None:
            i32 = np.int32
            self._cache = self._load_block(self._cache, i32(0), i32(0), *self._save_block(self._cache, i32(0), i32(0)))
        self.compile_seconds = time.perf_counter() - start
        logger.info("compiled %d programs in %.1fs: decode %s %s slots x %d positions, prefill chunks of %s "
                    "tokens; requests never recompile", self.compiles, self.compile_seconds,
                    "step" if self.draft is None else f"pass (K = {self.k} drafts)",
                    "/".join(map(str, self.slot_buckets)), self.slots_per_row, "/".join(map(str, self.prefill_buckets)))

    # ---- requests ----

    def check(self, request: Request) -> None:
        """Raise GenerationError unless the request fits this engine (tokens, context, settings)."""
        prompt, config = request.prompt, self.config
        if not prompt:
            raise GenerationError("the prompt is empty: at least one token is needed")
        bad = next((t for t in prompt if not 0 <= t < config.vocab_size), None)
        if bad is not None:
            raise GenerationError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
        if request.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {request.max_tokens}")
        if len(prompt) + request.max_tokens > self.context:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; with max_tokens={request.max_tokens} that "
                                  f"is {len(prompt) + request.max_tokens}, beyond the context of {self.context}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise GenerationError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}")

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests (all or none). Raises GenerationError (a bad request), QueueFull or EngineStopped."""
        for request in requests:
            self.check(request)
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (at most {self.max_queue})")
            self._pending.extend(requests)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def occupied(self) -> int:
        return sum(r is not None for r in self._requests)

    # ---- the loop ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="neox-jax engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish those queued and running, then end the loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            if not self.exact_batching:
                self._compact()  # before admission picks the lowest free rows
            with self._wake:
                while not self._pending and not self.occupied and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._pending and not self.occupied:
                    return
                dropped = [r for r in self._pending if r.cancelled]
                if dropped:
                    self._pending = collections.deque(r for r in self._pending if not r.cancelled)
                # While others decode, prefill about one chunk of prompt tokens per step, so that a burst of
                # newcomers delays their next tokens by one chunk's time, not by every prefill at once.
                admitted, budget = [], PREFILL_CHUNK if self.occupied else self.context * self.batch
                for row, request in enumerate(self._requests):
                    if request is None and self._pending and (not admitted or len(self._pending[0].prompt) <= budget):
                        budget -= len(self._pending[0].prompt)
                        admitted.append((row, self._pending.popleft()))
            for request in dropped:
                _finish_sink(request, "cancelled")
            for row, request in admitted:
                self._guarded(request, self._admit, row, request)
            for row, request in enumerate(self._requests):
                if request is not None and request.cancelled:
                    self._finish(row, "cancelled")
            if self.occupied:
                try:
                    self._decode()
                except Exception as e:  # noqa: BLE001 - the device failed: end the batch, keep serving
                    logger.exception("a decode step failed")
                    for row, request in enumerate(self._requests):
                        if request is not None:
                            self._finish(row, "error", f"{type(e).__name__}: {e}")
                    # The failed step may have consumed the donated caches.
                    self._cache = self._new_cache(self.module)
                    if self.draft_model is not None:
                        self._draft_cache = self._new_cache(self.draft_model.module)

    def _guarded(self, request: Request, fn, *args) -> None:
        """Run fn; an exception fails this request (the sink hears of it), never the loop."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a sink's or the device's failure ends one request, not the server
            logger.exception("request failed")
            row = next((i for i, r in enumerate(self._requests) if r is request), None)
            if row is not None:
                self._requests[row] = None
            _finish_sink(request, "error", f"{type(e).__name__}: {e}")

    def _admit(self, row: int, request: Request) -> None:
        if request.cancelled:
            _finish_sink(request, "cancelled")
            return
        prompt, sampling = request.prompt, request.sampling
        salt = row_salt(prompt)
        scores: list[TokenLogprobs | None] = [None]
        pool = None if request.prompt_logprobs else self.prefix_cache
        digests = block_digests(prompt, PREFILL_CHUNK) if pool is not None else []
        for start in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start:start + PREFILL_CHUNK]
            block = start // PREFILL_CHUNK
            if start + PREFILL_CHUNK < len(prompt) and block < len(digests):  # not the last token's chunk
                kept = pool.get(digests[block])
                if kept is not None:
                    self._cache = self._load_block(self._cache, np.int32(row), np.int32(start), *kept)
                    continue
            first, first_lp, first_ids, first_lps, target, top_ids, top_lp = self._run_prefill(
                row, start, chunk, prompt[start + 1:start + 1 + len(chunk)], sampling, salt, request.wants_logprobs,
                request.prompt_logprobs)
            if block < len(digests) and digests[block] not in pool:
                pool.put(digests[block], self._save_block(self._cache, np.int32(row), np.int32(start)))
            if request.prompt_logprobs:
                target, top_ids, top_lp = (to_host(x) for x in (target, top_ids, top_lp))
                scores += [TokenLogprobs(float(target[i]), _top(top_ids[i], top_lp[i], request.logprobs))
                           for i in range(min(len(chunk), len(prompt) - 1 - start))]
        if request.prompt_logprobs:
            bad = next((i for i, lp in enumerate(scores) if lp is not None and not _finite(lp)), None)
            if bad is not None:
                _finish_sink(request, "error", _nonfinite(f"scoring prompt token {bad}"))
                return
            request.sink.prompt_logprobs(scores)
        if request.max_tokens == 0:
            _finish_sink(request, "length")
            return
        first = int(to_host(first))
        if self.draft_model is not None:
            self._run_draft_prefill(row, prompt)
        if self.on_first_token is not None:
            self.on_first_token(time.perf_counter() - request.submitted)
        self._requests[row] = request
        self._token[row], self._position[row], self._salt[row] = max(first, 0), len(prompt), salt
        self._temperature[row], self._top_k[row], self._top_p[row] = (
            np.asarray(sampling.temperature), np.asarray(sampling.top_k), np.asarray(sampling.top_p))
        self._key[row] = np.asarray(sampling.key)
        if self.draft is not None:
            self._prev[row], self._passes[row], self._filled[row] = prompt[-1], 0, len(prompt) + 1
            if self.draft_model is None:
                self._history[row, :len(prompt) + 1] = prompt + [max(first, 0)]
        lp = None
        if request.wants_logprobs:
            lp = TokenLogprobs(float(to_host(first_lp)), _top(to_host(first_ids), to_host(first_lps), request.logprobs))
        self._deliver(row, first, lp)

    def _compact(self) -> None:
        """Move the requests of the highest rows into free lower rows, so that the active ones fill rows 0..n-1
        (admission then takes the lowest free rows, row n on)."""
        while True:
            free = next((row for row, r in enumerate(self._requests) if r is None), None)
            last = max((row for row, r in enumerate(self._requests) if r is not None), default=-1)
            if free is None or last < free:
                return
            self._cache = self._move_row(self._cache, np.int32(last), np.int32(free))
            if self.draft_model is not None:
                self._draft_cache = self._move_row(self._draft_cache, np.int32(last), np.int32(free))
            for state in (self._token, self._position, self._salt, self._temperature, self._top_k, self._top_p,
                          self._key, self._prev, self._passes, self._history, self._filled):
                state[free] = state[last]
            self._requests[free], self._requests[last] = self._requests[last], None

    def _decode(self) -> None:
        start = time.perf_counter()
        used = max(row for row, r in enumerate(self._requests) if r is not None) + 1
        requests = self._requests[:next(b for b in self.slot_buckets if b >= used)]
        active = np.array([r is not None for r in requests])
        want = np.array([r is not None and r.wants_logprobs for r in requests])
        turn = self._speculative_turn if self.draft is not None else self._plain_turn
        steps = turn(requests, active, want)
        if self.on_step is not None:
            for _ in range(steps):  # a chunk of steps: each its share of the turn
                self.on_step((time.perf_counter() - start) / steps)

    def _speculative_turn(self, requests: list[Request | None], active: np.ndarray, want: np.ndarray) -> int:
        """One pass; each row's accepted drafts and the target's next token are handed out in order, until the
        row ends (the tokens after its end are dropped, as plain decoding would never have made them)."""
        emitted, accepted, chosen_lp, top_ids, top_lp = self._run_speculate(active, want)
        served = kept = handed_out = 0
        for row, request in enumerate(requests):
            if request is None:
                continue
            served, kept, before = served + 1, kept + int(accepted[row]), request.generated
            new = emitted[row, :accepted[row] + 1]
            running = self._hand_out(row, request, new, chosen_lp[row], top_ids[row], top_lp[row])
            handed_out += request.generated - before
            if running:  # its caches hold everything before new[-1]
                self._prev[row] = new[-2] if len(new) > 1 else self._token[row]
                self._token[row], self._position[row] = new[-1], self._position[row] + len(new)
                self._passes[row] += 1
                if self.draft_model is None:
                    self._history[row, self._filled[row]:self._filled[row] + len(new)] = new
                self._filled[row] += len(new)
        if self.on_pass is not None:
            self.on_pass(served, kept, handed_out)
        return 1

    def _plain_turn(self, requests: list[Request | None], active: np.ndarray, want: np.ndarray) -> int:
        """`decode_chunk` steps when no request waits for a slot, else one (a newcomer is admitted next turn);
        each row's tokens are handed out in order until it ends."""
        steps = np.array([r.generated if r is not None else 0 for r in requests], np.int32)
        stops = np.array([-1 if r is None or r.stop_token is None else r.stop_token for r in requests], np.int32)
        budgets = np.array([r.max_tokens - r.generated if r is not None else 0 for r in requests], np.int32)
        count = 1 if self._pending else self.decode_chunk
        ran, chosen, chosen_lp, top_ids, top_lp = self._run_step(active, steps, want, stops, budgets, count)
        ran = int(ran)
        for row, request in enumerate(requests):
            if request is not None and self._hand_out(row, request, chosen[row, :ran], chosen_lp[row], top_ids[row],
                                                      top_lp[row]):
                self._token[row], self._position[row] = chosen[row, ran - 1], self._position[row] + ran
        return ran

    def _hand_out(self, row: int, request: Request, tokens: np.ndarray, logprobs, top_ids, top_lp) -> bool:
        """Hand a row's new tokens [n] (and their log-probabilities [>= n], alternatives [>= n, MAX_LOGPROBS])
        to its request in order, until one ends it. -> whether it is still running."""
        for i, token in enumerate(tokens):
            lp = TokenLogprobs(float(logprobs[i]), _top(top_ids[i], top_lp[i], request.logprobs)) \
                if request.wants_logprobs else None
            self._guarded(request, self._deliver, row, int(token), lp)
            if self._requests[row] is not request:
                return False
        return True

    def _deliver(self, row: int, token: int, logprobs: TokenLogprobs | None) -> None:
        """Hand a slot's new token to its request; free the slot if that ends it."""
        request = self._requests[row]
        if token == NONFINITE or (logprobs is not None and not _finite(logprobs)):
            self._finish(row, "error", _nonfinite(f"at generated token {request.generated}"))
            return
        if request.cancelled:
            self._finish(row, "cancelled")
            return
        if token == request.stop_token:
            self._finish(row, "stop")
            return
        request.generated += 1
        more = request.sink.token(token, logprobs)
        if not more:
            self._finish(row, "stop")
        elif request.generated >= request.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        request, self._requests[row] = self._requests[row], None
        _finish_sink(request, reason, error)


def _write_row(module: NeoX, params, cache: KVCache, row, start, tokens, positions, end, **apply_options):
    """One chunk of one request through `module` into cache row `row`, from slot `start` (0: the first chunk,
    which clears the row); the row is then filled up to `end`. tokens, positions [1, T] (padding: position -1).
    -> (the cache, the module's output: logits of the last position only)."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)  # noqa: E731
    fresh = start == 0
    row_cache = KVCache(k=tuple(jnp.where(fresh, 0, take(k)).astype(k.dtype) for k in cache.k),
                        v=tuple(jnp.where(fresh, 0, take(v)).astype(v.dtype) for v in cache.v),
                        positions=jnp.where(fresh, -1, take(cache.positions)), length=start)
    out = module.apply({"params": params}, tokens, positions, row_cache, last_token_only=True, **apply_options)
    put_row = lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r, row, axis=0)  # noqa: E731
    cache = KVCache(k=tuple(put_row(k, r) for k, r in zip(cache.k, out.cache.k)),
                    v=tuple(put_row(v, r) for v, r in zip(cache.v, out.cache.v)),
                    positions=put_row(cache.positions, out.cache.positions), length=cache.length.at[row].set(end))
    return cache, out


def _finish_sink(request: Request, reason: str, error: str | None = None) -> None:
    try:
        request.sink.finish(reason, error)
    except Exception:  # noqa: BLE001 - the request is over either way
        logger.exception("a request's finish callback failed")


def _finite(scores: TokenLogprobs) -> bool:
    """Whether every log-probability is finite: JSON has no NaN or infinity, and neither has a good model."""
    return math.isfinite(scores.logprob) and all(math.isfinite(lp) for _, lp in scores.top)


def _nonfinite(where: str) -> str:
    return (f"the model's logits are not finite (NaN or infinity) {where}, so no token or log-probability can be "
            f"given: non-finite weights, or activations overflowing the dtype")


def _top(ids: np.ndarray, logprobs: np.ndarray, n: int | None) -> list[tuple[int, float]]:
    return [(int(i), float(lp)) for i, lp in zip(ids[:n or 0], logprobs[:n or 0])]

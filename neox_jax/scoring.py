"""Log-likelihood scoring on device, for lm-eval (`neox_jax.lm_eval_model`): whole rows, or a context computed
once for all its continuations (packed with them in one row, or cached and continued).

Both return log-probabilities from a log-softmax in fp32 over the full (padded) vocabulary, gathered on device,
so no [B, T, V] array comes back to the host. Rows are right-padded (padding has position -1 and is never
attended to) to a fixed batch size and to length buckets (`score_bucket`), so a task compiles once per bucket
(or pair of buckets) it touches, whatever the number of requests.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import NeoXConfig
from .decode import Compiled, length_bucket
from .model import KVCache, Layer, NeoX, contract
from .params import MODEL
from .sharding import DATA, to_host


def _log_softmax_at(logits, targets):
    """fp32 logits [..., V], targets [...] -> log-prob of each target [...], whether it is the argmax (the first
    largest logit, as torch's argmax has it) [...] bool, and the logsumexp [...] (log_softmax = logits -
    logsumexp, never materialised). No argmax is taken: XLA:CPU's is a scalar loop (measured on the shared
    2-core CPU, a [256, 50304] block: argmax 80 ms, max 5 ms, the log-softmax's exponentials 40 ms)."""
    top = logits.max(axis=-1, keepdims=True)
    lse = top[..., 0] + jnp.log(jnp.exp(logits - top).sum(axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    earlier_top = ((logits == top) & (jnp.arange(logits.shape[-1]) < targets[..., None])).any(axis=-1)
    return target_logit - lse, (target_logit == top[..., 0]) & ~earlier_top, lse


HEAD_CHUNK = 1024  # vocabulary rows per step of `_head_by_chunks`: a [256, 1024] fp32 block of logits stays in cache


def vocab_chunks(vocab: int) -> int:
    """How many equal chunks `_head_by_chunks` splits the vocabulary into: the divisor of `vocab` nearest
    vocab / HEAD_CHUNK (Pythia's 50304 rows: 48 of 1048)."""
    divisors = [c for c in range(1, vocab + 1) if vocab % c == 0]
    return min(divisors, key=lambda c: abs(vocab / c - HEAD_CHUNK))


def _head_by_chunks(x, weight, targets, dtype):
    """The output projection and `_log_softmax_at`'s log-prob and greedy flag, a chunk of the vocabulary at a
    time: x [M, D] after the final LayerNorm, weight [V, D] (an array or a QuantizedWeight), targets [M] ->
    target log-prob [M] fp32, greedy [M] bool.

    XLA:CPU writes whole [M, V] logits to memory and reads them back for each of the max, the exponentials'
    sum and the greedy check (it even materialises the max broadcast to [M, V]); a [M, V / chunks] block is
    used while it is still in cache (on the shared 2-core CPU, M = 256, Pythia-70M: the head with its
    log-softmax 349 -> 249 ms, the bare projection 245 ms). The logsumexp is taken online (the running sum
    rescaled when the maximum grows), which changes only the order of fp32 sums; greedy is the first index
    of the largest logit (torch's argmax) being the target."""
    chunks = vocab_chunks(weight.shape[0])
    width = weight.shape[0] // chunks
    blocks = jax.tree.map(lambda w: w.reshape(chunks, width, *w.shape[1:]), weight)  # [C, V / C, ...] each

    def step(carry, block):
        top, total, target_logit, first = carry  # [M] each: over the chunks so far
        w, start = block
        logits = contract("MD,VD->MV", x, w, dtype).astype(jnp.float32)  # [M, V / C]
        block_top = logits.max(axis=-1)
        new_top = jnp.maximum(top, block_top)
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[:, None]).sum(axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < width)
        at_target = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[:, None], axis=-1)[:, 0]
        target_logit = jnp.where(inside, at_target, target_logit)
        block_first = jnp.where(logits == block_top[:, None], jnp.arange(width), width).min(axis=-1) + start
        first = jnp.where(block_top > top, block_first, first)  # an equal later maximum is not the first
        return (new_top, total, target_logit, first), None

    rows = x.shape[0]
    start = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros(rows, jnp.int32))
    (top, total, target_logit, first), _ = jax.lax.scan(step, start, (blocks, jnp.arange(chunks) * width))
    return target_logit - (top + jnp.log(total)), first == targets


class _DeviceScorer:
    """The loaded model's module, params and row placement, the compile count of its programs, and the time
    spent running each (`run_seconds`: placing the rows, computing, compilations not included)."""

    def __init__(self, model, *fns):
        self.module: NeoX = model.module
        self.params = model.params
        self.decoder = model.decoder  # rows split over the mesh's data axis, and the cache, as the decoder's
        self.programs = [Compiled(fn, donate_argnums=donate) for fn, donate in fns]
        self.run_seconds = [0.0] * len(fns)

    @property
    def compiles(self) -> int:
        return sum(p.compiles for p in self.programs)

    @property
    def compile_seconds(self) -> float:
        return sum(p.compile_seconds for p in self.programs)

    def _run(self, program: int, *rows, cache=None):
        """Program `program` on the params, then `cache` (a device KVCache) if given, then host `rows` placed."""
        leading = () if cache is None else (cache,)
        start, compiling = time.perf_counter(), self.programs[program].compile_seconds
        out = jax.block_until_ready(self.programs[program](self.params, *leading,
                                                           *(self.decoder.place_rows(x) for x in rows)))
        self.run_seconds[program] += time.perf_counter() - start - (self.programs[program].compile_seconds - compiling)
        return out


def score_bucket(n: int) -> int:
    """Rows of up to 256 tokens pad to a multiple of 16, longer ones as the decoder's (multiples of 256).
    Finer than the decoder's powers of two: a task touches few of them, and padded positions cost as much
    as real ones (contexts of 65 to 80 tokens padded to 128 nearly double their prefill)."""
    return -(-n // 16) * 16 if n <= 256 else length_bucket(n)


def _right_padded(rows: Sequence[Sequence[int]], batch: int, first_position: Sequence[int] | None = None):
    """rows -> tokens [batch, score_bucket(longest)], positions (from each row's first position; -1 pads)."""
    length = score_bucket(max(len(r) for r in rows))
    tokens = np.zeros((batch, length), np.int32)
    positions = np.full((batch, length), -1, np.int32)
    for i, row in enumerate(rows):
        start = 0 if first_position is None else first_position[i]
        tokens[i, :len(row)] = row
        positions[i, :len(row)] = np.arange(start, start + len(row))
    return tokens, positions


class Scorer(_DeviceScorer):
    """Whole rows, of which only the positions from each row's `first` on are scored (a LAMBADA row scores its
    last word, not its passage): only those go through the output projection, the most costly matmul of a
    small model.

    (tokens, positions [B, T], first [B], targets [B, C], last [B]) -> target_logprob [B, C] fp32 and greedy
    [B, C] bool (targets[b, j] is the argmax) of positions first[b] + j (targets[b, j] the token scored there),
    and last_logprobs [B, V] fp32 of position first[b] + last[b] (a row's last real position) over the
    vocabulary.
    """

    def __init__(self, model):
        super().__init__(model, (self._score, ()))

    def _score(self, params, tokens, positions, first, targets, last):
        out = self.module.apply({"params": params}, tokens, positions, return_hidden_states=True)
        rows = jnp.arange(tokens.shape[0])
        scored = jnp.minimum(first[:, None] + jnp.arange(targets.shape[1]), tokens.shape[1] - 1)  # [B, C]
        final = out.hidden_states[-1][rows[:, None], scored]  # [B, C, D]; the unused [B, T, V] logits are dropped
        logits = self.module.apply({"params": params}, final, method=NeoX.head).astype(jnp.float32)  # [B, C, V]
        target_lp, greedy, lse = _log_softmax_at(logits, targets)
        last_lp = logits[rows, last] - lse[rows, last][:, None]  # [B, V]
        return target_lp, greedy, last_lp

    def __call__(self, rows: Sequence[Sequence[int]], first: Sequence[int], batch: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score up to `batch` token rows (each >= 1 token), padded to [batch, score_bucket(longest)], from
        position `first[i]` of row i on: target_logprob[i, j], greedy[i, j] are row i's position first[i] + j
        (the last position's are in last_logprobs[i] instead)."""
        tokens, positions = _right_padded(rows, batch)
        width = score_bucket(max(len(row) - start for row, start in zip(rows, first)))
        targets = np.zeros((batch, width), np.int32)
        starts, last = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
        for i, (row, start) in enumerate(zip(rows, first)):
            # The last position's target is read from last_logprobs instead.
            targets[i, :len(row) - 1 - start] = row[start + 1:]
            starts[i], last[i] = start, len(row) - 1 - start
        return tuple(to_host(x) for x in self._run(0, tokens, positions, starts, targets, last))


def packed_length(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
    """Tokens in the packed row of a context and its continuations (each but its last token)."""
    return len(context) + sum(len(c) - 1 for c in continuations)


def _segment_spans(context_length: int, continuations: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Where each continuation's tokens but its last lie in its context's packed row: [(start, end)]."""
    ends = context_length + np.cumsum([0] + [len(c) - 1 for c in continuations])
    return list(zip(ends[:-1].tolist(), ends[1:].tolist()))


def even_batch(contexts: int, batch: int, multiple: int) -> int:
    """Rows per batch that split `contexts` packed rows into as few batches of at most `batch` (a multiple of
    `multiple`, the data axis) as hold them, evenly: 40 at batch 16 run as 3 batches of 14 rows, one row
    count (and with `shared_lengths` often one program), not 16, 16 and 8 (a program more for its 8 rows: on
    the shared 2-core CPU, Pythia-70M, a packed program compiles in ~0.26 s, the time of ~1200 positions)."""
    contexts = max(contexts, 1)
    per_batch = -(-contexts // -(-contexts // batch))  # contexts / batches, rounded up
    return -(-per_batch // multiple) * multiple


SHARED_PROGRAM_POSITIONS = 2048  # padding positions worth one program fewer (see `shared_lengths`)


def shared_lengths(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """The row length each batch of packed rows runs at, from their own (rows, length) shapes, longest first:
    the batches of one shape run at the shortest longer length that batches of their row count already run
    at, if that pads them by at most SHARED_PROGRAM_POSITIONS positions in all; else at their own. A program
    fewer to compile for a few padded positions (SHARED_PROGRAM_POSITIONS was set when a Pythia-70M packed
    program compiled in the time of ~2000 positions, before it looped over its layers; `even_batch` has
    today's cost)."""
    counts = collections.Counter(shapes)
    runs: dict[tuple[int, int], int] = {}
    for rows, length in sorted(counts, key=lambda shape: -shape[1]):
        longer = [run for (r, _), run in runs.items() if r == rows]
        padded = counts[rows, length] * rows * (min(longer, default=length) - length)
        runs[rows, length] = min(longer) if longer and padded <= SHARED_PROGRAM_POSITIONS else length
    return [runs[shape] for shape in shapes]


class _FirstLayer(nn.Module):
    """`NeoX`'s transformer layer alone, named as the model's first so that its parameters are found by their
    path: applied to any layer's params, without a cache. x [B, T, D] (exact mode [R, B, T, D]) -> same."""
    config: NeoXConfig
    dtype: Any
    tp_ranks: int | None = None

    def setup(self):
        self.layers_0 = Layer(self.config, self.dtype, self.tp_ranks)

    def __call__(self, x, positions, rotary, segments):
        return self.layers_0(x, positions, rotary, None, None, None, segments)[0]


class ContextScorer(_DeviceScorer):
    """Contexts computed once for all their continuations (multiple choice: every answer of a question shares
    its context).

    `packed(contexts, continuations, batch, length)` computes each context and its continuations but their last
    tokens in one row, each continuation a segment (`NeoX` `segments`) that sees the context and itself only, at the
    positions it has after the context alone; it returns, per continuation, the final hidden states of the
    positions that score its tokens (the context's last, then its own but last), [len, D]. Rows pad to `length`
    (default `score_bucket(longest)`; `shared_lengths` picks it for a task's batches). No cache, no second
    pass: the way for packed rows that fit in the context; else `contexts(rows, batch, slots)` prefills up to
    `batch` contexts (each <= `slots` tokens, padded to `score_bucket(longest)`) and returns their KV cache (on
    device, one row per context, `slots` slots: one cache size for every batch of a task means one
    continuation program per continuation bucket) and each context's last-position log-probs [contexts, V]
    (which score every continuation's first token).
    `continuations(cache, context_row, context_length, continuations, batch)` feeds each continuation (>= 2
    tokens) but its last token after the cached context `context_row[i]` (of `context_length[i]` tokens) and
    returns the final hidden state of each fed position, [len - 1, D] per continuation: position t scores the
    continuation's token t + 1. `HeadQueue` sends those through the output projection, `HEAD_ROWS` at a time
    whatever call they came from, so that the most costly matmul computes no padding.
    Both give the whole-row values up to the order of fp32 summation (keys and values are the same; masked keys
    weigh exactly 0; the softmax over the cached and the new keys is taken part by part, as in decoding).
    """

    def __init__(self, model):
        super().__init__(model, (self._prefill, (1,)), (self._continue, ()), (self._head, ()), (self._packed, ()))
        layer = _FirstLayer(self.module.config, self.module.dtype, self.module.tp_ranks)
        self._layer = lambda params, *args: layer.apply({"params": {"layers_0": params}}, *args)

    def _prefill(self, params, cache, tokens, positions, last):
        # A task's last batch of contexts may have fewer rows than the cache: they fill its first rows.
        batch = tokens.shape[0]
        rows = KVCache(k=tuple(k[:batch] for k in cache.k), v=tuple(v[:batch] for v in cache.v),
                       positions=cache.positions[:batch], length=cache.length)
        out = self.module.apply({"params": params}, tokens, positions, rows, return_hidden_states=True)
        filled = jax.tree.map(lambda whole, part: whole.at[:batch].set(part) if whole.ndim else part, cache,
                              out.cache)
        # Only the last real position's logits are needed: the head runs on [B, 1, D] (the full [B, T, V]
        # logits are unused, so XLA drops them).
        final = out.hidden_states[-1][jnp.arange(batch), last][:, None]  # [B, 1, D]
        logits = self.module.apply({"params": params}, final, method=NeoX.head)[:, 0].astype(jnp.float32)
        return filled, jax.nn.log_softmax(logits, axis=-1)  # [B, V]

    def _continue(self, params, cache, context_row, tokens, positions):
        extra = tokens.shape[1]
        # Each row reads its context's keys and values, plus empty slots for the model to write its own tokens
        # into (a write nothing reads afterwards, so XLA drops it).
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        rows = KVCache(k=tuple(jnp.pad(k[context_row], pad) for k in cache.k),
                       v=tuple(jnp.pad(v[context_row], pad) for v in cache.v),
                       positions=jnp.pad(cache.positions[context_row], ((0, 0), (0, extra)), constant_values=-1),
                       length=jnp.asarray(cache.positions.shape[1], jnp.int32))
        # The [B, T, V] logits are unused (the head runs on the real positions only), so XLA drops them.
        return self.module.apply({"params": params}, tokens, positions, rows, return_hidden_states=True
                                 ).hidden_states[-1]

    def _packed(self, params, tokens, positions, segments):
        # `NeoX.__call__` with segments, up to the final hidden states (the head runs on the scored positions
        # only), as a loop over the layers whose body is one layer, its weights picked by a switch on the layer
        # index: the program holds one layer's kernels, not every layer's, and a first run compiles it in ~60%
        # of the time (Pythia-70M, 16 rows of 160 tokens on the shared 2-core CPU: 0.43 -> 0.26 s, the same
        # run time). The switch copies one layer's weights per step (no stacked copy of all of them is kept);
        # the body is traced once, however many layers.
        x, rotary = self.module.apply({"params": params}, tokens, positions, method=NeoX.embed)
        layers = [params[f"layers_{i}"] for i in range(self.module.config.num_layers)]

        def layer(i, x):
            weights = jax.lax.switch(i, [lambda layer=layer: layer for layer in layers])
            return self._layer(weights, x, positions, rotary, segments)

        x = jax.lax.fori_loop(0, len(layers), layer, x)
        return x[0] if self.module.tp_ranks else x  # exact mode: rank 0's stream, as the model's hidden states

    def _head(self, params, hidden, targets):
        def whole(params, hidden, targets):
            logits = self.module.apply({"params": params}, hidden[None], method=NeoX.head)[0].astype(jnp.float32)
            return _log_softmax_at(logits, targets)[:2]

        def by_chunks(params, hidden, targets):
            x = self.module.apply({"params": params}, hidden, method=lambda model, h: model.final_layer_norm(h))
            weight = params["embed_in" if self.module.config.tie_word_embeddings else "embed_out"]
            return _head_by_chunks(x, weight, targets, self.module.dtype)

        # By chunks on CPU only (on a GPU one projection keeps it busy), and for a whole vocabulary on each
        # device in the merged mode (the exact mode's ranks each have their own final LayerNorm).
        if self.module.tp_ranks is None and self.decoder.mesh.shape[MODEL] == 1:
            return jax.lax.platform_dependent(params, hidden, targets, cpu=by_chunks, default=whole)
        return whole(params, hidden, targets)

    def contexts(self, rows: Sequence[Sequence[int]], batch: int, slots: int):
        # Fewer contexts than `batch` (a task's last ones) run as fewer rows, a power of two: a program more
        # at most, and not half a batch of padding computed.
        tokens, positions = _right_padded(rows, min(batch, self.decoder.batch_size(len(rows))))
        last = np.zeros(len(tokens), np.int32)
        last[:len(rows)] = [len(r) - 1 for r in rows]
        cache, last_lp = self._run(0, tokens, positions, last, cache=self.decoder.new_cache(batch, slots))
        return cache, to_host(last_lp)

    def continuations(self, cache, context_row: Sequence[int], context_length: Sequence[int],
                      continuations: Sequence[Sequence[int]], batch: int) -> list[np.ndarray]:
        tokens, positions = _right_padded([c[:-1] for c in continuations], batch, context_length)
        index = np.zeros(batch, np.int32)
        index[:len(continuations)] = context_row
        hidden = to_host(self._run(1, index, tokens, positions, cache=cache))
        return [hidden[i, :len(c) - 1] for i, c in enumerate(continuations)]

    def packed_shape(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                     batch: int) -> tuple[int, int]:
        """The rows and the row length of `packed`'s batch of these contexts: fewer contexts than `batch` run as
        fewer rows, a power of two (as `contexts`); rows pad to `score_bucket(longest)`."""
        return (min(batch, self.decoder.batch_size(len(contexts))),
                score_bucket(max(packed_length(c, conts) for c, conts in zip(contexts, continuations))))

    def packed(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
               batch: int, length: int | None = None) -> list[list[np.ndarray]]:
        rows, shortest = self.packed_shape(contexts, continuations, batch)
        length = length or shortest
        if length < shortest:
            raise ValueError(f"packed rows of up to {shortest} tokens cannot run at length {length}")
        tokens = np.zeros((rows, length), np.int32)
        positions = np.full((rows, length), -1, np.int32)
        segments = np.zeros((rows, length), np.int32)
        spans = [_segment_spans(len(context), conts) for context, conts in zip(contexts, continuations)]
        for row, (context, conts) in enumerate(zip(contexts, continuations)):
            n = len(context)
            tokens[row, :n], positions[row, :n] = context, np.arange(n)
            for segment, (continuation, (start, end)) in enumerate(zip(conts, spans[row]), 1):
                tokens[row, start:end], positions[row, start:end] = continuation[:-1], np.arange(n, n + end - start)
                segments[row, start:end] = segment
        hidden = to_host(self._run(3, tokens, positions, segments))
        return [[np.concatenate([hidden[row, len(context) - 1:len(context)], hidden[row, start:end]])
                 for start, end in spans[row]] for row, context in enumerate(contexts)]

    def head(self, hidden: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden [HEAD_ROWS, D] final hidden states, targets [HEAD_ROWS] -> log-prob of each target and whether
        it is the argmax."""
        return tuple(to_host(x) for x in self._run(2, hidden, targets))


HEAD_ROWS = 256  # positions per output projection (XLA:CPU, Pythia-70M: 128 cost 30% more a row, 512 no less)


class HeadQueue:
    """Scored positions (final hidden states and the tokens they score), queued from any number of packed or
    continuation calls, one owner's positions after another, and sent through `ContextScorer.head` `HEAD_ROWS`
    at a time: only a task's last block is padded. `add(owner, hidden, targets)`; `scored(flush)` -> [(owner, summed
    log-prob, greedy at every position)] of the owners whose positions are all through (with `flush`, all)."""

    def __init__(self, scorer: ContextScorer):
        self.scorer = scorer
        data = scorer.decoder.mesh.shape[DATA]
        self.rows = -(-HEAD_ROWS // data) * data
        self._hidden: list[np.ndarray] = []  # queued, not yet through the head
        self._targets: list[np.ndarray] = []
        self._owners: collections.deque = collections.deque()  # (owner, positions) not yet handed back
        self._logprob = np.zeros(0, np.float32)  # through the head, not yet handed back
        self._greedy = np.zeros(0, bool)

    def add(self, owner, hidden: np.ndarray, targets: Sequence[int]) -> None:
        self._hidden.append(hidden)
        self._targets.append(np.asarray(targets, np.int32))
        self._owners.append((owner, len(self._targets[-1])))

    def scored(self, flush: bool = False) -> list[tuple[object, float, bool]]:
        self._run_blocks(flush)
        out = []
        while self._owners and self._owners[0][1] <= len(self._logprob):
            owner, n = self._owners.popleft()
            out.append((owner, math.fsum(self._logprob[:n].tolist()), bool(self._greedy[:n].all())))
            self._logprob, self._greedy = self._logprob[n:], self._greedy[n:]
        return out

    def _run_blocks(self, flush: bool) -> None:
        """The queued positions through the head in whole blocks; with `flush`, the rest in a padded one."""
        queued = sum(len(t) for t in self._targets)
        blocks = -(-queued // self.rows) if flush else queued // self.rows
        if not blocks:
            return
        hidden, targets = np.concatenate(self._hidden), np.concatenate(self._targets)
        for start in range(0, blocks * self.rows, self.rows):
            n = min(self.rows, queued - start)
            block_hidden = np.zeros((self.rows, hidden.shape[1]), hidden.dtype)
            block_targets = np.zeros(self.rows, np.int32)
            block_hidden[:n], block_targets[:n] = hidden[start:start + n], targets[start:start + n]
            target_lp, greedy = self.scorer.head(block_hidden, block_targets)
            self._logprob = np.concatenate([self._logprob, target_lp[:n]])
            self._greedy = np.concatenate([self._greedy, greedy[:n]])
        done = min(blocks * self.rows, queued)
        self._hidden, self._targets = [hidden[done:]], [targets[done:]]

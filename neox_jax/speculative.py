"""Speculative decoding: a cheap draft proposes K tokens, the target checks all of them in one forward pass.

Batch-1 decoding reads every weight once per token. Here the target reads its weights once per K + 1
candidate positions instead: its pass over [last token, d_1 .. d_K] gives its own choice after every prefix,
and each row keeps the drafts up to the first disagreement plus the target's own token there (1 to K + 1
tokens per pass). The output is the target's:
- greedy: token for token the target's greedy decoding (`Decoder`), whatever the draft proposes;
- sampled (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): draft token x, drawn from the
  draft's q, is kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
  max(0, p - q) normalised, and after K acceptances from p. Every token is then distributed exactly as the
  target's own sampler draws it; p and q are both the distributions after temperature, top-k and top-p
  (`sampling.filtered_logits`). Reproducible for a seed; a row's text depends on its prompt, the settings
  and the seed, not on its batch (the draws are keyed by iteration and row salt, as the sampler's are).

The cache: each row has its own write index (`KVCache.length` [B]), since rows keep different numbers of
tokens per pass. The verify pass writes all K + 1 tokens; the row's index then moves back past the rejected
ones and their slots are marked empty (position -1), so nothing of a rejected token is ever attended to and
the next pass overwrites them. The layout is the plain decoder's: left-padded prompts, then each row's new
tokens one slot after another, so a row's cache equals plain decoding's after as many tokens.

Compiled programs: the prefill is the plain decoder's (shared with it); the draft's K steps and the verify
pass run together in one on-device `lax.while_loop` whose shapes depend only on the batch, prompt and cache
buckets and K (static), never on the prompts or on how many tokens are accepted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .decode import (FINISHED, Compiled, Decoder, Generation, _check_finite, completion_tokens, left_pad,
                     length_bucket, validate_request, PREFILL_CHUNK)
from .drafts import ModelDraft, PromptLookup, greedy_settings, probabilities, rewind_cache, rowwise
from .model import KVCache, write_slots
from .sampling import NONFINITE, Sampling, row_keys, row_salt, select_token
from .sharding import to_host

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16  # K beyond this only adds rejected work (acceptance decays geometrically)


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
    """`decode_steps` counts target passes after the prefill (the batch advances together)."""

    row_passes: int = 0  # target passes summed over the rows still generating in each
    proposed: int = 0  # draft tokens proposed to those rows
    accepted: int = 0  # of which the target kept
    new_tokens: int = 0  # tokens those passes produced (all rows; the prefill's first token not counted)
    rows: list = dataclasses.field(default_factory=list)  # per prompt: (passes, accepted, new tokens) so far

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def passes_per_token(self) -> float:
        """Target passes per generated token after the first (plain decoding: 1)."""
        return self.row_passes / self.new_tokens if self.new_tokens else 0.0

    def row_summary(self, row: int, k: int) -> dict:
        """One prompt's acceptance rate and target passes per token (JSON-ready)."""
        passes, accepted, new = self.rows[row] if row < len(self.rows) else (0, 0, 0)
        return {"acceptance_rate": round(accepted / (k * passes), 4) if passes else None,
                "target_passes_per_token": round(passes / new, 4) if new else None}


@flax.struct.dataclass
class SpeculativeState:
    """Everything the loop carries between chunks; it stays on device."""

    cache: KVCache  # the target's, `length` [B]; holds every accepted token but the last
    draft: object  # the draft's state (its cache; None for prompt lookup)
    history: jax.Array  # [B, H] int32: each row's prompt and accepted tokens, left-aligned
    filled: jax.Array  # [B] int32: tokens in `history`; the last is the next pass's first input
    position: jax.Array  # [B] int32: that last token's position
    done: jax.Array  # [B] bool: stopped, out of tokens, or a padding row
    produced: jax.Array  # [B] int32: new tokens so far
    iteration: jax.Array  # [] int32: passes so far (seeds each pass's random draws)
    salt: jax.Array  # [B] uint32: each row's part of its random keys
    row_passes: jax.Array  # [B] int32: passes while the row was generating
    accepted: jax.Array  # [B] int32: draft tokens kept


def verify(logits, draft_tokens, draft_probs, sampling: Sampling, step, salt):
    """The target's logits after each prefix [B, K + 1, V], the drafts [B, K] and their distributions
    [B, K, V] -> (drafts accepted [B], the target's token after them [B]; NONFINITE where the target's
    logits there were not finite). `sampling` and `step` per row ([B] fields) are taken row by row."""
    if jnp.ndim(sampling.temperature):
        return rowwise(verify, sampling, step, salt, logits, draft_tokens, draft_probs)
    batch, k = draft_tokens.shape
    vocab = logits.shape[-1]

    def greedy():  # select_token's targets are NONFINITE where the logits are not finite (its own check, free)
        flat = logits.reshape(-1, vocab)
        targets = select_token(flat, sampling, step, jnp.repeat(salt, k + 1)).reshape(batch, k + 1)
        return (draft_tokens == targets[:, :k]) & (targets[:, :k] != NONFINITE), targets

    def sampled():
        p = probabilities(logits, sampling)  # [B, K + 1, V]
        keys = row_keys(sampling, step, salt)
        uniform = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (k,)))(keys)  # [B, K]
        finite = jnp.all(jnp.isfinite(logits), axis=-1)  # [B, K + 1]
        p_draft = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
        q_draft = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
        agree = (uniform * q_draft < p_draft) & finite[:, :k]  # u < p / q, without dividing by a zero q
        accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
        # After a rejection at j: max(0, p_j - q_j) (renormalised by the draw); after K acceptances: p_K.
        residual = jnp.concatenate([jnp.maximum(p[:, :k] - draft_probs, 0.0), p[:, k:]], axis=1)
        chosen = jnp.take_along_axis(residual, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
        fallback = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # p == q up to rounding
        chosen = jnp.where(jnp.sum(chosen, -1, keepdims=True) > 0, chosen, fallback)
        draw = jax.vmap(lambda key, probs: jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(probs)))
        token = draw(keys, chosen).astype(jnp.int32)
        token = jnp.where(jnp.take_along_axis(finite, accepted[:, None], axis=1)[:, 0], token, NONFINITE)
        targets = jnp.broadcast_to(token[:, None], (batch, k + 1))  # only the column at `accepted` is read
        return agree, targets

    agree, targets = jax.lax.cond(greedy_settings(sampling), greedy, sampled)
    accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1).astype(jnp.int32)
    token = jnp.take_along_axis(targets, accepted[:, None], axis=1)[:, 0]
    return accepted, token


def _loop_fn(target, draft, k: int, params, draft_params, state: SpeculativeState, sampling, stop_token, budget,
             passes):
    """Up to `passes` more target passes of `target` (a NeoX module) with `draft`, fewer once every row is done
    -> (passes run, state). The state is donated and returned, so the caches are updated in place."""
    def keep_going(carry):
        i, state = carry
        return (i < passes) & ~jnp.all(state.done)

    def one_pass(carry):
        i, s = carry
        rows = jnp.arange(s.filled.shape[0])
        token, prev = s.history[rows, s.filled - 1], s.history[rows, s.filled - 2]
        step = 1 + s.iteration * (k + 1)  # the prefill drew at step 0; drafts at step..step+K-1, verify +K
        proposal = draft.propose(draft_params, s.draft, prev, token, s.position, s.history, s.filled, sampling,
                                 step, s.salt, k)
        inputs = jnp.concatenate([token[:, None], proposal.tokens], axis=1)  # [B, K + 1]
        out = target.apply({"params": params}, inputs, s.position[:, None] + jnp.arange(k + 1), s.cache)
        accepted, target_token = verify(out.logits, proposal.tokens, proposal.probs, sampling, step + k, s.salt)
        # The new tokens: the accepted drafts, then the target's own [B, K + 1] (beyond them: unused).
        index = jnp.arange(k + 1)
        emitted = jnp.where(index < accepted[:, None], jnp.pad(proposal.tokens, ((0, 0), (0, 1))),
                            target_token[:, None])
        live = ~s.done
        # A row ends at its stop token, its token budget or a non-finite result.
        ends = (index <= accepted[:, None]) & ((emitted == stop_token) | (emitted == NONFINITE))
        ended_at = jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1), k + 1)  # k + 1: did not end
        count = jnp.minimum(jnp.minimum(accepted + 1, ended_at + 1), budget - s.produced)
        count = jnp.where(live, count, 0)
        produced = s.produced + count
        done = s.done | (ended_at < count) | (produced >= budget)
        history = write_slots(s.history, emitted, s.filled, axis=1)
        kept = jnp.where(live, accepted + 1, 0)  # the pass's first input and the accepted drafts
        length = s.cache.length + kept
        state = SpeculativeState(
            cache=rewind_cache(out.cache, length), draft=draft.rewind(proposal.state, length),
            history=history, filled=s.filled + count, position=s.position + kept, done=done,
            produced=produced, iteration=s.iteration + 1, salt=s.salt,
            row_passes=s.row_passes + live, accepted=s.accepted + jnp.where(live, accepted, 0))
        return i + 1, state

    count, state = jax.lax.while_loop(keep_going, one_pass, (jnp.int32(0), state))
    return count, state


@functools.lru_cache(maxsize=None)
def loop_program(target, draft, k: int) -> Compiled:
    """The compiled speculative loop for these shapes, shared by every Speculator of them (only the params
    differ)."""
    return Compiled(functools.partial(_loop_fn, target, draft, k), donate_argnums=(2,))


class Speculator:
    """Speculative decoding of `target` (a NeoXModel) with `draft` (a NeoXModel of the same tokenizer, or
    "ngram" for prompt lookup), K = `num_draft_tokens` drafts per target pass. Same interface as `Decoder`."""

    def __init__(self, target, draft, num_draft_tokens: int):
        self.k = check_num_draft_tokens(num_draft_tokens)
        self.target = target
        self.decoder: Decoder = target.decoder
        self.draft, self.draft_params = draft_for(target, draft)
        if isinstance(draft, str):
            self.draft_decoder = None
        else:
            # A draft of the target's shape (the target itself, another seed) shares its prefill program.
            self.draft_decoder = target.decoder if draft.module == target.module else draft.decoder
            self.draft_context = draft.config.max_position_embeddings
        self._loop = loop_program(target.module, self.draft, self.k)

    @property
    def compiles(self) -> int:
        draft = self.draft_decoder if self.draft_decoder not in (None, self.decoder) else None
        return self._loop.compiles + self.decoder.compiles + (draft.compiles if draft else 0)

    def _prefill(self, decoder: Decoder, params, tokens, positions, slots, sampling, stop, active, salt):
        """The plain decoder's prefill of `decoder`'s model into a fresh cache of `slots` -> its DecodeState."""
        batch, prompt_len = tokens.shape
        cache = decoder.new_cache(batch, slots)
        piece = min(prompt_len, PREFILL_CHUNK)
        for start in range(0, prompt_len, piece):
            state = decoder._prefill(params, decoder.place_rows(tokens[:, start:start + piece]),
                                     decoder.place_rows(positions[:, start:start + piece]), cache, sampling, stop,
                                     active, salt)
            cache = state.cache
        return state

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None, *,
               stop_token: int | None, chunk: int | None = None, timing: SpeculativeGeneration | None = None):
        """As `Decoder.stream`: yields new tokens as [rows, n] int arrays (finished rows FINISHED), here after
        every `chunk` target passes (default: all at once). Rows keep different numbers of tokens per pass,
        so a row's tokens beyond the batch's common count wait for the next chunk."""
        config = self.target.config
        validate_request(config, prompts, max_new_tokens, stop_token)
        if self.draft_decoder is not None and max(len(p) for p in prompts) + max_new_tokens > self.draft_context:
            raise ValueError(f"the draft's context is {self.draft_context} tokens, shorter than this request's "
                             f"{max(len(p) for p in prompts) + max_new_tokens}")
        sampling = sampling or Sampling.create()
        stop = jnp.int32(-1 if stop_token is None else stop_token)
        rows, batch = len(prompts), self.decoder.batch_size(len(prompts))
        prompt_len = length_bucket(max(len(p) for p in prompts))
        # A pass writes K + 1 slots from the row's index: room for them past the last token the row may keep.
        slots = length_bucket(prompt_len + max_new_tokens + self.k)
        tokens, positions = left_pad(prompts, batch, prompt_len)
        timing = timing if timing is not None else SpeculativeGeneration()
        place = self.decoder.place_rows
        active = place(np.arange(batch) < rows)
        salt = place(np.array([row_salt(p) for p in prompts] + [0] * (batch - rows), np.uint32))

        with timing.measure("prefill", self.decoder._prefill):
            first = self._prefill(self.decoder, self.target.params, tokens, positions, slots, sampling, stop,
                                  active, salt)
            per_row = jnp.full((batch,), prompt_len, jnp.int32)
            cache = first.cache.replace(length=per_row)
            draft = None
            if self.draft_decoder is not None:
                draft_first = self._prefill(self.draft_decoder, self.draft_params, tokens, positions, slots,
                                            sampling, stop, active, salt)
                draft = rewind_cache(draft_first.cache.replace(length=per_row), per_row - 1)
            first_tokens = to_host(first.token)
        _check_finite(first_tokens[:rows, None], 0, self.target.dtype)
        history = np.zeros((batch, slots + 1), np.int32)  # + 1: a finished row's unused write stays in bounds
        filled = np.full(batch, 2, np.int32)  # padding rows: a dummy token and their first
        for row, prompt in enumerate(prompts):
            history[row, :len(prompt)] = prompt
            filled[row] = len(prompt) + 1
        history[np.arange(batch), filled - 1] = first_tokens
        state = SpeculativeState(
            cache=cache, draft=draft, history=place(history), filled=place(filled),
            position=first.positions, done=first.done | (max_new_tokens <= 1), produced=place(np.ones(batch, np.int32)),
            iteration=jnp.int32(0), salt=salt, row_passes=place(np.zeros(batch, np.int32)),
            accepted=place(np.zeros(batch, np.int32)))
        yield first_tokens[:rows, None]

        pending = [[] for _ in range(rows)]  # tokens decoded but not yet yielded
        finished = to_host(first.done)[:rows] | (max_new_tokens <= 1)
        sent = np.ones(rows, int)  # tokens yielded per row (the step index of the next)
        read = filled.copy()  # history read so far per row
        budget = jnp.int32(max_new_tokens)
        passes = jnp.int32(chunk or 2**30)
        while not finished.all():
            before = (to_host(state.row_passes), to_host(state.accepted))
            with timing.measure("decode", self._loop):
                ran, state = self._loop(self.target.params, self.draft_params, state, sampling, stop, budget, passes)
                ran = int(to_host(ran))
                history, filled, done = (to_host(x) for x in (state.history, state.filled, state.done))
                row_passes, accepted = to_host(state.row_passes), to_host(state.accepted)
            timing.decode_steps += ran
            if isinstance(timing, SpeculativeGeneration):  # a plain Generation gets the plain figures only
                timing.row_passes += int((row_passes - before[0])[:rows].sum())
                timing.accepted += int((accepted - before[1])[:rows].sum())
                timing.proposed += self.k * int((row_passes - before[0])[:rows].sum())
                timing.new_tokens += int((filled - read)[:rows].sum())
                timing.rows = [(int(row_passes[r]), int(accepted[r]), int(filled[r]) - len(prompts[r]) - 1)
                               for r in range(rows)]
            for row in range(rows):
                pending[row].extend(history[row, read[row]:filled[row]].tolist())
                read[row] = filled[row]
            finished = done[:rows]
            # Rows still generating bound the chunk; finished ones pad with FINISHED.
            waiting = [len(pending[r]) for r in range(rows) if not finished[r]]
            n = min(waiting) if waiting else max(len(p) for p in pending)
            if n == 0:
                continue
            out = np.full((rows, n), FINISHED, np.int32)
            for row in range(rows):
                take, pending[row] = pending[row][:n], pending[row][n:]
                out[row, :len(take)] = take
            for row in np.flatnonzero((out == NONFINITE).any(axis=1)):
                _check_finite(out[row:row + 1], int(sent[row]), self.target.dtype)
            sent += n
            yield out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None, *,
                 stop_token: int | None) -> SpeculativeGeneration:
        timing = SpeculativeGeneration()
        chunks = list(self.stream(prompts, max_new_tokens, sampling, stop_token=stop_token, timing=timing))
        timing.tokens = [completion_tokens(row, stop_token) for row in np.concatenate(chunks, axis=1)]
        return timing


def check_num_draft_tokens(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
    return int(k)


def draft_for(target, draft):
    """`draft`: a NeoXModel of the target's tokenizer, or "ngram" -> (its ModelDraft or PromptLookup, the
    params its proposals take: None for prompt lookup). Raises ValueError for anything else."""
    vocab = target.config.vocab_size
    if isinstance(draft, str):
        if draft != "ngram":
            raise ValueError(f"draft {draft!r}: give a model (neox_jax.load(...)) or \"ngram\"")
        return PromptLookup(vocab), None
    return ModelDraft(draft.module, shared_vocab(target, draft), vocab), draft.params


def shared_vocab(target, draft) -> int:
    """The ids a draft may propose: below both models' vocabularies and, where the tokenizers are known, the
    tokenizer's. Raises ValueError for a draft whose tokenizer differs from the target's."""
    shared = min(target.config.vocab_size, draft.config.vocab_size)
    tokenizers = [t for t in (target.tokenizer, draft.tokenizer) if t is not None]
    if len(tokenizers) == 2 and tokenizers[0]._tokenizer.get_vocab() != tokenizers[1]._tokenizer.get_vocab():
        raise ValueError("the draft's tokenizer differs from the target's: a draft must share its tokenizer "
                         "(GPT-NeoX-20B and every Pythia do)")
    if tokenizers:
        shared = min(shared, tokenizers[0].vocab_size)
    return shared

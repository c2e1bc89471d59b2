"""Drafts for speculative decoding (`neox_jax.speculative`): who proposes the next K tokens.

A draft proposes K tokens per row and, for speculative sampling, the distribution each was drawn from over
the target's vocabulary ([B, K, V], the settings' temperature, top-k and top-p applied). Two kinds:
- `ModelDraft`: a smaller model of the same tokenizer (a Pythia for GPT-NeoX-20B or a larger Pythia), with
  its own KV cache kept in step with the target's.
- `PromptLookup`: no second model; the K tokens that followed the latest earlier occurrence of the row's
  last n tokens in its prompt and text so far (n = 3, else 2, else 1).

The vocabulary rule: the family pads its embedding matrices past the tokenizer's 50277 ids (Pythia to 50304,
Pythia-6.9B 50432, 12B 50688, GPT-NeoX-20B 50432), so a draft's and a target's logits can have different
widths. A draft proposes only ids below `shared_vocab` (the smallest of the two widths and the tokenizer's
size) and its distribution is taken over those ids alone; the target keeps its own full distribution, so
the output is still exactly the target's.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from .model import MASKED, KVCache, NeoX
from .sampling import NONFINITE, Sampling, filtered_logits, select_token

LOOKUP_NGRAM = 3  # the longest suffix that prompt lookup matches


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """[..., V] logits -> the distribution `select_token` draws from at these settings, [..., V] fp32."""
    flat = logits.reshape(-1, logits.shape[-1])
    return jax.nn.softmax(filtered_logits(flat, sampling), axis=-1).reshape(logits.shape)


def greedy_settings(sampling: Sampling) -> jax.Array:
    return (sampling.temperature <= 0) | (sampling.top_k == 1)


def rowwise(fn, sampling: Sampling, step, salt, *rows):
    """fn(*rows, sampling, step, salt) where every row has its own settings and step (the server's slots:
    `sampling`'s fields and `step` [B]; rows [B, ...]) -> fn's outputs [B, ...]. One batched call when every
    row is greedy (an argmax, no sort); else row by row (vmapped), each row with its own settings and key,
    so a row's result is the one it gets decoded alone with scalar settings."""
    def together():
        return fn(*rows, Sampling.create(), jnp.int32(0), salt)  # greedy: no random draw reads the step

    def one_by_one():
        def one(settings, row_step, row_salt, *row):
            out = fn(*(x[None] for x in row), settings, row_step, row_salt[None])
            return jax.tree.map(lambda x: x[0], out)

        return jax.vmap(one)(sampling, step, salt, *rows)

    return jax.lax.cond(jnp.all(greedy_settings(sampling)), together, one_by_one)


def point_masses(tokens: jax.Array, vocab: int) -> jax.Array:
    """[B, K] tokens -> [B, K, V] fp32 distributions all on those tokens (a deterministic proposal)."""
    return jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)


def rewind_cache(cache: KVCache, length: jax.Array) -> KVCache:
    """The cache holding only each row's first `length` [B] slots: the others are marked empty (position -1),
    so nothing written there is attended to, and the next write lands at `length`."""
    slots = jnp.arange(cache.positions.shape[1])
    return cache.replace(positions=jnp.where(slots >= length[:, None], -1, cache.positions), length=length)


@flax.struct.dataclass
class Proposal:
    tokens: jax.Array  # [B, K] int32, ids below the shared vocabulary
    probs: jax.Array  # [B, K, V] fp32 over the target's vocabulary (zeros when greedy: unused)
    state: object  # the draft's carried state after proposing (its cache; None for prompt lookup)


@dataclasses.dataclass(frozen=True)
class ModelDraft:
    """A smaller model of the same tokenizer, with its own cache kept one slot behind the target's: after every
    verify pass it is rewound to the target's length minus one, and the next proposal starts with a 2-token
    step over the last two accepted tokens. That one rule covers both outcomes of the pass: after a
    rejection the draft rewrites a slot it already held, and after a full acceptance it writes its own last
    proposal, which it had not yet fed back. Hashable (its params are passed to `propose`), so drafts of one
    shape share compiled programs."""

    module: NeoX
    shared_vocab: int
    target_vocab: int

    def _logits(self, logits: jax.Array) -> jax.Array:
        """The draft's logits [B, Vd] over the target's vocabulary [B, V]: ids from `shared_vocab` on are
        masked (a finite value, so that `select_token` still reads the row as finite)."""
        kept = logits[:, :self.shared_vocab]
        return jnp.pad(kept, ((0, 0), (0, self.target_vocab - self.shared_vocab)), constant_values=MASKED)

    def _choose(self, logits, sampling: Sampling, step, salt):
        """-> tokens [B] and their distribution [B, V] (a point mass where the draft's logits were not finite).
        `sampling` and `step` per row ([B] fields) are taken row by row (`rowwise`)."""
        if jnp.ndim(sampling.temperature):
            return rowwise(self._choose, sampling, step, salt, logits)
        logits = self._logits(logits)
        token = select_token(logits, sampling, step, salt)
        failed = token == NONFINITE  # a draft's failure is only a bad guess: propose token 0
        token = jnp.where(failed, 0, token)
        probs = jax.lax.cond(greedy_settings(sampling), lambda: jnp.zeros(logits.shape, jnp.float32),
                             lambda: probabilities(logits, sampling))
        probs = jnp.where(failed[:, None], jax.nn.one_hot(token, self.target_vocab, dtype=jnp.float32), probs)
        return token, probs

    def propose(self, params, cache: KVCache, prev, token, position, history, filled, sampling: Sampling,
                step, salt, k: int) -> Proposal:
        """prev, token [B]: the last two accepted tokens (`token` at `position` [B]); `cache` holds everything
        before `prev`."""
        apply = lambda tokens, positions, cache: self.module.apply(  # noqa: E731
            {"params": params}, tokens, positions, cache, last_token_only=True)
        out = apply(jnp.stack([prev, token], 1), jnp.stack([position - 1, position], 1), cache)
        first, first_probs = self._choose(out.logits[:, -1], sampling, step, salt)

        def one_step(carry, i):
            cache, token = carry
            out = apply(token[:, None], (position + i)[:, None], cache)
            chosen, probs = self._choose(out.logits[:, -1], sampling, step + i, salt)
            return (out.cache, chosen), (chosen, probs)

        (cache, _), (rest, rest_probs) = jax.lax.scan(one_step, (out.cache, first), jnp.arange(1, k))
        tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, K]
        probs = jnp.concatenate([first_probs[:, None], rest_probs.transpose(1, 0, 2)], axis=1)  # [B, K, V]
        return Proposal(tokens, probs, cache)

    def rewind(self, cache: KVCache, target_length) -> KVCache:
        return rewind_cache(cache, target_length - 1)


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup ("n-gram") drafting: propose what followed the row's last n tokens when they last occurred
    in its prompt or text so far (the longest n up to LOOKUP_NGRAM that occurs; the last token if none does).
    It pays on text that repeats its context (code edits, summaries, extraction); elsewhere it is rejected
    at the cost of the verify pass's extra tokens."""

    target_vocab: int
    max_ngram: int = LOOKUP_NGRAM

    def propose(self, params, state, prev, token, position, history, filled, sampling: Sampling, step, salt,
                k: int) -> Proposal:
        """history [B, H]: each row's prompt and accepted tokens, left-aligned, `filled` [B] of them."""
        batch, size = history.shape
        starts = jnp.arange(size)
        best = jnp.full((batch,), -1, jnp.int32)  # where the continuation starts, per row (-1: none yet)
        for n in range(1, self.max_ngram + 1):  # longer matches override shorter ones
            suffix = jnp.take_along_axis(history, jnp.maximum(filled[:, None] - n + jnp.arange(n), 0), axis=1)
            match = jnp.ones((batch, size), bool)
            for j in range(n):  # the n-gram starting at each slot equals the suffix
                shifted = jnp.pad(history[:, j:], ((0, 0), (0, j)), constant_values=-1)
                match &= shifted == suffix[:, j:j + 1]
            # An earlier occurrence, with at least one token after it (not the suffix itself).
            match &= (starts[None] + n < filled[:, None]) & (filled[:, None] >= n + 1)
            latest = jnp.max(jnp.where(match, starts[None] + n, -1), axis=1)
            best = jnp.where(latest >= 0, latest, best)
        index = jnp.where(best >= 0, best, filled - 1)[:, None] + jnp.arange(k)  # none: repeat the last token
        index = jnp.minimum(index, filled[:, None] - 1)  # a continuation running into the suffix repeats it
        tokens = jnp.take_along_axis(history, index, axis=1)
        tokens = jnp.where((tokens >= 0) & (tokens < self.target_vocab), tokens, 0)
        return Proposal(tokens, point_masses(tokens, self.target_vocab), None)

    def rewind(self, state, target_length):
        return None

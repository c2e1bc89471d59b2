"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus).

The settings are traced arrays, not static arguments: changing them never recompiles. Greedy settings
(temperature 0 or top-k 1) take a `lax.cond` branch that is exactly `argmax`, so they cost no sort.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """Settings outside their domain (negative temperature, top-p outside (0, 1], ...)."""


@flax.struct.dataclass
class Sampling:
    temperature: jax.Array  # [] f32; 0 means greedy
    top_k: jax.Array  # [] i32; 0 means no limit
    top_p: jax.Array  # [] f32; 1 means no limit
    key: jax.Array  # PRNG key data, [2] uint32

    @classmethod
    def create(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> "Sampling":
        if temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0: no limit), got {top_k}")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jax.random.PRNGKey(seed))


def select_token(logits: jax.Array, sampling: Sampling, step: jax.Array) -> jax.Array:
    """[B, V] fp32 logits -> [B] int32 next tokens; `step` decorrelates the random draws of each step."""
    greedy = (sampling.temperature <= 0) | (sampling.top_k == 1)
    return jax.lax.cond(greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        lambda: _sample(logits, sampling, step))


def _sample(logits, sampling: Sampling, step):
    vocab = logits.shape[-1]
    logits = logits / sampling.temperature
    descending = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < k
    # Nucleus over the top-k: keep the smallest prefix of the sorted tokens whose mass reaches top_p.
    probs = jax.nn.softmax(jnp.where(in_top_k, descending, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(in_top_k & (mass_before < sampling.top_p), axis=-1, keepdims=True)  # [B, 1], >= 1
    cutoff = jnp.take_along_axis(descending, kept - 1, axis=-1)
    masked = jnp.where(logits >= cutoff, logits, -jnp.inf)
    key = jax.random.fold_in(sampling.key, step)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

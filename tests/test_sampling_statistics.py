"""The sampler's statistics against distributions computed here in numpy, not by the code under test.

Each test draws from `select_token` with many rows of identical logits and distinct salts (as many rows
with distinct prompts), so the rows are independent draws: their counts are checked with a chi-square
test against softmax(logits / T) restricted to the top-k / top-p tokens and renormalised; draws at
successive steps are checked for independence through their joint distribution. The seeds are fixed, so
the outcomes are deterministic; the thresholds are at a p-value of about 1e-6, so a correct sampler
passes with any random stream while the faults below land orders of magnitude above them:
- the temperature multiplying instead of dividing the logits (T = 0.5 and 2 make it visible);
- every step drawing with the same key (successive draws of a row would be equal);
- the salt ignored (every row would draw the same token);
- top-k / top-p keeping the right tokens with the wrong probabilities.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.sampling import Sampling, select_token

from conftest import peaked_model

ROWS = 20000
LOGITS = np.array([1.5, 0.8, 0.0, -0.4, -1.0, 0.3, 2.0, -2.0, 1.1, -0.7])  # no ties, no boundary cases
SALTS = jnp.asarray((np.arange(ROWS, dtype=np.uint64) * 2654435761) % 2**32, jnp.uint32)  # distinct
_select = jax.jit(select_token)


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """softmax(logits / T) over the top-k tokens, then the smallest prefix (by probability) whose mass
    reaches top_p, renormalised: computed in float64 from the definitions."""
    scaled = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-scaled)
    keep = np.zeros(len(scaled), bool)
    keep[order[:top_k or len(scaled)]] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    mass = 0.0
    for i in order:  # descending
        if not keep[i]:
            break
        if mass >= top_p:
            keep[i] = False
        mass += probs[i]
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def chi_square_critical(dof: int, z: float = 4.75) -> float:
    """Upper quantile of chi-square with `dof` degrees of freedom at normal z (4.75: p ~ 1e-6),
    by the Wilson-Hilferty approximation (no scipy needed)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts, probs):
    """Pearson's statistic, cells with expected count < 5 pooled; -> (statistic, dof). A draw in a cell of
    probability 0 makes it infinite."""
    counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
    if counts[probs == 0].sum() > 0:
        return math.inf, 1
    expected = probs * counts.sum()
    big = expected >= 5
    observed, expected = counts[big], expected[big]
    if (~big & (probs > 0)).any():
        observed = np.append(observed, counts[~big].sum())
        expected = np.append(expected, probs[~big].sum() * counts.sum())
    return float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1


def draws(logits, step, salts=SALTS, **settings):
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (len(salts), len(logits)))
    return np.asarray(_select(rows, Sampling.create(**settings), jnp.int32(step), salts))


def assert_follows(tokens, probs, what):
    counts = np.bincount(tokens, minlength=len(probs))
    stat, dof = chi_square(counts, probs)
    assert dof >= 1 and stat < chi_square_critical(dof), (what, stat, dof, counts, np.round(probs * len(tokens)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    """At every step the draws follow softmax(logits / T); a multiplied temperature (logits * T) fails at
    T = 0.5 and 2 (measured statistic > 10^4 against a critical value of ~40)."""
    probs = reference_probs(LOGITS, temperature)
    for step in (0, 1, 7):
        assert_follows(draws(LOGITS, step, temperature=temperature, seed=3), probs, (temperature, step))
    if temperature != 1.0:  # the test can tell the two apart
        wrong = reference_probs(LOGITS * temperature ** 2, temperature)  # softmax(logits * T)
        stat, dof = chi_square(np.bincount(draws(LOGITS, 0, temperature=temperature, seed=3),
                                           minlength=len(LOGITS)), wrong)
        assert stat > 100 * chi_square_critical(dof)


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=3), dict(temperature=1.0, top_p=0.75),
                                      dict(temperature=1.3, top_p=0.6), dict(temperature=2.0, top_k=5, top_p=0.9),
                                      dict(temperature=0.5, top_k=4, top_p=0.97)])
def test_top_k_and_top_p_renormalise_the_kept_tokens(settings):
    """Only the kept tokens appear, with their softmax(logits / T) probabilities renormalised over them
    (a sampler that kept the right tokens but drew them uniformly, or from the untempered or
    un-renormalised distribution, fails)."""
    probs = reference_probs(LOGITS, **settings)
    assert 2 <= (probs > 0).sum() < len(LOGITS)  # really restricted, and more than one token left
    assert_follows(draws(LOGITS, 2, seed=5, **settings), probs, settings)
    uniform = np.where(probs > 0, 1.0, 0.0) / (probs > 0).sum()
    stat, dof = chi_square(np.bincount(draws(LOGITS, 2, seed=5, **settings), minlength=len(LOGITS)), uniform)
    assert stat > 10 * chi_square_critical(dof)


@pytest.mark.parametrize("steps", [(0, 1), (4, 5), (0, 9)])
def test_successive_steps_draw_independently(steps):
    """Each row draws at two steps from the same logits: the joint distribution of the pair is the product
    of the marginals. With the same key at every step the two draws of a row would always be equal."""
    logits = LOGITS[:6]
    probs = reference_probs(logits, 1.2)
    first, second = (draws(logits, s, temperature=1.2, seed=7) for s in steps)
    joint = np.zeros((6, 6))
    np.add.at(joint, (first, second), 1)
    assert_follows(first, probs, steps[0])
    assert_follows(second, probs, steps[1])
    stat, dof = chi_square(joint, np.outer(probs, probs))
    assert stat < chi_square_critical(dof), (stat, dof)
    # Equal draws as often as chance has them: sum p^2 = 0.29 here, not 1.
    assert abs(np.mean(first == second) - (probs ** 2).sum()) < 0.02


def test_rows_with_different_salts_draw_independently():
    """Neighbouring rows (distinct prompts) at the same step: independent, not one shared draw."""
    logits = LOGITS[:6]
    probs = reference_probs(logits, 1.0)
    tokens = draws(logits, 3, temperature=1.0, seed=8)
    joint = np.zeros((6, 6))
    np.add.at(joint, (tokens[0::2], tokens[1::2]), 1)
    stat, dof = chi_square(joint, np.outer(probs, probs))
    assert stat < chi_square_critical(dof), (stat, dof)


def test_same_salt_step_and_seed_draw_the_same_token_and_others_do_not():
    same = draws(LOGITS, 4, temperature=1.0, seed=9)
    assert (draws(LOGITS, 4, temperature=1.0, seed=9) == same).all()
    # Another seed, another step: as many agreements as chance gives (sum p^2 ~ 0.18), not all of them.
    chance = (reference_probs(LOGITS) ** 2).sum()
    for other in (draws(LOGITS, 4, temperature=1.0, seed=10), draws(LOGITS, 5, temperature=1.0, seed=9)):
        assert abs(np.mean(other == same) - chance) < 0.02


@pytest.fixture(scope="module")
def model():
    return peaked_model(vocab_size=96, seed=6)


def test_same_seed_same_text_at_any_batch_size_and_position(model):
    """A prompt's sampled tokens depend on its tokens, the settings and the seed only: alone, second in a
    batch of 2, or third in a batch of 4 beside prompts of other lengths (other padding, other buckets)."""
    prompt = [5, 9, 11, 2, 40]
    others = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [60, 61]]
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234, stop_token=None)
    alone = model.generate([prompt], 20, **settings)[0]
    assert len(set(alone)) > 5  # really sampled, not stuck on one token
    assert model.generate([others[1], prompt], 20, **settings)[1] == alone
    assert model.generate([others[0], others[1], prompt, others[2]], 20, **settings)[2] == alone
    assert model.generate([prompt, prompt], 20, **settings) == [alone, alone]  # identical prompts: identical text
    assert model.generate([prompt], 20, **{**settings, "seed": 1235})[0] != alone


def test_generated_steps_are_independent_draws(model):
    """Through the decoder: at a temperature of 1000 the next-token distribution is uniform within 1% (the
    logits span < 20), so 48 prompts x 24 steps are 1152 draws from the uniform distribution over 96 tokens,
    successive ones independent. The same key at every step would repeat a row's token (the Gumbel noise
    dominates); a multiplied temperature would make the draws greedy."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, 1 + i % 7).tolist() for i in range(48)]
    assert len({tuple(p) for p in prompts}) == len(prompts)
    spread = np.ptp(model.logits([prompts[0]])[0, -1])
    assert spread < 20
    tokens = np.array(model.generate(prompts, 24, temperature=1000.0, seed=2, stop_token=None))
    assert tokens.shape == (48, 24)
    assert_follows(tokens.ravel(), np.full(96, 1 / 96), "uniform")
    repeats = np.mean(tokens[:, 1:] == tokens[:, :-1])
    assert repeats < 0.04, repeats  # chance: 1/96
    # Pairs of successive tokens: 96 x 96 cells is too sparse for chi-square; bucket tokens by id mod 4.
    joint = np.zeros((4, 4))
    np.add.at(joint, (tokens[:, :-1].ravel() % 4, tokens[:, 1:].ravel() % 4), 1)
    stat, dof = chi_square(joint, np.full((4, 4), 1 / 16))
    assert stat < chi_square_critical(dof), stat

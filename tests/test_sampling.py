"""Sampling in the compiled decoder: reproducible, exactly greedy at the limits, the right distribution."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis import settings as examples

from neox_jax.sampling import NONFINITE, Sampling, SamplingError, first_max, select_token

from conftest import peaked_model


@pytest.fixture(scope="module")
def model():
    return peaked_model(vocab_size=32, seed=5)


PROMPTS = [[1, 2, 3, 4], [9, 8]]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    a = model.generate(PROMPTS, 24, temperature=1.0, seed=1, stop_token=None)
    assert a == model.generate(PROMPTS, 24, temperature=1.0, seed=1, stop_token=None)
    assert a != model.generate(PROMPTS, 24, temperature=1.0, seed=2, stop_token=None)


def test_temperature_zero_and_top_k_one_are_exactly_greedy(model):
    greedy = model.generate(PROMPTS, 16, stop_token=None)
    assert model.generate(PROMPTS, 16, temperature=0.0, top_p=0.5, seed=3, stop_token=None) == greedy
    assert model.generate(PROMPTS, 16, temperature=1.5, top_k=1, seed=3, stop_token=None) == greedy


def test_settings_are_traced_not_compiled_in(model):
    model.generate(PROMPTS, 8, temperature=0.7, top_k=5, top_p=0.9, seed=0, stop_token=None)
    compiles = model.decoder.compiles
    for settings in [dict(temperature=1.3, top_k=0, top_p=1.0, seed=9), dict(temperature=0.0),
                     dict(temperature=0.5, top_k=3, top_p=0.2, seed=4)]:
        model.generate(PROMPTS, 8, stop_token=None, **settings)
    assert model.decoder.compiles == compiles


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 5  # pool the rare tail so the statistic is valid
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    return float(((observed - expected) ** 2 / np.maximum(expected, 1e-9)).sum()), len(observed) - 1


def test_full_softmax_sampling_has_the_model_distribution(model):
    """top_p 1, temperature 1: 4096 rows (4096 salts, as 4096 prompts) drawing from the model's next-token
    logits follow softmax(logits)."""
    prompt = [3, 1, 4, 1, 5]
    logits = model.logits([prompt])[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (4096, len(logits)))
    sampling = Sampling.create(temperature=1.0, top_p=1.0, seed=11)
    draws = np.asarray(select_token(rows, sampling, jnp.int32(0), jnp.arange(4096, dtype=jnp.uint32)))
    counts = np.bincount(draws, minlength=len(probs)).astype(np.float64)
    stat, dof = chi_square(counts, probs)
    assert dof >= 3
    # The 99.9th percentile of chi-square is below dof + 5 * sqrt(2 dof) + 10 for these dof; a wrong
    # distribution (e.g. temperature applied twice, or top-k) lands orders of magnitude above it.
    assert stat < dof + 5 * np.sqrt(2 * dof) + 10
    flattened = np.exp((logits - logits.max()) / 2)
    wrong, _ = chi_square(counts, flattened / flattened.sum())
    assert wrong > 10 * stat


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2048, jnp.float32))
    for top_k, top_p, allowed in [(2, 1.0, {0, 1}), (0, 0.75, {0, 1}), (0, 0.85, {0, 1, 2}), (3, 0.9, {0, 1, 2})]:
        sampling = Sampling.create(temperature=1.0, top_k=top_k, top_p=top_p, seed=0)
        drawn = set(np.asarray(select_token(logits, sampling, jnp.int32(0), jnp.arange(2048, dtype=jnp.uint32))).tolist())
        assert drawn == allowed, (top_k, top_p)


@pytest.mark.parametrize("settings, message", [(dict(temperature=-1.0), "temperature"),
                                               (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
                                               (dict(top_p=1.5), "top_p")])
def test_bad_settings(settings, message):
    with pytest.raises(SamplingError, match=message):
        Sampling.create(**settings)


def test_only_rows_with_non_finite_logits_are_marked():
    logits = jnp.array([[0.0, 1.0, 2.0, -1.0], [jnp.nan, 0.0, 1.0, 0.0], [0.0, jnp.inf, 1.0, 0.0],
                        [3.0, 2.0, 1.0, -jnp.inf]], jnp.float32)
    salt = jnp.arange(4, dtype=jnp.uint32)
    greedy = np.asarray(select_token(logits, Sampling.create(), jnp.int32(0), salt))
    assert greedy.tolist() == [2, NONFINITE, NONFINITE, NONFINITE]
    sampled = np.asarray(select_token(logits[:1].repeat(4, 0).at[2, 1].set(jnp.nan), Sampling.create(1.0, seed=3),
                                      jnp.int32(0), salt))
    assert sampled[2] == NONFINITE and all(0 <= t < 4 for t in np.delete(sampled, 2))


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(top_p=float("nan")), "top_p must be a finite number, got nan"),
    (dict(temperature=True), "temperature must be a finite number, got True"),
    (dict(top_p="0.5"), "top_p must be a finite number, got '0.5'"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(top_k=False), "top_k must be an integer, got False"),
    (dict(seed=1e23), r"seed must be an integer, got 1e\+23"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\), got -1"),
    (dict(seed=2**64), r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
])
def test_settings_reject_nan_infinity_wrong_types_and_out_of_range_seeds(settings, message):
    with pytest.raises(SamplingError, match=f"^{message}$"):
        Sampling.create(**settings)


def test_seeds_use_all_64_bits_and_top_k_beyond_int32_means_all():
    keys = {tuple(np.asarray(Sampling.create(seed=s).key).tolist()) for s in (1, 2**32 + 1, 2**63 + 1, 2**64 - 1)}
    assert len(keys) == 4
    assert np.asarray(Sampling.create(seed=2**32 + 5).key).tolist() == [1, 5]
    assert int(Sampling.create(top_k=99999999999).top_k) == 2**31 - 1


def test_defaults_are_greedy_with_seed_0():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, 50)), jnp.float32)
    salt = jnp.arange(64, dtype=jnp.uint32)
    assert np.array_equal(select_token(logits, Sampling.create(), jnp.int32(0), salt), np.argmax(logits, -1))
    assert np.array_equal(Sampling.create(temperature=1.0).key, Sampling.create(temperature=1.0, seed=0).key)


def test_top_p_keeps_the_smallest_prefix_that_reaches_it_in_every_row():
    # Row 0: 0.5 alone reaches top_p = 0.5 exactly (binary-exact probabilities), so the next token is out.
    # Row 1: another order and other masses: its own cutoff, not row 0's.
    probs = np.array([[0.5, 0.25, 0.125, 0.125], [0.0625, 0.125, 0.1875, 0.625]], np.float32)
    logits = jnp.log(jnp.asarray(np.repeat(probs, 512, axis=0)))
    salt = jnp.arange(1024, dtype=jnp.uint32)
    for top_p, allowed in [(0.5, [{0}, {3}]), (0.75, [{0, 1}, {2, 3}]), (0.85, [{0, 1, 2, 3}, {1, 2, 3}])]:
        drawn = np.asarray(select_token(logits, Sampling.create(1.0, top_p=top_p, seed=2), jnp.int32(0), salt))
        assert [set(drawn[:512].tolist()), set(drawn[512:].tolist())] == allowed, top_p


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((64, 50)) * 1e10, jnp.float32)
    salt = jnp.arange(64, dtype=jnp.uint32)
    for temperature in (1e-30, 1e-40):  # logits / T alone would overflow to +-inf (1e-40: subnormal in fp32)
        drawn = select_token(logits, Sampling.create(temperature, seed=1), jnp.int32(0), salt)
        assert np.array_equal(drawn, np.argmax(logits, -1)), temperature


@examples(max_examples=50, deadline=None)
@given(rows=st.integers(1, 8), vocab=st.integers(1, 300), levels=st.integers(1, 5), seed=st.integers(0, 2 ** 32 - 1))
def test_greedy_picks_argmax_s_token_ties_included(rows, vocab, levels, seed):
    """`first_max` answers as numpy's argmax, the first of equal maxima when logits tie (few distinct levels)."""
    logits = np.random.default_rng(seed).integers(0, levels, (rows, vocab)).astype(np.float32)
    assert np.array_equal(first_max(jnp.asarray(logits)), np.argmax(logits, -1))


def test_first_max_marks_a_row_with_any_nan_or_infinity_nonfinite():
    """The finite check rides in `first_max`'s index reduction: one NaN or infinity anywhere in a row, before the
    maximum, at it or after it, makes the row NONFINITE; a finite row (signed zeros among them) keeps its argmax."""
    nan, inf = np.nan, np.inf
    logits = np.array([[1, nan, 2], [inf, 0, 0], [0, 3, -inf], [2, 2, nan], [0, 3, 1], [-0.0, 0.0, -1]], np.float32)
    assert first_max(jnp.asarray(logits)).tolist() == [NONFINITE, NONFINITE, NONFINITE, NONFINITE, 1, 0]

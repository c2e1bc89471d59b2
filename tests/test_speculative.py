"""Speculative decoding against plain decoding of the same target (`neox_jax.speculative`, `neox_jax.drafts`).

Greedy: the tokens equal plain greedy decoding's for any draft (a random one, prompt lookup, the target
itself, one that never agrees), K, batch and stop point, up to the end of the context; the cache after
rejected drafts equals plain decoding's. Sampled: the verify step's tokens follow the target's distribution
(chi-square, as tests/test_sampling_statistics.py), and so do the generated tokens end to end.

Every case runs in one batch bucket (3-4 rows), one prompt bucket (17-32 tokens) and one cache bucket
(64 slots), so the module compiles the speculative loop twice for the target: a model draft at K = 3 (every
model draft here has the target's shape, so they share that program) and prompt lookup at K = 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from neox_jax.api import NeoXModel
from neox_jax.drafts import ModelDraft, PromptLookup
from neox_jax.sampling import Sampling
from neox_jax.speculative import Speculator, shared_vocab, verify

from conftest import peaked_model
from test_decode_loop import Recorder
from test_sampling_statistics import LOGITS, SALTS, assert_follows, chi_square, chi_square_critical, reference_probs

VOCAB, CONTEXT, K = 96, 40, 3


@pytest.fixture(scope="module")
def target():
    return peaked_model(VOCAB, seed=6, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def drafts(target):
    """The drafts by name, each a Speculator factory (the programs are shared between equal shapes)."""
    other = peaked_model(VOCAB, seed=7, max_position_embeddings=CONTEXT)
    params = jax.tree.map(lambda x: x, target.params)
    params["embed_out"] = -params["embed_out"]  # its argmax is the target's argmin: it never agrees
    contrary = NeoXModel(target.config, params, target.dtype)
    return {"model": other, "self": target, "contrary": contrary, "ngram": "ngram"}


def prompts_strategy():
    """3-4 prompts of 17-32 tokens, some from a small alphabet so that they repeat themselves (where prompt
    lookup's guesses come true)."""
    prompt = st.tuples(st.integers(17, 32), st.integers(2, VOCAB), st.integers(0, 2**31)).map(
        lambda t: np.random.default_rng(t[2]).integers(0, t[1], t[0]).tolist())
    return st.lists(prompt, min_size=3, max_size=4)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(prompts=prompts_strategy(), draft=st.sampled_from([("model", K), ("ngram", 2)]),
       room=st.integers(0, 23), stop_at=st.one_of(st.none(), st.integers(0, 20)))
def test_greedy_tokens_equal_plain_decoding(target, drafts, prompts, draft, room, stop_at):
    """Any prompts, draft and K; `room` tokens short of the context's end (0: the last row's last token is
    the context's last position); a stop token taken from the plain output, so that rows stop mid-draft."""
    name, k = draft
    new = max(1, CONTEXT - max(map(len, prompts)) - room)
    plain = target.generate(prompts, new, stop_token=None)
    stop = None if stop_at is None else plain[0][min(stop_at, len(plain[0]) - 1)]
    if stop is not None:
        plain = target.generate(prompts, new, stop_token=stop)
    speculative = Speculator(target, drafts[name], k).generate(prompts, new, stop_token=stop)
    assert speculative.tokens == plain
    assert 0 <= speculative.acceptance_rate <= 1


def test_target_as_its_own_draft_accepts_every_token(target, drafts, rng):
    """Every draft token is accepted and every pass yields K + 1 tokens: 1 + 4 (K + 1) tokens in 4 passes."""
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (17, 20, 23)]
    new = 1 + 4 * (K + 1)
    result = Speculator(target, drafts["self"], K).generate(prompts, new, stop_token=None)
    assert result.tokens == target.generate(prompts, new, stop_token=None)
    assert result.acceptance_rate == 1.0
    assert result.decode_steps == 4 and result.passes_per_token == pytest.approx(1 / (K + 1))


def test_a_draft_that_never_agrees_still_gives_the_target_output_and_cache(target, drafts, rng, monkeypatch):
    """Every draft rejected: one token per pass, the plain output, and after each pass the target's cache is
    plain decoding's after as many tokens: the same positions slot for slot (the rejected drafts' slots marked
    empty), the same keys and values wherever a slot is filled."""
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (18, 25, 31, 32)]
    new = 6
    speculator = Speculator(target, drafts["contrary"], K)
    speculator._loop = ours = Recorder(speculator._loop)
    chunks = list(speculator.stream(prompts, new, stop_token=None, chunk=1))
    tokens = np.concatenate(chunks, axis=1).tolist()
    assert tokens == target.generate(prompts, new, stop_token=None)
    assert all(s.accepted.sum() == 0 for s in ours.states) and len(ours.states) == new - 1

    monkeypatch.setattr(target.decoder, "_decode", Recorder(target.decoder._decode))
    list(target.decoder.stream(prompts, new, stop_token=None, chunk=1))
    for ours, theirs in zip(ours.states, target.decoder._decode.states):
        ours, theirs = ours.cache, theirs.cache
        slots = theirs.positions.shape[1]
        assert (ours.length == theirs.length).all()
        np.testing.assert_array_equal(ours.positions[:, :slots], theirs.positions)
        assert (ours.positions[:, slots:] == -1).all()
        filled = theirs.positions >= 0
        for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):
            np.testing.assert_allclose(a[:, :, :slots].transpose(0, 2, 1, 3)[filled],
                                       b.transpose(0, 2, 1, 3)[filled], rtol=1e-5, atol=1e-5)


def test_stream_chunks_join_to_generate(target, drafts, rng):
    prompts = [rng.integers(0, 9, n).tolist() for n in (17, 25, 24)]
    speculator = Speculator(target, drafts["ngram"], 2)
    whole = speculator.generate(prompts, 15, stop_token=None).tokens
    chunks = list(speculator.stream(prompts, 15, stop_token=None, chunk=2))
    assert np.concatenate(chunks, axis=1).tolist() == whole


def test_prompt_lookup_proposes_what_followed_the_last_occurrence():
    draft = PromptLookup(VOCAB)
    history = jnp.array([[5, 6, 7, 8, 9, 5, 6, 7, 0, 0, 0, 0],  # "5 6 7" occurred before: propose 8 9 5
                         [1, 2, 3, 4, 2, 0, 0, 0, 0, 0, 0, 0],  # only "2" matches: propose 3 4 2
                         [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)  # nothing: repeat the last token
    filled = jnp.array([8, 5, 3], jnp.int32)
    propose = jax.jit(lambda history, filled: draft.propose(None, None, None, None, None, history, filled,
                                                            Sampling.create(), 0, None, 3))  # one program, not
    proposal = propose(history, filled)  # an eager op (a compilation) at a time
    assert proposal.tokens.tolist() == [[8, 9, 5], [3, 4, 2], [3, 3, 3]]
    assert (proposal.probs.argmax(-1) == proposal.tokens).all() and proposal.probs.sum(-1).min() == 1


class _Model:
    def __init__(self, vocab, tokenizer=None):
        self.config = type("C", (), {"vocab_size": vocab})()
        self.tokenizer = tokenizer


def test_vocabulary_rule():
    """Pythia pads to 50304, GPT-NeoX-20B to 50432: the draft proposes ids below both and the tokenizer's
    size; its masked logits never reach the padding."""
    from neox_jax.tokenizer import demo_tokenizer

    assert shared_vocab(_Model(50432), _Model(50304)) == 50304
    assert shared_vocab(_Model(50304), _Model(50688)) == 50304
    tokenizer = demo_tokenizer()
    assert shared_vocab(_Model(384, tokenizer), _Model(512, tokenizer)) == tokenizer.vocab_size
    draft = ModelDraft(None, shared_vocab=5, target_vocab=8)
    logits = jnp.arange(7.0)[None]  # the draft's own vocabulary (7) is wider than the shared ids (5)
    masked = draft._logits(logits)
    assert masked.shape == (1, 8) and int(masked.argmax()) == 4 and bool(jnp.isfinite(masked).all())


def test_bad_arguments(target):
    for k in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            Speculator(target, "ngram", k)
    with pytest.raises(ValueError, match="ngram"):
        Speculator(target, "bigram", 2)


# Sampled: the verify step on fixed distributions (the target's the same after every prefix, so each emitted
# token must follow it whatever came before), many rows with distinct salts as independent draws.
DRAFT_LOGITS = np.array([0.2, 1.9, 0.0, -0.4, 1.0, 0.3, 0.5, -2.0, 1.1, -0.7])  # q: unlike p (LOGITS)
_verify = jax.jit(verify)


@pytest.mark.parametrize("settings_", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                       dict(temperature=1.3, top_p=0.8)])
def test_sampled_verify_follows_the_target_distribution(settings_):
    k, rows = 2, len(SALTS)
    sampling = Sampling.create(seed=11, **settings_)
    p, q = reference_probs(LOGITS, **settings_), reference_probs(DRAFT_LOGITS, **settings_)
    rng = np.random.default_rng(1)
    drafts = rng.choice(len(q), size=(rows, k), p=q).astype(np.int32)  # the draft's own draws from q
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (rows, k + 1, len(LOGITS)))
    probs = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (rows, k, len(q)))
    accepted, token = map(np.asarray, _verify(logits, jnp.asarray(drafts), probs, sampling, jnp.int32(3), SALTS))
    first = np.where(accepted >= 1, drafts[:, 0], token)
    assert_follows(first, p, ("first", settings_))
    kept = accepted >= 1
    second = np.where(accepted[kept] >= 2, drafts[kept, 1], token[kept])
    assert_follows(second, p, ("second", settings_))
    assert 0.2 < np.mean(accepted == 0) < 0.9  # rejections and acceptances both exercised
    # The test tells p from q: keeping every draft would fail it by orders of magnitude.
    stat, dof = chi_square(np.bincount(drafts[:, 0], minlength=len(p)), p)
    assert stat > 10 * chi_square_critical(dof)


TEMPERATURE = 3.0  # the peaked model's distributions spread over enough tokens for a chi-square test


def test_sampled_generation_follows_the_target_distribution(target, drafts):
    """End to end: 4 prompts x 150 seeds, 5 tokens each (the prefill's, then speculative passes). At each
    generated position the pooled counts match the sum over rows of the target's own next-token
    distribution given that row's prefix (computed by a plain forward pass over the sequences). The rows' draws
    are not identically distributed, so the statistic is at most chi-square's: the test is conservative."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (17, 21, 26, 32)]
    speculator = Speculator(target, drafts["model"], K)
    sequences = []
    for seed in range(150):
        out = speculator.generate(prompts, 5, Sampling.create(temperature=TEMPERATURE, seed=seed), stop_token=None)
        sequences += [p + t for p, t in zip(prompts, out.tokens)]
    again = speculator.generate(prompts, 5, Sampling.create(temperature=TEMPERATURE, seed=149), stop_token=None).tokens
    assert [s[len(p):] for s, p in zip(sequences[-4:], prompts)] == again  # reproducible for a seed
    counts, expected = np.zeros((4, VOCAB)), np.zeros((4, VOCAB))
    for row, prompt in enumerate(prompts):
        batch = sequences[row::4]
        logits = target.logits(np.array(batch)) / TEMPERATURE  # [150, len + 5, V]
        p = np.asarray(jax.nn.softmax(jnp.asarray(logits[:, len(prompt):len(prompt) + 4]), axis=-1))
        for j in range(4):  # after 1..4 new tokens
            counts[j] += np.bincount([s[len(prompt) + 1 + j] for s in batch], minlength=VOCAB)
            expected[j] += p[:, j].sum(0)
    for j in range(4):
        stat, dof = chi_square(counts[j], expected[j] / expected[j].sum())
        assert dof >= 5 and stat < chi_square_critical(dof), (j, stat, dof)


def test_model_generate_takes_a_draft(target, drafts, rng):
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (20, 31, 17)]
    plain = target.generate(prompts, 8, stop_token=None)
    assert target.generate(prompts, 8, stop_token=None, draft=drafts["model"], num_draft_tokens=K) == plain
    assert target.decoder_for(drafts["model"], K) is target.decoder_for(drafts["model"], K)  # made once


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from neox_jax.checkpoints.synthetic import write_hf_checkpoint
    from neox_jax.tokenizer import demo_tokenizer

    from conftest import tiny_config

    path = write_hf_checkpoint(tmp_path_factory.mktemp("m"), tiny_config(vocab_size=384))
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_command_line_draft(model_dir, capsys):
    """`--draft PATH --num-draft-tokens K --json`: with the prompt's acceptance rate and target passes per token
    (the model as its own draft: every token accepted, K + 1 tokens per pass); bad values exit 2."""
    import json

    from neox_jax.generate import main

    base = ["--model", str(model_dir), "--prompt", "The quick brown fox", "--max-new-tokens", "7", "--json",
            "--stop-token", "-1"]
    assert main(base + ["--draft", str(model_dir), "--num-draft-tokens", "2"]) == 0
    out = capsys.readouterr()
    drafted = json.loads(out.out)
    assert len(drafted["completion_token_ids"]) == 7
    assert drafted["draft"] == {"acceptance_rate": 1.0, "target_passes_per_token": round(1 / 3, 4)}
    assert "draft: 100.0% of 4 accepted" in out.err
    assert main(base + ["--draft", str(model_dir / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--draft", "ngram", "--num-draft-tokens", "99"])
    assert exit_.value.code == 2 and "--num-draft-tokens must be in [1, 16]" in capsys.readouterr().err


def test_the_memory_check_counts_the_draft(model_dir, capsys, monkeypatch):
    """Before anything loads, `generate` and `serve` check the model and its draft together: with room for the
    model and its cache but not twice that, the model alone is taken and the model with a draft of its own
    size is refused in one line (naming both models' bytes), its weights never read."""
    import jax.numpy as jnp

    from neox_jax import api, sharding
    from neox_jax.checkpoints import open_checkpoint
    from neox_jax.generate import main
    from neox_jax.serve.__main__ import load_model, parse_args

    config = open_checkpoint(model_dir, None, None).config
    weights = sharding.plan_memory(config, jnp.float32, sharding.make_mesh(1, 1)).weights_per_device
    monkeypatch.setattr(sharding, "host_memory", lambda: int(1.5 * weights))  # the caches here are a few KiB
    base = ["--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "3", "--stop-token", "-1",
            "--dtype", "float32"]
    assert main(base) == 0
    capsys.readouterr()
    monkeypatch.setattr(api, "build_params", lambda *a, **k: pytest.fail("weights read"))
    assert main(base + ["--draft", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: does not fit in host memory"), err
    serve_args = parse_args(["--model", str(model_dir), "--max-batch", "1", "--context", "16", "--dtype",
                             "float32", "--draft", str(model_dir)])
    with pytest.raises(sharding.ShardingError, match="does not fit in host memory"):
        load_model(serve_args)


def test_a_draft_of_another_tokenizer_is_refused(tokenizer_path):
    """The 20B tokenizer against the demo one: refused, naming the rule; the 20B tokenizer's 50277 ids bound
    what a Pythia draft of GPT-NeoX-20B may propose."""
    from neox_jax.tokenizer import demo_tokenizer, load_tokenizer

    real = load_tokenizer(tokenizer_path)
    with pytest.raises(ValueError, match="tokenizer differs"):
        shared_vocab(_Model(50432, real), _Model(384, demo_tokenizer()))
    assert shared_vocab(_Model(50432, real), _Model(50304, real)) == real.vocab_size == 50277


def test_benchmark_estimate():
    """bench.speculative's expected speed-up: tokens per pass over the pass's cost in target steps."""
    from bench.speculative import expected_speedup

    assert expected_speedup(0.0, 4, 1.0, 0.0) == 1.0  # nothing accepted, a free draft: plain speed
    assert expected_speedup(0.7, 4, 1.0, 0.0) == pytest.approx((1 - 0.7 ** 5) / 0.3)
    assert expected_speedup(0.7, 4, 1.05, 0.07) == pytest.approx(2.085, abs=1e-3)  # docs/speculative.md's figure

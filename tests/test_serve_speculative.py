"""Speculative decoding in the serving engine (neox_jax/serve/engine.py with a draft): served greedy tokens are the
tokens served without a draft, whatever the draft (the target itself, a model that disagrees, prompt lookup), K,
and the requests running together; seeded sampled requests are reproducible and are `generate(draft=...)`'s
tokens; the target as its own draft accepts everything; nothing recompiles; the CLI's draft flags."""

import asyncio
import re
import subprocess
import sys

import numpy as np
import pytest

from neox_jax.sampling import Sampling
from neox_jax.serve.engine import Engine

from conftest import REPO, peaked_model
from test_serve_engine import PROMPTS, request, run

CONTEXT = 32
NEW = 9
SAMPLED = dict(temperature=0.9, top_k=20, seed=5)


@pytest.fixture(scope="module")
def model():
    return peaked_model(384, seed=3)


@pytest.fixture(scope="module")
def drafts(model):
    return {"self": model, "other": peaked_model(384, seed=9, num_layers=1), "ngram": "ngram"}


def engine(model, draft=None, k=2, **kw):
    passes = []
    engine = Engine(model, max_batch=kw.pop("max_batch", 3), context=CONTEXT, exact_batching=kw.pop("exact", True),
                    draft=draft, num_draft_tokens=k, on_pass=lambda *a: passes.append(a), **kw)
    engine.passes = passes
    engine.start()
    return engine


@pytest.fixture(scope="module")
def plain(model):
    e = engine(model)
    yield e
    e.stop()


def prompts():
    return [p[:CONTEXT - NEW] for p in PROMPTS]


K = {"self": 3, "other": 2, "ngram": 4}


@pytest.fixture(scope="module")
def drafted(model, drafts):
    """An engine for each draft, made when first asked for."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = engine(model, drafts[name], K[name])
        made[name].passes.clear()
        return made[name]

    yield get
    for e in made.values():
        e.stop()


@pytest.mark.parametrize("name", list(K))
def test_served_tokens_with_a_draft_are_the_tokens_without_it(plain, model, drafts, drafted, name):
    """Greedy: token for token the plain engine's (more requests than slots: they join a running batch), their
    log-probabilities equal to rounding; sampled: reproducible alone and together, and `generate(draft=...)`'s."""
    drafted, k = drafted(name), K[name]
    before = drafted.compiles
    greedy = lambda: [request(p, NEW, logprobs=2) for p in prompts()]  # noqa: E731
    want, got = run(plain, greedy()), run(drafted, greedy())
    assert [s.tokens for s in got] == [s.tokens for s in want]
    for a, b in zip(want, got):
        assert [[t for t, _ in x.top] for x in a.logprobs] == [[t for t, _ in x.top] for x in b.logprobs]
        np.testing.assert_allclose([x.logprob for x in b.logprobs], [x.logprob for x in a.logprobs], atol=1e-5)

    sampled = lambda p: request(p, NEW, sampling=Sampling.create(**SAMPLED))  # noqa: E731
    together = [s.tokens for s in run(drafted, [sampled(p) for p in prompts()])]
    alone = [run(drafted, [sampled(p)])[0].tokens for p in prompts()]
    assert together == alone
    assert together == model.generate(prompts(), NEW, stop_token=None, draft=drafts[name], num_draft_tokens=k,
                                      **SAMPLED)
    assert drafted.compiles == before and drafted.occupied == 0
    rows, accepted, tokens = np.sum(drafted.passes, axis=0)
    assert tokens == 3 * len(PROMPTS) * (NEW - 1)  # every token after the prefill's, from the passes
    if name == "self":
        assert accepted == k * rows  # acceptance 1.0
    if name == "other":
        assert accepted < k * rows / 2


def test_the_target_as_its_draft_gives_k_plus_one_tokens_per_pass(drafted):
    drafted, k = drafted("self"), K["self"]
    served = run(drafted, [request(p, 1 + 2 * (k + 1)) for p in prompts()[:3]])  # fills the 3 slots at once
    assert [len(s.tokens) for s in served] == [1 + 2 * (k + 1)] * 3
    assert drafted.passes == [(3, 3 * k, 3 * (k + 1))] * 2  # two passes, each: all accepted, K + 1 tokens a row


def test_metrics_report_the_acceptance_rate_and_target_passes_per_token(drafted):
    """/metrics (the app's handler, called in process) after requests the target drafts for itself."""
    from neox_jax.serve.app import create_app
    from neox_jax.tokenizer import demo_tokenizer

    drafted, k = drafted("self"), K["self"]
    keep = drafted.on_pass
    try:
        app = create_app(drafted, demo_tokenizer(320), "tiny", None)
        run(drafted, [request(p, 1 + 2 * (k + 1)) for p in prompts()[:2]])
        handler = next(route.endpoint for route in app.routes if route.path == "/metrics")
        text = asyncio.run(handler(None)).body.decode()
    finally:
        drafted.on_pass = keep
    metrics = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}
    assert metrics["neox_target_passes_total"] == 4 and metrics["neox_draft_tokens_proposed_total"] == 4 * k
    assert metrics["neox_draft_tokens_accepted_total"] == 4 * k
    assert metrics["neox_speculative_tokens_total"] == 4 * (k + 1)
    assert metrics["neox_draft_acceptance_rate"] == 1.0
    assert metrics["neox_target_passes_per_token"] == pytest.approx(1 / (k + 1))


def test_stops_mid_draft_and_slot_buckets_with_a_draft(plain, model, drafts):
    """A stop token inside an accepted draft ends the request there; requests finishing out of order move into
    lower rows (both caches move) and keep their tokens."""
    bucketed = engine(model, drafts["other"], 2, exact=False, max_batch=2)
    try:
        assert bucketed.slot_buckets == (1, 2)
        (ref,) = run(plain, [request(PROMPTS[1], 12)])
        (stopped,) = run(bucketed, [request(PROMPTS[1], 12, stop_token=ref.tokens[5])])
        assert stopped.reason == "stop" and stopped.tokens == ref.tokens[:ref.tokens.index(ref.tokens[5])]
        budgets = [3, 9, 5, 8, 2, 7]
        mixed = run(bucketed, [request(p, n) for p, n in zip(prompts(), budgets)])
        assert [s.tokens for s in mixed] == [s.tokens for s in run(plain, [request(p, n)
                                                                             for p, n in zip(prompts(), budgets)])]
        assert bucketed.occupied == 0
    finally:
        bucketed.stop()


@pytest.mark.parametrize("argv, message", [
    (["--draft", "ngram", "--num-draft-tokens", "0"], "--num-draft-tokens must be in [1, 16], got 0"),
    (["--num-draft-tokens", "3"], "--num-draft-tokens needs --draft"),
    (["--draft-quantize", "int8"], "--draft-quantize needs --draft"),
    (["--draft", str(REPO / "no-such-draft")], "no-such-draft: no such directory")])
def test_bad_draft_flags_are_one_error_line(argv, message):
    out = subprocess.run([sys.executable, "-m", "neox_jax.serve", "--demo", "--port", "0", "--log-level", "warning",
                          *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 2, out.stderr
    # Where the real tokenizer is absent, --demo says first (a "note:" line) that it runs the random model.
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("note: the demo's")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr

"""The continuous-batching engine (neox_jax/serve/engine.py), in process: with exact batching, requests joining a
running batch give exactly their tokens alone and `Decoder.generate`'s; with slot buckets, a step computes only
the rows in use and requests moved to lower rows keep their tokens; a turn decodes a chunk of steps unless a
request waits; slots free at once; nothing recompiles; the decode loop updates the cache in place; prompt
log-probabilities equal a full forward pass's."""

import threading

import jax
import numpy as np
import pytest

from neox_jax.decode import GenerationError
from neox_jax.sampling import Sampling
from neox_jax.serve.engine import MAX_LOGPROBS, Engine, QueueFull, Request

from conftest import peaked_model
from test_decode import large_arrays_moved

CONTEXT = 64
SLOTS = 4


class Collect:
    def __init__(self, stop_after: int | None = None):
        self.tokens, self.logprobs, self.prompt = [], [], None
        self.reason = self.error = None
        self.stop_after = stop_after
        self.done = threading.Event()

    def prompt_logprobs(self, scores):
        self.prompt = scores

    def token(self, token, logprobs):
        self.tokens.append(token)
        self.logprobs.append(logprobs)
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def finish(self, reason, error=None):
        self.reason, self.error = reason, error
        self.done.set()


@pytest.fixture(scope="module")
def model():
    return peaked_model(384, seed=3)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, max_queue=32, exact_batching=True)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def bucketed(model):
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, max_queue=32)
    engine.start()
    yield engine
    engine.stop()


def run(engine, requests, timeout=60):
    engine.submit(requests)
    for r in requests:
        assert r.sink.done.wait(timeout), "request did not finish"
    return [r.sink for r in requests]


def request(prompt, max_tokens, **kw):
    return Request(list(prompt), max_tokens, Collect(kw.pop("stop_after", None)), **kw)


PROMPTS = [[1, 2, 3], list(range(5, 25)), [7] * 40, [300], list(range(100, 130)), [9, 8, 7, 6, 5]]
SETTINGS = [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=7), dict(temperature=1.3, top_p=0.8, seed=11),
            dict(temperature=0.7, top_k=5, seed=2**40 + 3)]


def cases():
    """Different lengths, budgets and sampling settings (greedy and seeded)."""
    return [(p, min(CONTEXT - len(p), 6 + 5 * i), SETTINGS[i % len(SETTINGS)]) for i, p in enumerate(PROMPTS)]


def test_requests_in_a_full_batch_give_exactly_their_tokens_alone(engine):
    def make(p, n, s):
        return request(p, n, sampling=Sampling.create(**s), logprobs=2)

    alone = [run(engine, [make(*case)])[0] for case in cases()]
    together = run(engine, [make(*case) for case in cases()])  # more than the slots: some wait, then join
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens and a.reason == b.reason == "length"
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]  # bit for bit
        assert [x.top for x in a.logprobs] == [x.top for x in b.logprobs]


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["greedy", "sampled"])
def test_requests_give_the_tokens_of_generate(engine, model, settings):
    """The same tokens as `Decoder.generate` (a batch of all the prompts, left-padded, one write index)."""
    served = run(engine, [request(p, 10, sampling=Sampling.create(**settings)) for p in PROMPTS])
    assert [s.tokens for s in served] == model.generate(PROMPTS, 10, stop_token=None, **settings)


def test_a_newcomer_joins_a_running_batch_without_disturbing_it(engine):
    long = request(PROMPTS[1], 40)
    engine.submit([long])
    while len(long.sink.tokens) < 5:  # the long one is decoding...
        pass
    late = run(engine, [request(PROMPTS[0], 10)])[0]  # ... when another joins and leaves
    assert long.sink.done.wait(60)
    assert long.sink.tokens == run(engine, [request(PROMPTS[1], 40)])[0].tokens
    assert late.tokens == run(engine, [request(PROMPTS[0], 10)])[0].tokens


def test_stop_token_stop_callback_and_cancel_free_the_slot(engine):
    (ref,) = run(engine, [request(PROMPTS[2], 12)])
    (stopped,) = run(engine, [request(PROMPTS[2], 12, stop_token=ref.tokens[4])])
    assert stopped.reason == "stop" and stopped.tokens == ref.tokens[:ref.tokens.index(ref.tokens[4])]
    (cut,) = run(engine, [request(PROMPTS[2], 12, stop_after=3)])
    assert cut.reason == "stop" and cut.tokens == ref.tokens[:3]
    cancelled = request(PROMPTS[2], CONTEXT - 40)
    engine.submit([cancelled])
    while not cancelled.sink.tokens:
        pass
    cancelled.cancel()
    assert cancelled.sink.done.wait(10) and cancelled.sink.reason == "cancelled"
    assert len(cancelled.sink.tokens) < CONTEXT - 40 and engine.occupied == 0


def test_full_queue_and_bad_requests_are_refused(engine):
    with pytest.raises(QueueFull):  # all or none: more than the queue holds
        engine.submit([request([1], 1) for _ in range(engine.max_queue + 1)])
    for bad, message in (([], "empty"), ([384], "outside the vocabulary"), ([1] * 60, "beyond the context of 64")):
        with pytest.raises(GenerationError, match=message):
            engine.submit([request(bad, 5)])
    with pytest.raises(GenerationError, match="logprobs must be in"):
        engine.submit([request([1], 1, logprobs=MAX_LOGPROBS + 1)])
    assert engine.queue_depth == 0


def test_prompt_logprobs_equal_a_full_forward_pass(engine, model):
    prompt = list(range(3, 3 + 50))
    (scored,) = run(engine, [request(prompt, 0, prompt_logprobs=True, logprobs=3)])
    assert scored.reason == "length" and scored.tokens == [] and scored.prompt[0] is None
    logits = model.logits([prompt])[0]
    ref = jax.nn.log_softmax(logits, axis=-1)
    got = np.array([s.logprob for s in scored.prompt[1:]])
    np.testing.assert_allclose(got, ref[np.arange(49), prompt[1:]], atol=2e-5)
    for t, s in enumerate(scored.prompt[1:]):
        assert [i for i, _ in s.top] == list(np.argsort(-ref[t])[:3])


def test_requests_never_recompile_and_the_step_updates_the_cache_in_place(engine, model):
    before = engine.compiles
    run(engine, [request([5] * n, 3, sampling=Sampling.create(**SETTINGS[n % 4]), logprobs=n % 2 or None,
                         prompt_logprobs=n % 3 == 0) for n in (1, 15, 17, 33, 63 - 3)])
    assert engine.compiles == before == 1 + len(engine.prefill_buckets)
    (step,) = engine._step._executables.values()
    c = model.config
    cache_layer = SLOTS * c.num_heads * engine.slots_per_row * c.head_dim
    moved = large_arrays_moved(step.as_text(), min(cache_layer, c.hidden_size ** 2))
    assert [line for line in moved if "scatter" not in line] == []  # the per-row writes: scatters, in place


def test_slot_buckets_step_only_the_rows_in_use(bucketed, engine, model):
    """A lone request steps one row (the tokens of `generate` for that prompt alone); requests that finish
    at different times leave holes that later ones move into, keeping their tokens; nothing recompiles."""
    assert bucketed.slot_buckets == (1, 2, 4) and not bucketed.exact_batching
    before = bucketed.compiles
    assert before == len(bucketed.slot_buckets) + len(bucketed.prefill_buckets) + 1  # + moving a row
    (alone,) = run(bucketed, [request(PROMPTS[1], 12)])
    assert alone.tokens == model.generate([PROMPTS[1]], 12, stop_token=None)[0]
    budgets = [3, 20, 6, 30, 9, 14]  # finishing out of order: rows are vacated and refilled
    mixed = run(bucketed, [request(p, n) for p, n in zip(PROMPTS, budgets)])
    assert [s.tokens for s in mixed] == [s.tokens for s in run(engine, [request(p, n) for p, n in zip(PROMPTS, budgets)])]
    assert bucketed.compiles == before and bucketed.occupied == 0
    # No step copies the whole cache: the full bucket updates it in place; a smaller one copies its own rows
    # out and back (XLA does not update a slice of the donated cache in place), never the others'.
    c = model.config
    cache_layer = SLOTS * c.num_heads * bucketed.slots_per_row * c.head_dim
    for step in bucketed._step._executables.values():
        moved = large_arrays_moved(step.as_text(), cache_layer)
        assert [line for line in moved if "scatter" not in line] == [], moved


def test_turns_decode_a_chunk_of_steps_unless_a_request_waits(bucketed, model):
    """While requests wait for a slot each turn decodes one step (they are admitted at the next); once none
    waits, `decode_chunk` steps on the device. Budgets and stop tokens inside a chunk end their rows there."""
    counts = []
    run_step = bucketed._run_step

    def counting(*args):
        counts.append((args[-1], bucketed.queue_depth))
        return run_step(*args)

    bucketed._run_step = counting
    try:
        ref = model.generate(PROMPTS, 11, stop_token=None)
        budgets = [11, 11, 11, 11, 2, 7]  # 6 requests on 4 slots: two wait until the first ones end
        served = run(bucketed, [request(p, n) for p, n in zip(PROMPTS, budgets)])
        (stopped,) = run(bucketed, [request(PROMPTS[1], 11, stop_token=ref[1][6])])
    finally:
        del bucketed._run_step
    assert [s.tokens for s in served] == [r[:n] for r, n in zip(ref, budgets)]
    assert stopped.reason == "stop" and stopped.tokens == ref[1][:ref[1].index(ref[1][6])]
    assert all(count == (1 if waiting else bucketed.decode_chunk) for count, waiting in counts)
    assert (1, 2) in counts and (bucketed.decode_chunk, 0) in counts


def exact_tensor_parallel_model(tmp_path):
    """Each rank's LayerNorm copies and biases kept (`tp_exact`): the engine's prefill applies the output
    projection to one position, per rank."""
    import neox_jax
    from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint

    from conftest import tiny_config

    path = write_deepspeed_checkpoint(tmp_path / "tp2", tiny_config(num_heads=8), ranks=2, dtype=np.float32,
                                      layernorm_jitter=0.05)
    model = neox_jax.load(path, "float32", progress=False, tp_exact=True)
    assert model.module.tp_ranks == 2
    return model


def int8_model(tmp_path):
    from neox_jax.demo import random_model

    return random_model(quantize="int8")


@pytest.mark.parametrize("build", [exact_tensor_parallel_model, int8_model])
def test_other_weight_formats_are_served_as_generate_runs_them(build, tmp_path):
    model = build(tmp_path)
    engine = Engine(model, max_batch=2, context=32, exact_batching=True)
    engine.start()
    try:
        served = run(engine, [request(p[:12], 8) for p in PROMPTS[:3]])
    finally:
        engine.stop()
    assert [s.tokens for s in served] == model.generate([p[:12] for p in PROMPTS[:3]], 8, stop_token=None)

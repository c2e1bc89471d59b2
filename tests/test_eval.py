"""lm-evaluation-harness integration: the `neox-jax` model against lm-eval's own `hf` model (HFLM).

Tiny random GPT-NeoX weights in Hugging Face layout with a tiny byte-level BPE tokenizer saved next to
them, so both backends read the same directory. Everything is offline: tasks come from tests/data.
"""

import glob
import json
import math
import os
import subprocess
import sys

# Before lm_eval / datasets / huggingface_hub are imported: they read these once.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows  # noqa: E402

from neox_jax.checkpoints.synthetic import random_tensors, write_hf_checkpoint  # noqa: E402
from neox_jax.config import PRESETS, NeoXConfig  # noqa: E402
from neox_jax import scoring  # noqa: E402
from neox_jax.lm_eval_model import NeoXLM  # noqa: E402
from neox_jax.tokenizer import END_OF_TEXT, demo_tokenizer  # noqa: E402

from conftest import REPO  # noqa: E402

DATA = REPO / "tests" / "data"
CONTEXT = 64  # small max_position_embeddings, so truncation and rolling windows are exercised
TASKS = ["mc_local_tiny", "lambada_local_tiny", "rolling_local_tiny"]
OFFLINE_ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def _config() -> NeoXConfig:
    # vocab 384 > the tokenizer's 320: like 20B (50277 tokens, 50432 rows), scoring sees padded rows too.
    return PRESETS["tiny"].replace(max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """HF GPT-NeoX directory with random weights (a scaled-up head gives peaked distributions) + tokenizer."""
    config = _config()
    tensors = random_tensors(config, seed=0)
    tensors["embed_out.weight"] = tensors["embed_out.weight"] * 10
    path = write_hf_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", config, tensors)
    tokenizer = demo_tokenizer(320)
    assert tokenizer.vocab_size <= config.vocab_size
    tokenizer._tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
        "pad_token": "<|padding|>", "model_max_length": CONTEXT}))
    return path


@pytest.fixture(scope="module")
def neox(checkpoint):
    return NeoXLM(pretrained=str(checkpoint), dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def hf(checkpoint):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=8)


def _texts() -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / "lambada_tiny.jsonl").read_text().splitlines()]


def _ll_requests() -> list[Instance]:
    """Short and long contexts (several beyond the 64-token context), empty contexts, multi-token
    continuations, and shared contexts with one-token answers (which share one scored row)."""
    texts = _texts()
    pairs = []
    for text in texts:
        words = text.split(" ")
        pairs.append((" ".join(words[:-1]), " " + words[-1]))  # LAMBADA style
        pairs.append((" ".join(words[:3]), " " + " ".join(words[3:8])))
    long = " ".join(texts)
    pairs += [(long, " and then"), (long + " " + long, " the end."), (texts[0], " " + " ".join(texts[1].split(" ")[:10]))]
    pairs += [("", " jumps"), ("", "The quick brown fox"), ("", texts[2][:60])]  # empty contexts
    pairs += [("Question: which is larger?\nAnswer:", c) for c in (" a", " b", " c", " yes", " no")]
    pairs += [("Trailing space ", "x"), ("x", "y")]
    # Multiple choice with endings of several tokens: the context is computed once (ContextScorer).
    pairs += [(texts[4], c) for c in (" and the door was open.", " x", " " + texts[5][:80])]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _close(a, b, tol):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= tol, f"request {i}: {x} vs {y}"


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("neox-jax") is NeoXLM


def test_loglikelihood_matches_hf(neox, hf):
    requests = _ll_requests()
    ours, ref = neox.loglikelihood(requests), hf.loglikelihood(requests)
    _close([x[0] for x in ours], [x[0] for x in ref], 1e-4)
    assert [x[1] for x in ours] == [x[1] for x in ref]
    # The set really exercises truncation and empty contexts.
    lengths = [len(neox.tok_encode(r.args[0] + r.args[1])) for r in requests]
    assert max(lengths) > 2 * CONTEXT and any(r.args[0] == "" for r in requests)


def test_quantize_model_arg_scores_with_int8_weights(neox, checkpoint):
    """`quantize=int8`: the model holds int8 weights, says so in its info, and its loglikelihoods stay within
    a quantization's reach of the fp32 model's (int8 moves each weight by at most 1/254 of its channel's largest)."""
    quantized = NeoXLM(pretrained=str(checkpoint), dtype="float32", batch_size=8, quantize="int8")
    assert quantized.model.quantize == "int8" and quantized.get_model_info()["model_quantize"] == "int8"
    assert quantized.get_model_info()["model_num_parameters"] == neox.get_model_info()["model_num_parameters"]
    requests = _ll_requests()[:12]
    ours, fp32 = quantized.loglikelihood(requests), neox.loglikelihood(requests)
    for (got, _), (want, _) in zip(ours, fp32):
        assert got != want and abs(got - want) <= 0.05 * abs(want) + 0.05, (got, want)


def test_is_greedy_true_on_greedy_continuations(neox, hf):
    """Continuations the model itself decodes greedily are flagged greedy by both; one changed token is not."""
    tok = neox.tok_encode
    contexts = [tok(t)[:n] for t, n in zip(_texts(), (3, 9, 17, 30, 45, 50))]
    greedy = neox.model.generate(contexts, 8, stop_token=None)
    requests = []
    for ctx, cont in zip(contexts, greedy):
        requests.append((None, ctx, cont))
        requests.append((None, ctx, cont[:-1] + [(cont[-1] + 1) % 320]))
    ours, ref = neox._loglikelihood_tokens(requests), hf._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [True, False] * len(contexts)
    assert [g for _, g in ref] == [g for _, g in ours]
    _close([x for x, _ in ours], [x for x, _ in ref], 1e-4)


def test_truncation_and_empty_context(neox):
    tok = neox.tok_encode
    context, continuation = tok(" ".join(_texts())), tok(" and then")
    assert len(context) + len(continuation) > CONTEXT + 1
    # Left truncation keeps the last max_length + 1 tokens of context + continuation (minus the last).
    kept = context[-(CONTEXT + 1 - len(continuation)):]
    full, cut = neox._loglikelihood_tokens([(None, context, continuation), (None, kept, continuation)])
    assert full == cut
    # An empty context is the <|endoftext|> prefix token.
    (empty,) = neox.loglikelihood([Instance("loglikelihood", {}, ("", " jumps over"), 0)])
    (prefixed,) = neox._loglikelihood_tokens([(None, [neox.eot_token_id], tok(" jumps over"))])
    assert neox.prefix_token_id == neox.eot_token_id == 0 and empty == prefixed


def test_batch_sizes_agree_and_compiles_bounded(neox, checkpoint):
    requests = _ll_requests()
    results = {}
    for batch_size in (1, 8):
        lm = NeoXLM(pretrained=neox.model, tokenizer=str(checkpoint / "tokenizer.json"), batch_size=batch_size)
        results[batch_size] = lm.loglikelihood(requests, disable_tqdm=True)
        # One compilation per length bucket touched (16, 32, 48, 64 for a 64-token context), not per request:
        # whole rows by their (row, scored positions) bucket pair, shared contexts by their bucket (packed
        # rows by theirs), continuations by their own (every shared context's cache has one size), the head once.
        whole_rows, (contexts, continuations, head, packed) = lm.scorer.programs[0], lm.context_scorer.programs
        assert 1 <= whole_rows.compiles <= 10 and contexts.compiles <= 4 and continuations.compiles <= 4
        assert 1 <= packed.compiles <= 4 and head.compiles == 1
        compiles = lm.compiles
        lm.loglikelihood(requests[::-1], disable_tqdm=True)
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in _texts()],
                                 disable_tqdm=True)
        assert lm.compiles == compiles
    _close([x[0] for x in results[1]], [x[0] for x in results[8]], 1e-5)
    assert [x[1] for x in results[1]] == [x[1] for x in results[8]]


def _multiple_choice(neox) -> list[tuple[None, list[int], list[int]]]:
    """Contexts of several lengths, 3 to 5 endings each of 1 to ~30 tokens, one of them the greedy one. Every
    other context's endings are cut to share the 64-token context (their packed row fits), the others' not."""
    tok, requests = neox.tok_encode, []
    for k, text in enumerate(_texts()[:6]):
        context = tok(text)[:5 + 7 * k]
        endings = [tok(" " + e) for e in _texts()[k + 1].split(".")[:1 + k % 3]] + [[(7 * k) % 320]]
        endings.append(neox.model.generate([context], 6, stop_token=None)[0])
        room = CONTEXT - len(context) if k % 2 else (CONTEXT - len(context)) // len(endings)
        requests += [(None, context, e[:room]) for e in endings]
    return requests


@pytest.fixture(scope="module")
def multiple_choice(neox):
    """The requests of `_multiple_choice` and each scored alone (one whole row, nothing shared)."""
    requests = _multiple_choice(neox)
    return requests, [neox._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]


def _scored_contexts(lm, requests, monkeypatch) -> tuple[list, list, list]:
    """lm's results for `requests`, the contexts it packed with their continuations, those it cached."""
    packed, cached = [], []
    scorer = lm.context_scorer
    for name, seen in (("packed", packed), ("contexts", cached)):
        def spy(rows, *args, original=getattr(scorer, name), seen=seen):
            seen.extend(rows)
            return original(rows, *args)

        monkeypatch.setattr(scorer, name, spy)
    results = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    monkeypatch.undo()
    return results, packed, cached


def test_shared_contexts_equal_whole_rows(neox, multiple_choice, monkeypatch):
    """Scored together, requests sharing a context compute it once (packed with its endings where that row fits
    in the 64-token context, else cached: both happen here, contexts of different lengths in one batch, endings
    of 1 to ~30 tokens); alone, each is one whole row. Equal to 1e-5 (fp32), greedy flags identical."""
    requests, alone = multiple_choice
    together, packed, cached = _scored_contexts(neox, requests, monkeypatch)
    assert sorted(packed + cached) == sorted({tuple(c) for _, c, _ in requests})
    assert len(set(map(len, packed))) > 1 and cached
    for context in packed:
        assert scoring.packed_length(context, [c for _, x, c in requests if tuple(x) == context]) <= CONTEXT
    _close([x for x, _ in together], [x for x, _ in alone], 1e-5)
    assert [g for _, g in together] == [g for _, g in alone]
    assert sum(g for _, g in together) >= 6  # the generated endings are greedy


def test_shared_contexts_split_over_calls_and_head_blocks(neox, checkpoint, multiple_choice, monkeypatch):
    """Batches of 3 rows split contexts' endings (3 to 5 each) over continuation calls and contexts of different
    lengths share a call; head blocks of 8 positions split an ending's positions over blocks. Still equal to
    whole rows to 1e-5, greedy flags identical."""
    monkeypatch.setattr(scoring, "HEAD_ROWS", 8)
    requests, alone = multiple_choice
    assert max(len(c) for _, _, c in requests) > 2 * 8 and min(len(c) for _, _, c in requests) == 1
    lm = NeoXLM(pretrained=neox.model, tokenizer=str(checkpoint / "tokenizer.json"), batch_size=3)
    together = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    _close([x for x, _ in together], [x for x, _ in alone], 1e-5)
    assert [g for _, g in together] == [g for _, g in alone]
    assert lm.context_scorer.programs[2].compiles == 1


def test_packed_row_longer_than_the_context_falls_back_to_the_cache(neox, monkeypatch):
    """4 endings of 12 tokens after a 30-token context: each fits (42 <= 64), their packed row (30 + 4 x 11)
    does not, so the context is cached instead; a 2-ending question beside it is packed. Equal to whole rows."""
    tok = neox.tok_encode
    long_context, short_context = tok(" ".join(_texts()))[:30], tok(_texts()[1])[:9]
    endings = [tok(" ".join(_texts()[k].split(" ")[:20]))[:12] for k in range(2, 6)]
    assert all(len(e) == 12 for e in endings)
    requests = [(None, long_context, e) for e in endings] + [(None, short_context, e) for e in endings[:2]]
    together, packed, cached = _scored_contexts(neox, requests, monkeypatch)
    assert packed == [tuple(short_context)] and cached == [tuple(long_context)]
    alone = [neox._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    _close([x for x, _ in together], [x for x, _ in alone], 1e-5)
    assert [g for _, g in together] == [g for _, g in alone]


def test_head_by_chunks_equals_the_whole_vocabulary_log_softmax(monkeypatch):
    """The CPU head's chunked log-softmax (an online logsumexp, the first largest logit) against the whole
    vocabulary's `_log_softmax_at`: log-probs to fp32 rounding, greedy flags identical, with the largest
    logit tied within a chunk and across chunks (the first one is the argmax, as torch's)."""
    import jax.numpy as jnp

    assert scoring.vocab_chunks(50304) == 48  # Pythia's vocabulary, chunks of 1048
    monkeypatch.setattr(scoring, "HEAD_CHUNK", 16)
    rng = np.random.default_rng(0)
    vocab, width = 96, 16
    assert scoring.vocab_chunks(vocab) == vocab // width
    weight = rng.standard_normal((vocab, 8)).astype(np.float32) * 3
    weight[[5, 40, 41, 70]] = weight[70] * 4  # rows 5 < 40 < 41 < 70 score alike: ties within and across chunks
    x = rng.standard_normal((12, 8)).astype(np.float32)
    x[:6] = weight[70]  # these rows' largest logit is tied at 5, 40, 41 and 70
    targets = np.array([5, 40, 41, 70, 0, 95, *rng.integers(0, vocab, 6)], np.int32)
    targets[6:9] = (x[6:9] @ weight.T).argmax(-1)  # greedy targets of untied rows
    logprob, greedy = scoring._head_by_chunks(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(targets), jnp.float32)
    want_logprob, want_greedy, _ = scoring._log_softmax_at(jnp.asarray(x @ weight.T), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(logprob), np.asarray(want_logprob), rtol=1e-6, atol=1e-5)
    assert list(np.asarray(greedy)) == list(np.asarray(want_greedy))
    assert list(np.asarray(greedy)[:4]) == [True, False, False, False] and np.asarray(greedy)[6:9].all()


def test_shared_contexts_with_the_head_in_chunks_equal_whole_rows(neox, checkpoint, multiple_choice, monkeypatch):
    """The tiny model's 384-row vocabulary in 6 chunks of 64 (Pythia's in 48 of 1048): equal to whole rows to
    1e-5, greedy flags identical."""
    monkeypatch.setattr(scoring, "HEAD_CHUNK", 64)
    requests, alone = multiple_choice
    lm = NeoXLM(pretrained=neox.model, tokenizer=str(checkpoint / "tokenizer.json"), batch_size=8)
    assert scoring.vocab_chunks(lm.config.vocab_size) == 6
    together = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    _close([x for x, _ in together], [x for x, _ in alone], 1e-5)
    assert [g for _, g in together] == [g for _, g in alone]


def test_head_in_chunks_of_int8_weights(neox, checkpoint, multiple_choice, monkeypatch):
    """`quantize=int8`: the head's int8 weight and its scales split into chunks alike (6 of 64 rows) score as
    the head in one chunk, to 1e-5."""
    requests = multiple_choice[0][:8]
    quantized = NeoXLM(pretrained=str(checkpoint), dtype="float32", batch_size=8, quantize="int8")
    whole = quantized._loglikelihood_tokens(requests, disable_tqdm=True)
    monkeypatch.setattr(scoring, "HEAD_CHUNK", 64)
    chunked = NeoXLM(pretrained=quantized.model, tokenizer=str(checkpoint / "tokenizer.json"), batch_size=8)
    _close([x for x, _ in chunked._loglikelihood_tokens(requests, disable_tqdm=True)], [x for x, _ in whole], 1e-5)


@pytest.mark.parametrize("ranks", [None, 2])
def test_packed_rows_layer_by_layer_equal_the_model(checkpoint, tmp_path, ranks):
    """The packed program (one jitted layer called for each layer) gives the model's own final hidden states
    for the same segments, merged and in the exact tensor-parallel mode (DeepSpeed shards of 2 ranks)."""
    import jax
    import neox_jax
    from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint

    if ranks:
        path = write_deepspeed_checkpoint(tmp_path, _config(), ranks=ranks, dtype=np.float32, layernorm_jitter=0.05)
        model = neox_jax.load(path, "float32", progress=False, tp_exact=True)
        assert model.tp_ranks == ranks
    else:
        model = neox_jax.load(checkpoint, "float32", progress=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 320, (3, 32)).astype(np.int32)
    positions = np.concatenate([np.arange(20), np.arange(20, 26), np.arange(20, 26)])[None].repeat(3, 0)
    segments = np.concatenate([np.zeros(20), np.ones(6), np.full(6, 2)])[None].repeat(3, 0).astype(np.int32)
    positions[2, 28:], segments[2, 28:] = -1, 0  # padding
    scorer = scoring.ContextScorer(model)
    got = jax.jit(scorer._packed)(model.params, tokens, positions.astype(np.int32), segments)
    want = model.module.apply({"params": model.params}, tokens, positions.astype(np.int32), segments=segments,
                              return_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(np.asarray(got)[positions >= 0], np.asarray(want)[positions >= 0], rtol=1e-6, atol=1e-6)


def test_shared_lengths_trade_a_few_padded_positions_for_a_program():
    """A batch runs at a longer length that batches of its row count already run at when that pads at most
    SHARED_PROGRAM_POSITIONS in all for its shape; never at a shorter one, never across row counts."""
    assert scoring.SHARED_PROGRAM_POSITIONS == 2048
    # 8 rows are their own row count.
    assert scoring.shared_lengths([(16, 160), (16, 144), (8, 128)]) == [160, 160, 128]
    # The HellaSwag-shaped bench task: 40 contexts at batch 16, 3 even batches (`even_batch`): one program.
    assert scoring.shared_lengths([(14, 160), (14, 144), (14, 128)]) == [160, 160, 160]
    # 8 batches of 16 rows at 144 would pad 8 x 16 x 16 = 2048 positions: shared; 9 would pad 2304: not.
    assert scoring.shared_lengths([(16, 160)] + [(16, 144)] * 8) == [160] * 9
    assert scoring.shared_lengths([(16, 160)] + [(16, 144)] * 9) == [160] + [144] * 9
    # Chained: 128 joins 144's batches, which ran at 160 (16 x 32 = 512 positions).
    assert scoring.shared_lengths([(16, 512), (16, 160), (16, 144), (16, 128)]) == [512, 160, 160, 160]
    assert scoring.shared_lengths([(16, 512), (16, 256)]) == [512, 256]  # 16 x 256 = 4096: its own


def test_even_batch_splits_contexts_into_fewest_batches_of_one_row_count():
    """As few batches of at most `batch` rows as hold the contexts, of equal row counts rounded up to a multiple
    of the data axis; a whole task of fewer contexts is one batch of its size."""
    assert scoring.even_batch(40, 16, 1) == 14  # 14 + 14 + 12, not 16 + 16 + 8
    assert [scoring.even_batch(n, 16, 1) for n in (1, 5, 16, 17, 33, 10042)] == [1, 5, 16, 9, 11, 16]
    assert scoring.even_batch(40, 16, 2) == 14 and scoring.even_batch(17, 16, 4) == 12
    assert scoring.even_batch(0, 16, 2) == 2  # no contexts: no batch runs, but a row count that slices


def test_head_queue_hands_back_each_owner_once_complete(monkeypatch):
    """Owners' positions straddling blocks of 4 are summed in order, each owner handed back once all its
    positions went through the head; only a flush runs a partial block."""
    monkeypatch.setattr(scoring, "HEAD_ROWS", 4)
    blocks = []

    class FakeScorer:  # log-prob of a target = the target; greedy = even target
        decoder = type("Decoder", (), {"mesh": type("Mesh", (), {"shape": {scoring.DATA: 1}})()})()

        def head(self, hidden, targets):
            blocks.append(targets.copy())
            assert hidden.shape == (4, 2) and (hidden[:, 0] == targets).all()
            return targets.astype(np.float32), targets % 2 == 0

    queue = scoring.HeadQueue(FakeScorer())
    owners = {"a": [2, 4, 6], "b": [1], "c": [8, 10, 12, 14, 16], "d": [3, 4]}
    handed = []
    for owner, targets in owners.items():
        hidden = np.stack([np.asarray(targets, np.float32)] * 2, axis=1)
        queue.add(owner, hidden, targets)
        handed += queue.scored()
    assert [len(b) for b in blocks] == [4, 4] and [o for o, _, _ in handed] == ["a", "b"]
    handed += queue.scored(flush=True)
    assert len(blocks) == 3 and list(blocks[2]) == [16, 3, 4, 0]
    assert handed == [(o, float(sum(t)), all(x % 2 == 0 for x in t)) for o, t in owners.items()]


def test_loglikelihood_rolling_matches_hf(neox, hf):
    short = _texts()[3]
    long = " ".join(_texts()) * 2
    assert len(neox.tok_encode(short)) < CONTEXT
    windows = list(get_rolling_token_windows(neox.tok_encode(long), neox.prefix_token_id, CONTEXT, 1))
    assert len(windows) >= 4
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([short, long, ""])]
    ours, ref = neox.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests)
    for x, y in zip(ours, ref):
        assert abs(x - y) <= 1e-4 + 1e-6 * abs(y), (ours, ref)
    assert ours[2] == 0.0


def test_generate_until_cuts_at_stop_string(neox, hf):
    prompts = ["The quick brown fox", "Rotary position", "def hello():"]
    base = {"max_gen_toks": 24, "do_sample": False}
    full = neox.generate_until([Instance("generate_until", {}, (p, {**base, "until": []}), i)
                                for i, p in enumerate(prompts)])
    # The greedy tokens themselves, decoded: generate_until returns exactly their text when nothing stops it.
    tokens = neox.model.generate([neox.tok_encode(p) for p in prompts], 24, stop_token=neox.eot_token_id)
    assert full == [neox.tok_decode(t) for t in tokens]
    requests, expected = [], []
    for i, (prompt, text) in enumerate(zip(prompts, full)):
        assert len(text) >= 8, text
        k = len(text) // 2
        stop = text[k:k + 2]
        requests.append(Instance("generate_until", {}, (prompt, {**base, "until": [stop, "never-seen"]}), i))
        expected.append(text[:text.index(stop)])
    cut = neox.generate_until(requests)
    assert cut == expected and all(len(c) < len(t) for c, t in zip(cut, full))
    assert hf.generate_until(requests) == cut


def _metrics(results: dict) -> dict:
    return {(task, name): value for task, metrics in results["results"].items()
            for name, value in metrics.items() if "stderr" not in name and isinstance(value, float)}


def test_task_metrics_match_hf(checkpoint, hf, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    manager = TaskManager(include_path=str(DATA), include_defaults=False)  # only the local tasks: fast
    common = dict(tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=False)
    ours = lm_eval.simple_evaluate(model="neox-jax", model_args=f"pretrained={checkpoint},dtype=float32",
                                   batch_size=8, **common)
    ref = lm_eval.simple_evaluate(model=hf, **common)
    ours, ref = _metrics(ours), _metrics(ref)
    assert ours.keys() == ref.keys() and {t for t, _ in ours} == set(TASKS)
    assert ("lambada_local_tiny", "perplexity,none") in ours and ("mc_local_tiny", "acc_norm,none") in ours
    for key, value in ours.items():
        if key[1].startswith(("acc", "acc_norm")):
            assert value == ref[key], key
        else:
            assert math.isclose(value, ref[key], rel_tol=1e-5), (key, value, ref[key])


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "neox_jax.eval", "--help"], cwd=REPO, env=OFFLINE_ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--tasks" in out.stdout and "--include_path" in out.stdout and "pretrained=DIR" in out.stdout


def test_cli_run_writes_results(checkpoint, tmp_path):
    out_dir, programs = tmp_path / "out", tmp_path / "xla"
    cmd = [sys.executable, "-m", "neox_jax.eval", "--model_args", f"pretrained={checkpoint},dtype=float32",
           "--tasks", "mc_local_tiny,lambada_local_tiny", "--include_path", str(DATA),
           "--batch_size", "4", "--output_path", str(out_dir)]
    out = subprocess.run(cmd, cwd=REPO, env={**OFFLINE_ENV, "JAX_COMPILATION_CACHE_DIR": str(programs)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mc_local_tiny" in out.stdout and "neox-jax" in out.stdout  # the results table and its header
    assert "os.fork() was called" not in out.stderr  # LAMBADA's bootstrapped stderr runs under forkserver
    files = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1, files
    results = json.loads(open(files[0]).read())
    assert set(results["results"]) == {"mc_local_tiny", "lambada_local_tiny"}
    assert results["config"]["model"] == "neox-jax"
    assert 0.0 <= results["results"]["mc_local_tiny"]["acc,none"] <= 1.0
    assert len(list(programs.iterdir())) >= 3  # the scoring programs, kept for the next run


def test_compilation_cache_folder(monkeypatch, tmp_path):
    from neox_jax.eval import compilation_cache_dir

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "given"))
    assert compilation_cache_dir() == tmp_path / "given"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "neox_jax" / "xla"


def test_tokenization_matches_transformers_on_20b_tokenizer(tokenizer_path, tmp_path):
    """With the real 20B tokenizer, neox-jax encodes as transformers' GPT-NeoX tokenizer (HFLM's) does."""
    transformers = pytest.importorskip("transformers")
    config = NeoXConfig(vocab_size=50432, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_position_embeddings=128)
    path = write_hf_checkpoint(tmp_path / "ckpt", config)
    lm = NeoXLM(pretrained=str(path), tokenizer=str(tokenizer_path), dtype="float32")
    cls = getattr(transformers, "GPTNeoXTokenizer", None) or transformers.GPTNeoXTokenizerFast
    ref = cls(tokenizer_file=str(tokenizer_path))
    for text in ["In my palace of Leaves Sorrow, I wait", " Hello", "  two spaces\n\n\ttabs \u00fcn\u00ef \u2603",
                 "<|endoftext|>after"]:
        assert lm.tok_encode(text) == ref.encode(text), text
    assert lm.eot_token_id == lm.prefix_token_id == ref.eos_token_id == 0
    assert lm._eot_string == ref.decode([0], skip_special_tokens=False) == END_OF_TEXT

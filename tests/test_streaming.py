"""Streaming text: whole characters only, equal to the non-streaming completion, stop strings cut exactly."""

import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

import neox_jax.generate as generate_cli
from neox_jax.demo import demo_model
from neox_jax.streaming import TextStream
from neox_jax.tokenizer import demo_tokenizer, load_tokenizer

from conftest import REPO

DEMO_TOKENIZER = demo_tokenizer()
TEXT = "Zürich → 東京: naïve café ✓ 🚀 done.\n\nNext paragraph."


@pytest.fixture(params=["demo", "20B"])
def tokenizer(request):
    if request.param == "demo":
        return demo_tokenizer()
    return load_tokenizer(request.getfixturevalue("tokenizer_path"))


def test_token_by_token_release_is_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    # Some token must end mid-character, or this test would prove nothing.
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))
    stream, parts = TextStream(tokenizer), []
    for token in ids:
        parts.append(stream.push([token]))
    parts.append(stream.push([], final=True))
    assert "".join(parts) == TEXT
    assert not any("\ufffd" in p for p in parts)


@pytest.mark.parametrize("stop, expected", [("\n\n", "Zürich → 東京: naïve café ✓ 🚀 done."),
                                            ("東京", "Zürich → "), ("café ✓", "Zürich → 東京: naïve "),
                                            ("absent", TEXT)])
def test_stop_strings_cut_exactly_whatever_the_chunking(tokenizer, stop, expected):
    ids = tokenizer.encode(TEXT)
    for chunk in (1, 2, 5, len(ids)):
        stream, released = TextStream(tokenizer, [stop, "never there"]), ""
        for i in range(0, len(ids), chunk):
            released += stream.push(ids[i:i + chunk])
        released += stream.push([], final=True)
        assert released == stream.text == expected
        assert stop not in tokenizer.decode(stream.tokens[:-1])  # tokens end where the stop string completed


@pytest.fixture(scope="module")
def model():
    return demo_model()


def test_streaming_equals_one_shot_generation(model):
    prompts = ["The quick brown fox", "JAX"]
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)  # stream() takes generate()'s keywords
    one_shot = model.generate(prompts, 40, stop_token=None, **settings)
    for chunk in (1, 3):
        parts = list(model.stream(prompts, 40, stop_token=None, chunk=chunk, **settings))
        assert ["".join(p) for p in zip(*parts)] == one_shot
        assert len(parts) > 40 // chunk - 1  # really streamed


def test_sampled_streaming_equals_an_independent_sampler(model):
    """Sampled streaming text against two paths that share neither the streaming code nor (the second) the
    sampler or the decode loop: `generate` on token ids decoded by the tokenizer, and a sampler written here
    from the documented contract, drawing each token with `jax.random.categorical` from the full forward
    pass's logits / T under the key fold_in(fold_in(seed key, step), crc32 of the prompt's int64 ids)."""
    import zlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    prompts, n, temperature, seed = ["The quick brown fox", "JAX"], 24, 0.9, 7
    parts = list(model.stream(prompts, n, stop_token=None, chunk=5, temperature=temperature, seed=seed))
    streamed = ["".join(p) for p in zip(*parts)]
    ids = [model.tokenizer.encode(p) for p in prompts]
    generated = model.generate(ids, n, temperature=temperature, seed=seed, stop_token=None)
    assert streamed == [model.tokenizer.decode(tokens) for tokens in generated]

    base = jax.random.wrap_key_data(jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32))
    for prompt, tokens in zip(ids, generated):
        salt = zlib.crc32(np.asarray(prompt, np.int64).tobytes())
        sequence = list(prompt)
        for step in range(n):
            logits = jnp.asarray(model.logits([sequence])[0, -1], jnp.float32) / jnp.float32(temperature)
            key = jax.random.fold_in(jax.random.fold_in(base, step), salt)
            sequence.append(int(jax.random.categorical(key, logits)))
        assert sequence[len(prompt):] == tokens
    assert len(set(generated[0])) > 5  # sampled, not greedy-like


def test_model_level_stop_string(model):
    full = model.generate(["GPT-NeoX-20B is"], 30, stop_token=None)[0]
    stop = full[10:13]
    cut = model.generate(["GPT-NeoX-20B is"], 30, stop_token=None, stop=[stop])[0]
    assert cut == full[:full.index(stop)]
    with pytest.raises(ValueError, match="stop strings need text prompts"):
        model.generate([[1, 2]], 4, stop=["x"])


def test_interactive_loop_through_a_pipe(model):
    result = subprocess.run(
        [sys.executable, "-m", "neox_jax.generate", "--demo", "--interactive", "--max-new-tokens", "6"],
        input="The quick\n\nJAX compiles\n", cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # Each prompt, then its greedy completion (stopping at <|endoftext|>, as --demo does), as the Python API gives it.
    completions = [model.generate(p, 6) for p in ("The quick", "JAX compiles")]
    assert result.stdout == f"The quick{completions[0]}\nJAX compiles{completions[1]}\n"
    assert all(len(model.tokenizer.encode(c)) >= 3 for c in completions)  # real text was generated
    assert result.stderr.count("ms/token") == 2  # one report per prompt, the blank line skipped


def test_ctrl_c_interrupts_a_generation_not_the_session(monkeypatch, capsys):
    real_stream_text = generate_cli.stream_text
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_stream_text(*args, **kwargs)

    monkeypatch.setattr(generate_cli, "stream_text", interrupted_once)
    lines = iter(["first prompt", "second prompt"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    assert generate_cli.main(["--demo", "--interactive", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "[interrupted]" in captured.err
    assert "second prompt" in captured.out and len(calls) == 2


def naive_completion(text: str, stops: list[str]) -> str:
    """The reference: the text before the first stop string to be completed (the longest, if several end at
    the same character), found by checking every end position."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stop_strings_against_a_naive_reference(data):
    tokenizer = DEMO_TOKENIZER
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40), label="ids")
    text = tokenizer.decode(ids)
    substrings = st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(lambda t: text[t[0]:t[0] + t[1]])
    stops = data.draw(st.lists(substrings | st.text(max_size=3), max_size=4), label="stops")
    chunk = data.draw(st.integers(1, 8), label="chunk")
    stream, released = TextStream(tokenizer, stops), ""
    for i in range(0, len(ids), chunk):
        released += stream.push(ids[i:i + chunk])
    released += stream.push([], final=True)
    assert released == stream.text == naive_completion(text, stops)


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def test_each_token_costs_work_for_its_own_text_only():
    """A long generation and a pathological 200,000-character stop string: the old matcher's work per token grew
    with the text so far and the square of the stop string's length (one request stalled every client of the
    server); now every token decodes a window of a few tokens and feeds each new character through the
    matcher once."""
    tokenizer = CountingTokenizer(DEMO_TOKENIZER)
    ids = DEMO_TOKENIZER.encode("a" * 3000)
    stream = TextStream(tokenizer, ["a" * 199_999 + "b", "ab" * 50_000])
    start = time.perf_counter()
    released = "".join(stream.push([t]) for t in ids) + stream.push([], final=True)
    assert released == "a" * 3000 and time.perf_counter() - start < 10  # the old code: hours
    assert tokenizer.decoded <= 4 * len(ids)

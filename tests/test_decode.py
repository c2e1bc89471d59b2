"""Greedy decoding: equals transformers, batches equal single prompts, stops, compiles once per bucket."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import neox_jax
from neox_jax.decode import PREFILL_CHUNK, Compiled, Decoder, GenerationError
from neox_jax.model import KVCache, NeoX
from neox_jax.sampling import Sampling
from neox_jax.weights import abstract_params

from conftest import tiny_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import hf_reference

    config = tiny_config(vocab_size=64, max_position_embeddings=128)
    torch_model = hf_reference(config, seed=1)
    path = tmp_path_factory.mktemp("hf")
    torch_model.save_pretrained(path)
    return neox_jax.load(path, dtype="float32", progress=False), torch_model


def torch_greedy(torch_model, prompt, n):
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [[3, 17, 42, 9, 5, 60, 33], [12], [7, 7, 8, 30, 31, 2, 4, 50, 51, 52, 1, 19, 23]]


def test_greedy_tokens_match_transformers(reference):
    model, torch_model = reference
    for prompt in PROMPTS:
        assert model.generate([prompt], 16, stop_token=None) == [torch_greedy(torch_model, prompt, 16)]


def test_mixed_length_batch_equals_each_prompt_alone(reference):
    model, _ = reference
    batch = model.generate(PROMPTS, 12, stop_token=None)
    assert batch == [model.generate([p], 12, stop_token=None)[0] for p in PROMPTS]
    assert all(len(tokens) == 12 for tokens in batch)


def test_stop_token_ends_each_row_separately(reference):
    model, _ = reference
    free = model.generate(PROMPTS, 12, stop_token=None)
    stop = free[0][4]  # a token the first row emits at step 4
    stopped = model.generate(PROMPTS, 12, stop_token=stop)
    for tokens, full in zip(stopped, free):
        expected = full[:full.index(stop)] if stop in full else full
        assert tokens == expected
    assert stopped[0] == free[0][:free[0].index(stop)]


def test_the_default_stop_token_is_the_tokenizers_end_of_text(reference):
    """No stop_token given: the tokenizer's <|endoftext|> id ends a row; without a tokenizer nothing does."""
    model, _ = reference
    free = model.generate(PROMPTS, 12, stop_token=None)
    end_of_text = free[0][4]
    try:
        model.tokenizer = type("Tokenizer", (), {"eos_id": end_of_text})()
        assert model.generate(PROMPTS, 12) == model.generate(PROMPTS, 12, stop_token=end_of_text) != free
        assert model.generate_timed(PROMPTS, 12).tokens == model.generate(PROMPTS, 12)
    finally:
        model.tokenizer = None
    assert model.generate(PROMPTS, 12) == free


def test_decoder_has_no_default_stop_token(reference):
    """The decoder takes the stop token from its caller (None: never); only the API picks a default."""
    model, _ = reference
    with pytest.raises(TypeError, match="stop_token"):
        model.decoder.generate(PROMPTS, 4)
    assert model.decoder.generate(PROMPTS, 4, stop_token=None).tokens == model.generate(PROMPTS, 4, stop_token=None)


def test_prompt_lengths_and_token_counts_within_a_bucket_reuse_the_compilation(reference):
    model, _ = reference
    decoder = model.decoder
    model.generate([[1, 2, 3]], 5, stop_token=None)
    compiles = decoder.compiles
    model.generate([[4, 5, 6, 7, 8, 9, 10]], 9, stop_token=None)  # other length, same buckets
    model.generate([[4, 5]], 17, stop_token=3)  # 16 prompt slots + 16 decode steps: still 32 slots
    assert decoder.compiles == compiles
    model.generate([list(range(1, 40))], 5, stop_token=None)  # a longer prompt: a new bucket
    assert decoder.compiles == compiles + 2


class CountingCalls:
    def __init__(self, compiled):
        self.compiled, self.calls = compiled, 0

    def __getattr__(self, name):
        return getattr(self.compiled, name)

    def __call__(self, *args):
        self.calls += 1
        return self.compiled(*args)


def test_decode_loop_runs_on_device_in_one_call(reference, monkeypatch):
    """One call of the compiled decode program produces every token: no per-step host round trip."""
    model, _ = reference
    counting = CountingCalls(model.decoder._decode)
    monkeypatch.setattr(model.decoder, "_decode", counting)
    tokens = model.generate([[1, 2, 3]], 20, stop_token=None)
    assert len(tokens[0]) == 20 and counting.calls == 1


def large_arrays_moved(hlo: str, min_elements: int) -> list[str]:
    """Instructions of an optimised HLO module that write at least `min_elements` elements, other than
    views (parameters, tuple elements, bitcasts) and in-place cache updates (dynamic-update-slice)."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not match or math.prod(int(n) for n in match.group(2).split(",") if n) < min_elements:
            continue
        name, opcode = match.group(1), match.group(3)
        in_place_update = "dynamic-update-slice" in (opcode + name).replace("_", "-")
        if opcode not in ("parameter", "get-tuple-element", "bitcast", "tuple") and not in_place_update:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_loop_copies_no_weights_and_no_cache(reference, rows):
    """Each step reads the weights where they lie and updates the cache in place.

    Both were regressions measured on XLA:CPU: with the layers stacked under a scan, each layer's
    weights were sliced (copied) out of the stack every step; when the cache write did not depend on
    the attention reads of the old cache, XLA copied the cache twice per step.
    """
    model, _ = reference
    decoder = Decoder(model.module, model.params)
    decoder.generate([[1, 2, 3], [4, 5]][:rows], 8, stop_token=None)
    (executable,) = decoder._decode._executables.values()
    c = model.config
    cache_layer = rows * c.num_heads * 32 * c.head_dim  # 32 slots
    smallest_weight = c.hidden_size ** 2  # the attention output projection; activations are smaller
    assert large_arrays_moved(executable.as_text(), min(cache_layer, smallest_weight)) == []


def test_copy_finder_sees_the_copies_of_copying_programs(reference):
    """Positive controls for `large_arrays_moved`, so that a change in XLA's HLO text cannot make the test above
    pass vacuously: the same decode program without donating its state must copy each layer's keys and
    values into the loop (their input buffers cannot be reused), and a loop over a stacked weight must slice it."""
    model, _ = reference
    c = model.config
    decoder = Decoder(model.module, model.params)
    decoder._decode = Compiled(decoder._decode_fn)  # no donate_argnums
    decoder.generate([[1, 2, 3]], 8, stop_token=None)
    (executable,) = decoder._decode._executables.values()
    text = executable.as_text()
    found = large_arrays_moved(text, min(c.num_heads * 32 * c.head_dim, c.hidden_size ** 2))
    cache_shape = f"f32[1,{c.num_heads},32,{c.head_dim}]"
    assert len(found) == 2 * c.num_layers and all(cache_shape in line for line in found), found
    # The analysis parses the program at all: most instructions match its pattern.
    assert len(large_arrays_moved(text, 1)) > 50

    def stacked(w, x):  # [2, D, D] weights, one slice per iteration, as a scan over stacked layers would
        layer = lambda i, x: jnp.tanh(x @ jax.lax.dynamic_index_in_dim(w, i, keepdims=False))  # noqa: E731
        return jax.lax.fori_loop(0, 2, layer, x)

    d = c.hidden_size
    compiled = jax.jit(stacked).lower(jax.ShapeDtypeStruct((2, d, d), jnp.float32),
                                      jax.ShapeDtypeStruct((1, d), jnp.float32)).compile()
    assert large_arrays_moved(compiled.as_text(), d * d)


@pytest.mark.parametrize("prompts, max_new, message", [
    ([], 4, "no prompts"),
    ([[]], 4, "empty"),
    ([[1, 2]], 0, "max_new_tokens"),
    ([[1, 2]], -3, "max_new_tokens"),
    ([[1, 999]], 4, "outside the vocabulary"),
    ([[1] * 120], 9, "beyond the model's context of 128"),
])
def test_bad_requests_are_clear_errors(reference, prompts, max_new, message):
    model, _ = reference
    with pytest.raises(GenerationError, match=message):
        model.generate(prompts, max_new)


def test_full_context_is_allowed(reference):
    model, _ = reference
    out = model.generate([[1] * 120], 8, stop_token=None)
    assert len(out[0]) == 8


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    from conftest import hf_reference

    config = tiny_config(vocab_size=64, max_position_embeddings=1024)
    torch_model = hf_reference(config, seed=2)
    path = tmp_path_factory.mktemp("hf-long")
    torch_model.save_pretrained(path)
    return neox_jax.load(path, dtype="float32", progress=False), torch_model


LONG_PROMPT = np.random.default_rng(0).integers(0, 64, 2 * PREFILL_CHUNK + 90).tolist()  # 602 tokens


def test_long_prompts_prefill_in_chunks_and_match_transformers(long_reference):
    """Prompts longer than PREFILL_CHUNK go through the cache chunk by chunk; the result is unchanged."""
    model, torch_model = long_reference
    short_prompt = LONG_PROMPT[:40]
    calls = CountingCalls(model.decoder._prefill)
    model.decoder._prefill = calls
    try:
        out = model.generate([LONG_PROMPT, short_prompt], 8, stop_token=None)
    finally:
        model.decoder._prefill = calls.compiled
    assert calls.calls == 3  # 602 tokens pad to 768: three chunks of 256
    assert out == [torch_greedy(torch_model, LONG_PROMPT, 8), torch_greedy(torch_model, short_prompt, 8)]


def test_chunked_prefill_fills_each_cache_slot_as_one_full_pass_does(long_reference):
    """After the three prefill chunks, every slot of the cache holds the position, keys and values that one
    forward pass over the whole left-padded prompt writes there (and the new token is that pass's argmax):
    a chunk written one slot off, or with its positions off by one, fails."""
    model, _ = long_reference
    c = model.config
    prompts = [LONG_PROMPT, LONG_PROMPT[:40]]
    states = []

    class Spy(CountingCalls):
        def __call__(self, *args):
            states.append(super().__call__(*args))
            return states[-1]

    spy = Spy(model.decoder._prefill)
    model.decoder._prefill = spy
    try:
        chunks = model.decoder.stream(prompts, 8, stop_token=None)
        first = next(chunks)  # the prefill only; its state is read before any decode step donates it
        cache, done = jax.tree.map(np.asarray, (states[-1].cache, states[-1].done))
        chunks.close()
    finally:
        model.decoder._prefill = spy.compiled
    assert spy.calls == 3

    # Left padding to 768 slots: row 0's 602 tokens sit at slots 166..767, row 1's 40 at 728..767.
    slots, length = cache.positions.shape[1], 768
    expected_positions = np.full((2, slots), -1)
    expected_positions[0, length - 602:length] = np.arange(602)
    expected_positions[1, length - 40:length] = np.arange(40)
    np.testing.assert_array_equal(cache.positions[:2], expected_positions)
    assert int(cache.length) == length

    tokens = np.zeros((2, length), np.int32)
    tokens[0, length - 602:], tokens[1, length - 40:] = prompts[0], prompts[1]
    one_pass = jax.jit(model.module.apply)({"params": model.params}, tokens, expected_positions[:, :length],
                                           KVCache.init(c, 2, slots, jnp.float32))
    logits, full = jax.tree.map(np.asarray, (one_pass.logits, one_pass.cache))
    assert first[:, 0].tolist() == logits[:, -1].argmax(-1).tolist()
    for layer in range(c.num_layers):
        for got, want in ((cache.k[layer], full.k[layer]), (cache.v[layer], full.v[layer])):
            filled = expected_positions >= 0  # [B, S]; padding slots hold whatever padding tokens computed
            got, want = got[:2].transpose(0, 2, 1, 3)[filled], want.transpose(0, 2, 1, 3)[filled]
            np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    assert not done[:2].any()


def test_prefill_attention_makes_each_score_sized_array_once():
    """A 256-token prefill chunk against 2048 cached slots keeps ~6 bytes of temporaries a score (the fp32
    scores, then the weights) in XLA's memory analysis; concatenating the cached and the new tokens'
    scores before the softmax had made it ~14."""
    config = tiny_config(hidden_size=1024, num_heads=16, intermediate_size=1024, num_layers=1,
                         max_position_embeddings=2048)
    batch, chunk, slots = 8, 256, 2048
    decoder = Decoder(NeoX(config, jnp.float32), None)
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, slots, jnp.float32))
    rows = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    compiled = decoder._prefill.lower(abstract_params(config, jnp.float32), rows, rows, cache,
                                      Sampling.create(), jnp.int32(0), jax.ShapeDtypeStruct((batch,), jnp.bool_),
                                      jax.ShapeDtypeStruct((batch,), jnp.uint32)).compile()
    scores = batch * config.num_heads * chunk * slots
    assert compiled.memory_analysis().temp_size_in_bytes / scores < 8

"""The on-device decode loop's carried state, checked directly: a tiny random model's greedy tokens barely depend
on positions, so equal tokens alone would not notice a position or slot written wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.decode import Generation, GenerationError, left_pad, length_bucket
from neox_jax.model import KVCache
from neox_jax.sampling import Sampling, row_salt, select_token

from conftest import peaked_model
from test_decode import PROMPTS, CountingCalls


@pytest.fixture(scope="module")
def model():
    """A tiny model whose greedy continuations of PROMPTS vary (most random ones repeat one token)."""
    return peaked_model(vocab_size=64, seed=2)


class Recorder(CountingCalls):
    """A compiled program that keeps a host copy of each decode state it returns, before the next call donates it."""

    def __init__(self, compiled):
        super().__init__(compiled)
        self.states = []

    def __call__(self, *args):
        result = super().__call__(*args)
        self.states.append(jax.tree.map(np.asarray, result[-1] if isinstance(result, tuple) else result))
        return result


def until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


def test_length_buckets():
    """Powers of two from 16 to 256, then multiples of 256."""
    sizes = [1, 16, 17, 32, 33, 64, 65, 128, 129, 255, 256, 257, 512, 513, 2048]
    assert [length_bucket(n) for n in sizes] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 256, 512, 512,
                                                  768, 2048]


def test_decoded_cache_equals_one_full_pass(model):
    """After the prefill and 11 decode steps (chunks of 4), every filled slot holds the position, keys and values
    that one forward pass over prompt + generated tokens computes there."""
    c, prompts, new = model.config, PROMPTS[:2], 12
    spy = Recorder(model.decoder._decode)
    model.decoder._decode = spy
    try:
        generated = np.concatenate(list(model.decoder.stream(prompts, new, stop_token=None, chunk=4)), axis=1)
    finally:
        model.decoder._decode = spy.compiled
    assert spy.calls == 3 and generated.shape == (2, new)  # 11 steps: 4 + 4 + 3
    cache = spy.states[-1].cache

    # Prompts left-padded to 16 slots; the 11 tokens fed back since sit at slots 16..26; 32 slots in all.
    prompt_slots, filled = 16, 16 + new - 1
    tokens = np.zeros((2, filled), np.int32)
    positions = np.full((2, cache.positions.shape[1]), -1)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_slots - len(prompt):prompt_slots] = prompt
        tokens[row, prompt_slots:] = generated[row, :-1]
        positions[row, prompt_slots - len(prompt):filled] = np.arange(len(prompt) + new - 1)
    np.testing.assert_array_equal(cache.positions, positions)
    assert int(cache.length) == filled
    np.testing.assert_array_equal(spy.states[-1].positions, positions[:, filled - 1] + 1)

    one_pass = jax.jit(model.module.apply)({"params": model.params}, tokens, positions[:, :filled],
                                           KVCache.init(c, 2, positions.shape[1], jnp.float32))
    logits, full = one_pass.logits, one_pass.cache
    np.testing.assert_array_equal(np.asarray(logits[:, -1]).argmax(-1), generated[:, -1])
    visible = positions >= 0
    for layer in range(c.num_layers):
        for got, want in ((cache.k[layer], full.k[layer]), (cache.v[layer], full.v[layer])):
            got, want = got.transpose(0, 2, 1, 3)[visible], np.asarray(want).transpose(0, 2, 1, 3)[visible]
            np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_a_stop_token_chosen_in_the_loop_ends_the_loop(model):
    """Once every row has chosen its stop token the loop ends: no steps are spent past it."""
    free = model.generate([PROMPTS[0]], 12, stop_token=None)[0]
    step = next(i for i in range(1, 12) if free[i] not in free[:i])  # its first occurrence: decode step `step`
    stopped = model.decoder.generate([PROMPTS[0]], 12, stop_token=free[step])
    assert stopped.tokens == [free[:step]]
    assert stopped.decode_steps == step


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_stopped_row_outputs_nothing_after_its_stop_token(model, chunk):
    """In a batch the loop goes on for the rows still running; a stopped row only pads its output."""
    free = model.generate(PROMPTS, 12, stop_token=None)
    stop = next(t for t in free[0][1:] if any(t not in row for row in free[1:]))  # chosen in the loop
    out = np.concatenate(list(model.decoder.stream(PROMPTS, 12, stop_token=stop, chunk=chunk)), axis=1)
    assert any(stop not in row for row in free)  # some row runs on
    for row, tokens in zip(out.tolist(), free):
        expected = until_stop(tokens, stop)
        assert row[:len(expected)] == expected
        assert all(t < 0 for t in row[len(expected):])  # the finished-row marker, never a token


def test_left_pad():
    """Prompts end at the last column; padding (and rows past the prompts) is token 0 at position -1."""
    tokens, positions = left_pad([[5, 6, 7], [8]], batch=3, length=4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[-1, 0, 1, 2], [-1, -1, -1, 0], [-1, -1, -1, -1]])
    assert tokens.dtype == positions.dtype == np.int32


def test_the_decoder_checks_its_stop_token(model):
    with pytest.raises(GenerationError, match=r"stop token 64 is outside the vocabulary \[0, 64\)"):
        model.decoder.generate([[1, 2]], 4, stop_token=64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_cache_is_kept_in_the_model_dtype(dtype):
    """Half the bytes of fp32 per cached token: the cache is made in the model dtype, not the default float."""
    half = peaked_model(vocab_size=64, seed=2, dtype=dtype)
    half.decoder._prefill = spy = Recorder(half.decoder._prefill)
    half.decoder.generate([PROMPTS[0]], 4, stop_token=None)
    cache = spy.states[-1].cache
    assert {a.dtype for a in cache.k + cache.v} == {jnp.dtype(dtype)}


def test_one_new_token_is_the_prefill_alone(model):
    one = model.decoder.generate(PROMPTS, 1, stop_token=None)
    assert one.tokens == [tokens[:1] for tokens in model.generate(PROMPTS, 4, stop_token=None)]
    assert one.decode_steps == 0


def test_every_step_is_counted_across_chunks(model):
    timing = Generation()
    chunks = list(model.decoder.stream(PROMPTS, 12, stop_token=None, chunk=4, timing=timing))
    assert [c.shape[1] for c in chunks] == [1, 4, 4, 3]
    assert timing.decode_steps == 11


def test_padding_rows_and_rows_stopped_by_the_prefill_need_no_steps(model):
    """Three prompts pad the batch to four rows; when every prompt's first token is its stop token, nothing
    is left to decode."""
    prompts = [PROMPTS[0]] * 3
    first = model.generate(prompts[:1], 1, stop_token=None)[0][0]
    stopped = model.decoder.generate(prompts, 8, stop_token=first)
    assert stopped.tokens == [[], [], []] and stopped.decode_steps == 0


def test_each_sampled_token_is_drawn_with_its_own_step_and_the_prompts_salt(model):
    """Token k is what `select_token` draws from the full forward's logits at step k with the row's salt: the
    documented key schedule, and no step's key reused or skipped."""
    prompt, sampling = PROMPTS[0], Sampling.create(temperature=1.0, seed=3)
    tokens = model.decoder.generate([prompt], 8, sampling, stop_token=None).tokens[0]
    salt = jnp.array([row_salt(prompt)], jnp.uint32)
    for k in range(8):
        logits = jnp.asarray(model.logits([prompt + tokens[:k]])[:, -1])
        assert int(select_token(logits, sampling, jnp.int32(k), salt)[0]) == tokens[k], k

"""The Python API as a hostile caller uses it: every argument of `generate`, `stream`, `logits` and `load` given
arbitrary values (hypothesis), and the hangs and misreadings once found. The result is an answer or a TypeError
or ValueError that names the argument; never another exception, never a hang, never a value silently misread."""

import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import neox_jax
from neox_jax.demo import demo_model

ANY = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5)
       | st.lists(st.integers(-3, 400) | st.text(max_size=3) | st.floats(), max_size=3)
       | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2) | st.binary(max_size=3))
SMALL_INTS = st.integers(-3, 12)
# Values near the edges of each argument's range, and anything else.
ARGUMENTS = {"max_new_tokens": SMALL_INTS | ANY, "temperature": st.floats(-1, 3) | ANY, "top_k": SMALL_INTS | ANY,
             "top_p": st.floats(-0.5, 1.5) | ANY, "seed": st.integers(-1, 2**64) | ANY,
             "stop_token": st.integers(-2, 400) | ANY, "stop": st.lists(st.text(max_size=3), max_size=5) | ANY,
             "chunk": SMALL_INTS | ANY}


@pytest.fixture(scope="module")
def model():
    return demo_model()


class Hang(Exception):
    pass


def within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs), or Hang after `seconds` (the first compilations of a shape take a few)."""
    def alarm(*_):
        raise Hang(f"no answer in {seconds} s: {kwargs}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(kwargs=st.fixed_dictionaries({}, optional=ARGUMENTS), streamed=st.booleans(),
       prompts=st.sampled_from(["The quick", ["JAX", "GPT-NeoX-20B is"], [[1, 2, 3]]]))
def test_any_arguments_give_an_answer_or_a_type_or_value_error(model, kwargs, streamed, prompts):
    if streamed:
        run = lambda: list(model.stream(prompts, **{"max_new_tokens": 3, **kwargs}))  # noqa: E731
    else:
        kwargs.pop("chunk", None)
        run = lambda: model.generate(prompts, **{"max_new_tokens": 3, **kwargs})  # noqa: E731
    try:
        out = within(60, run)
    except (TypeError, ValueError) as e:
        assert str(e)
        return
    if not streamed:
        assert isinstance(out, (str, list))


@pytest.mark.parametrize("chunk", [-1, 0, True, 1.5, "8"])
def test_a_chunk_that_is_not_a_positive_integer_is_refused_not_a_hang(model, chunk):
    with pytest.raises(ValueError, match=rf"chunk must be a positive integer .* got {chunk!r}"):
        within(60, lambda: list(model.stream(["Hello"], 2, chunk=chunk)))


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.generate("Hi", 2, stop={"zz": 1}), TypeError, "stop must be a string or a list of strings"),
    (lambda m: m.generate("Hi", 2, stop=[1]), TypeError, "stop must be a string or a list of strings, got [1]"),
    (lambda m: m.generate("Hi", 2, stop=b"x"), TypeError, "stop must be a string or a list of strings"),
    (lambda m: list(m.stream("Hi", 2, stop=3)), TypeError, "stop must be a string or a list of strings, got 3"),
    (lambda m: m.generate("Hi", 2, stop_token=True), ValueError, "stop token must be a token id (an integer) or "
                                                                   "None, got True"),
    (lambda m: m.generate("Hi", 2, stop_token=1.0), ValueError, "stop token must be a token id"),
    (lambda m: m.logits([[1.7, 2.2]]), TypeError, "token ids must be integers, not float64"),
    (lambda m: m.logits([[True, False]]), TypeError, "token ids must be integers, not bool"),
    (lambda m: m.logits([[2**40]]), ValueError, "token ids must be in [0, "),
    (lambda m: m.logits([[1, 2**70]]), ValueError, "token ids must be in [0, "),
    (lambda m: m.logits([1, 2]), ValueError, "tokens must be [batch, length]"),
    (lambda m: m.hidden_states([[1.5]]), TypeError, "token ids must be integers"),
])
def test_misread_arguments_are_refused(model, call, error, message):
    with pytest.raises(error) as info:
        call(model)
    assert message in str(info.value)


def test_logits_of_integer_arrays_still_work(model):
    ids = [[1, 2, 3]]
    np.testing.assert_array_equal(model.logits(np.array(ids, np.int64)), model.logits(ids))


def test_load_refuses_a_mesh_that_is_not_a_mesh(tmp_path):
    from neox_jax.checkpoints.synthetic import random_tensors, write_hf_checkpoint
    from neox_jax.config import PRESETS

    path = write_hf_checkpoint(tmp_path / "hf", PRESETS["tiny"], random_tensors(PRESETS["tiny"], seed=0))
    with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh .*got str 'model=2'"):
        neox_jax.load(path, mesh="model=2", progress=False)

"""Prefix caching in the serving engine (neox_jax/serve/prefix_cache.py, engine.py): blocks are named by their tokens
and everything before them, evicted least recently used within the budget, and a request that copies its prefix
from the cache gives exactly the tokens and log-probabilities it gives prefilled afresh."""

import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.api import NeoXModel
from neox_jax.checkpoints.synthetic import random_tensors
from neox_jax.decode import PREFILL_CHUNK
from neox_jax.sampling import Sampling
from neox_jax.serve.engine import Engine
from neox_jax.serve.prefix_cache import PrefixCache, block_digests
from neox_jax.weights import build_params

from conftest import tiny_config
from test_serve_engine import request, run

CONTEXT = 3 * PREFILL_CHUNK + 64


def test_a_block_digest_names_its_tokens_and_everything_before_them():
    a = list(range(10))
    assert len(block_digests(a, 4)) == 2  # full blocks only
    assert block_digests(a, 4)[:1] == block_digests(a[:4], 4)
    changed_first = [99] + a[1:]
    assert block_digests(changed_first, 4)[1] != block_digests(a, 4)[1]  # same second block, other prefix
    assert block_digests(a[:8], 4) == block_digests(a[:9], 4)


def test_pool_evicts_the_least_recently_used_within_its_budget():
    pool = PrefixCache(budget_bytes=250, block_bytes=100)
    assert pool.capacity == 2
    pool.put(b"a", 1)
    pool.put(b"b", 2)
    assert pool.get(b"a") == 1  # a is now the most recently used
    pool.put(b"c", 3)
    assert b"b" not in pool and pool.get(b"a") == 1 and pool.get(b"c") == 3
    assert pool.get(b"b") is None
    assert (pool.hits, pool.misses, pool.evictions, pool.bytes_held) == (3, 1, 1, 200)
    empty = PrefixCache(budget_bytes=50, block_bytes=100)
    empty.put(b"a", 1)
    assert len(empty) == 0


@pytest.fixture(scope="module")
def model():
    config = tiny_config(max_position_embeddings=CONTEXT)
    tensors = {k: v * (4.0 if "layernorm" not in k and "layer_norm" not in k else 1.0)
               for k, v in random_tensors(config, seed=5).items()}
    return NeoXModel(config, build_params(config, tensors.items(), jnp.float32, progress=False), "float32")


def _engine(model, blocks: int):
    itemsize = 4
    block_bytes = 2 * model.config.num_layers * model.config.hidden_size * PREFILL_CHUNK * itemsize
    engine = Engine(model, max_batch=2, context=CONTEXT, max_queue=16, prefix_cache_bytes=blocks * block_bytes)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def cold(model):
    engine = _engine(model, 0)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def cached(model):
    engine = _engine(model, 8)
    yield engine
    engine.stop()


def _prompts(seed: int):
    """A shared 2-block system prompt, then tails of several lengths (one ends exactly on a block)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 384, 2 * PREFILL_CHUNK).tolist()
    tails = [rng.integers(0, 384, n).tolist() for n in (1, 37, PREFILL_CHUNK, 50)]
    return [shared + t for t in tails]


SETTINGS = [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "sampled"])
def test_cached_prefixes_give_exactly_the_tokens_and_logprobs_of_a_fresh_prefill(cold, cached, settings):
    prompts = _prompts(1)

    def make(p):
        return request(p, 8, sampling=Sampling.create(**settings), logprobs=3)

    fresh = [run(cold, [make(p)])[0] for p in prompts]
    hits = cached.prefix_cache.hits
    one_by_one = [run(cached, [make(p)])[0] for p in prompts]  # the first fills the cache, the rest hit it
    together = run(cached, [make(p) for p in prompts])  # concurrent requests sharing the prefix
    assert cached.prefix_cache.hits - hits >= 2 * (2 * len(prompts) - 1)
    for want, got, also in zip(fresh, one_by_one, together):
        assert want.tokens == got.tokens == also.tokens
        assert [x.logprob for x in want.logprobs] == [x.logprob for x in got.logprobs] == \
            [x.logprob for x in also.logprobs]  # bit for bit
        assert [x.top for x in want.logprobs] == [x.top for x in got.logprobs]
    assert cold.prefix_cache is None


def test_a_small_budget_evicts_and_stays_exact(model, cold):
    engine = _engine(model, 1)
    try:
        prompts = _prompts(2) + _prompts(3)
        compiles = engine.compiles
        got = [run(engine, [request(p, 4)])[0].tokens for p in prompts]
        assert engine.prefix_cache.evictions > 0 and len(engine.prefix_cache) == 1
        assert engine.compiles == compiles  # copying blocks in and out compiled before the first request
    finally:
        engine.stop()
    assert got == [run(cold, [request(p, 4)])[0].tokens for p in prompts]


def test_prompt_logprobs_are_always_computed(cached):
    """Echo with log-probabilities needs every prompt position's logits: such a request never copies blocks."""
    prompt = _prompts(4)[1]
    first = run(cached, [request(prompt, 1, prompt_logprobs=True, logprobs=1)])[0]
    hits = cached.prefix_cache.hits
    again = run(cached, [request(prompt, 1, prompt_logprobs=True, logprobs=1)])[0]
    assert cached.prefix_cache.hits == hits
    assert [s and s.logprob for s in first.prompt] == [s and s.logprob for s in again.prompt]

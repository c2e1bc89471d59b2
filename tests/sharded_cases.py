"""Sharded runs on 8 virtual CPU devices. Run by test_sharding.py in a subprocess, since the device count
must be set before JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/sharded_cases.py
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neox_jax
from neox_jax.api import NeoXModel
from neox_jax.checkpoints import expected_shapes
from neox_jax.checkpoints.synthetic import random_tensors, write_deepspeed_checkpoint
from jax.sharding import NamedSharding

from neox_jax.sharding import CACHE_SPEC, ShardingError, make_mesh, plan_memory
from neox_jax.weights import build_params

from conftest import tiny_config
from test_split_layout import hf_name, jax_split_axis, layout, weight_bytes_per_device

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")

CONFIG = tiny_config(num_heads=8, vocab_size=128)
TENSORS = random_tensors(CONFIG, seed=4)
TOKENS = np.random.default_rng(0).integers(0, 128, (4, 11))
PROMPTS = [TOKENS[0].tolist(), TOKENS[1, :3].tolist(), TOKENS[2, :7].tolist()]
SHAPES = expected_shapes(CONFIG)


def layout_axis(path, shape):
    """The axis of a params leaf that GPT-NeoX's layout splits over the model axis (None: replicated)."""
    name = hf_name(path)
    return jax_split_axis(shape, SHAPES[name], layout(name))


def model_rank(mesh, device) -> int:
    """The device's coordinate on the mesh's model axis."""
    (data, model), = zip(*np.nonzero(mesh.devices == device))
    return int(model)


@pytest.fixture(scope="module")
def single():
    model = NeoXModel(CONFIG, build_params(CONFIG, TENSORS.items(), jnp.float32, progress=False))
    return model.logits(TOKENS), model.generate(PROMPTS, 10, stop_token=None)


@pytest.mark.parametrize("model_size, data_size", [(2, 1), (4, 1), (8, 1), (2, 2), (2, 4)])
def test_sharded_equals_single_device(single, model_size, data_size):
    mesh = make_mesh(model_size, data_size)
    params = build_params(CONFIG, TENSORS.items(), jnp.float32, mesh, progress=False)
    model = NeoXModel(CONFIG, params, mesh=mesh)
    logits, tokens = single
    np.testing.assert_allclose(model.logits(TOKENS), logits, atol=1e-5 * np.abs(logits).max(), rtol=0)
    assert model.generate(PROMPTS, 10, stop_token=None) == tokens

    # Really sharded, as GPT-NeoX's layout says (test_split_layout.py's table, not the code's specs): each
    # device holds its own block of the split axis, of the split size, with the checkpoint's values there.
    host = {name: np.asarray(value) for name, value in TENSORS.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in path)
        axis = layout_axis(path, leaf.shape)
        expected = tuple(n // model_size if i == axis else n for i, n in enumerate(leaf.shape))
        assert {s.data.shape for s in leaf.addressable_shards} == {expected}, path
        full = host[hf_name(path)].reshape(leaf.shape)
        for shard in leaf.addressable_shards:
            rank = model_rank(mesh, shard.device)
            block = tuple(slice(rank * expected[i], (rank + 1) * expected[i]) if i == axis else slice(None)
                          for i in range(leaf.ndim))
            np.testing.assert_array_equal(np.asarray(shard.data), full[block], err_msg=str((path, rank)))
    cache = model.decoder.new_cache(4, 16)
    assert {s.data.shape for x in cache.k + cache.v for s in x.addressable_shards} == {
        (4 // data_size, CONFIG.num_heads // model_size, 16, CONFIG.head_dim)}


def test_decode_state_stays_sharded():
    mesh = make_mesh(4, 2)
    model = NeoXModel(CONFIG, build_params(CONFIG, TENSORS.items(), jnp.float32, mesh, progress=False), mesh=mesh)
    seen = []

    class Spy:  # records the cache sharding going into and out of each decode chunk
        def __init__(self, compiled):
            self.compiled = compiled

        def __getattr__(self, name):
            return getattr(self.compiled, name)

        def __call__(self, params, state, *rest):
            seen.extend(x.sharding for x in state.cache.k + state.cache.v)
            out = self.compiled(params, state, *rest)
            seen.extend(x.sharding for x in out[2].cache.k + out[2].cache.v)
            return out

    model.decoder._decode = Spy(model.decoder._decode)
    list(model.decoder.stream(PROMPTS, 12, chunk=4, stop_token=None))
    planned = NamedSharding(mesh, CACHE_SPEC)
    chunks = 3  # 11 steps in chunks of 4
    assert len(seen) == 2 * chunks * 2 * CONFIG.num_layers and all(s.is_equivalent_to(planned, 4) for s in seen)


def test_memory_plan_matches_allocated_bytes():
    """Per-device bytes: allocated, planned, and computed here from the config and GPT-NeoX's layout agree
    exactly (weights replicated on every device would be 8x the split ones at model=8)."""
    for model_size, data_size in [(1, 1), (2, 1), (8, 1), (2, 4)]:
        mesh = make_mesh(model_size, data_size)
        params = build_params(CONFIG, TENSORS.items(), jnp.float32, mesh, progress=False)
        allocated = {device: sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
                                 if s.device == device) for device in mesh.devices.flat}
        cache = NeoXModel(CONFIG, params, mesh=mesh).decoder.new_cache(8, 32)
        cache_bytes = {device: sum(s.data.nbytes for x in cache.k + cache.v for s in x.addressable_shards
                                   if s.device == device) for device in mesh.devices.flat}
        expected_weights = weight_bytes_per_device(CONFIG, model_size, 4)
        expected_cache = 2 * CONFIG.num_layers * (8 // data_size) * (CONFIG.num_heads // model_size) * 32 * \
            CONFIG.head_dim * 4
        assert set(allocated.values()) == {expected_weights}, (model_size, data_size)
        assert set(cache_bytes.values()) == {expected_cache}, (model_size, data_size)
        plan = plan_memory(CONFIG, jnp.float32, mesh, batch=8, context=32)
        assert (plan.weights_per_device, plan.cache_per_device) == (expected_weights, expected_cache)
    whole = weight_bytes_per_device(CONFIG, 1, 4)
    assert weight_bytes_per_device(CONFIG, 8, 4) < whole / 4  # most of the bytes really are split


def test_heads_not_divisible_by_the_mesh():
    with pytest.raises(ShardingError, match="num_heads 8 is not divisible by the mesh's model axis \\(3\\)"):
        build_params(CONFIG, TENSORS.items(), jnp.float32, make_mesh(3, 1), progress=False)


def test_deepspeed_shards_stream_onto_a_mesh(tmp_path, single):
    path = write_deepspeed_checkpoint(tmp_path / "ds", CONFIG, TENSORS, ranks=2, dtype=np.float32)
    model = neox_jax.load(path, "float32", mesh=make_mesh(4, 2), progress=False)
    np.testing.assert_allclose(model.logits(TOKENS), single[0], atol=1e-4 * np.abs(single[0]).max(), rtol=0)


def test_generate_cli_on_a_mesh(capsys):
    """`--mesh` splits the demo model: the same text as on one device; a model axis that does not divide the
    heads is one error line."""
    from neox_jax.demo import PROMPTS
    from neox_jax.generate import main

    assert main(["--demo", "--max-new-tokens", "6"]) == 0
    single = capsys.readouterr().out
    assert main(["--demo", "--max-new-tokens", "6", "--mesh", "model=4,data=2"]) == 0
    assert capsys.readouterr().out == single and single.count(PROMPTS[0]) == 1
    assert main(["--demo", "--mesh", "model=8"]) == 2  # the demo's 4 heads do not split 8 ways
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == ("error: num_heads 4 is not divisible by the mesh's model axis (8): "
                                             "choose a model size that divides it") and captured.out == ""



def test_compiled_programs_are_kept_per_input_sharding():
    """The same shapes placed differently need other programs: each is compiled once and gets its own inputs."""
    from jax.sharding import PartitionSpec

    from neox_jax.decode import Compiled

    double = Compiled(lambda x: 2 * x)
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    one = jax.device_put(x, jax.devices()[0])
    split = jax.device_put(x, NamedSharding(make_mesh(8, 1), PartitionSpec("model")))
    for array in (one, split, one, split):
        np.testing.assert_array_equal(np.asarray(double(array)), 2 * x)
    assert double.compiles == 2


def test_a_mesh_is_made_of_the_devices_given():
    devices = jax.devices()[4:8]
    mesh = make_mesh(2, 2, devices)
    assert mesh.devices.tolist() == [[devices[0], devices[1]], [devices[2], devices[3]]]
    assert mesh.shape == {"data": 2, "model": 2}


EXACT_CONFIG = tiny_config(num_heads=8)  # the demo tokenizer's vocabulary (384), for the command below


@pytest.fixture(scope="module")
def exact_models(tmp_path_factory):
    """rank count -> (checkpoint, the exact mode on one device: logits, greedy tokens)."""
    out = {}
    for ranks in (2, 4):
        path = write_deepspeed_checkpoint(tmp_path_factory.mktemp(f"tp{ranks}"), EXACT_CONFIG, ranks=ranks,
                                          dtype=np.float32, layernorm_jitter=0.05)
        one = neox_jax.load(path, "float32", mesh=make_mesh(1, 1), progress=False, tp_exact=True)
        out[ranks] = path, one.logits(TOKENS), one.generate(PROMPTS, 10, stop_token=None)
    return out


@pytest.mark.parametrize("ranks, model_size", [(2, 2), (4, 2)])
def test_exact_mode_on_a_mesh_equals_one_device(exact_models, ranks, model_size):
    """On model=M each device holds the copies of its R/M ranks (those whose heads it holds) and runs them."""
    path, logits, tokens = exact_models[ranks]
    mesh = make_mesh(model_size, 1)
    model = neox_jax.load(path, "float32", mesh=mesh, progress=False, tp_exact=True)
    np.testing.assert_allclose(model.logits(TOKENS), logits, atol=1e-5 * np.abs(logits).max(), rtol=0)
    assert model.generate(PROMPTS, 10, stop_token=None) == tokens
    # Each device runs its own ranks: the program moves partial sums (all-reduce), never weights or copies.
    tokens = model.decoder.place_rows(np.asarray(TOKENS, np.int32))
    positions = model.decoder.place_rows(np.broadcast_to(np.arange(TOKENS.shape[1], dtype=np.int32), TOKENS.shape))
    program = jax.jit(model._logits_fn).lower(model.params, tokens, positions).compile().as_text()
    collectives = re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
                             program)
    assert collectives and set(collectives) == {"all-reduce"}, sorted(set(collectives))
    per_device = ranks // model_size
    for leaf in (model.params["layers_1"]["post_attention_layernorm"]["bias"],
                 model.params["layers_0"]["attention"]["dense.bias"]):
        full = np.asarray(leaf)
        for shard in leaf.addressable_shards:
            m = model_rank(mesh, shard.device)
            np.testing.assert_array_equal(np.asarray(shard.data), full[m * per_device:(m + 1) * per_device])


def test_exact_mode_refuses_a_model_axis_that_does_not_divide_the_ranks(exact_models, capsys):
    from neox_jax.generate import main
    from neox_jax.tokenizer import demo_tokenizer

    path = exact_models[2][0]
    with pytest.raises(ShardingError, match=r"keeps the checkpoint's 2 ranks, which do not split over the mesh's "
                                            r"model axis \(4\): choose a model size that divides 2"):
        neox_jax.load(path, "float32", mesh=make_mesh(4, 1), progress=False, tp_exact=True)
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    assert main(["--model", str(path), "--tp-exact", "--mesh", "model=4", "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "error: the exact tensor-parallel mode keeps the checkpoint's 2 ranks, which do not split over the mesh's "
        "model axis (4): choose a model size that divides 2"] and captured.out == ""


@pytest.mark.parametrize("model_size, data_size", [(4, 1), (2, 4)])
def test_quantized_sharded_equals_quantized_single_device(model_size, data_size):
    """int8 on a mesh: the same logits and tokens as on one device; each scale split as its output channels are
    (the QKV's by heads, the head's by vocabulary, the row-parallel weights' replicated); the plan counts the
    bytes allocated per device."""
    from neox_jax.quantize import QuantizedWeight

    one = NeoXModel(CONFIG, build_params(CONFIG, TENSORS.items(), jnp.float32, progress=False, quantize="int8"),
                    quantize="int8")
    mesh = make_mesh(model_size, data_size)
    params = build_params(CONFIG, TENSORS.items(), jnp.float32, mesh, progress=False, quantize="int8")
    model = NeoXModel(CONFIG, params, mesh=mesh, quantize="int8")
    want = one.logits(TOKENS)
    np.testing.assert_allclose(model.logits(TOKENS), want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert model.generate(PROMPTS, 10, stop_token=None) == one.generate(PROMPTS, 10, stop_token=None)

    layer = params["layers_0"]
    qkv, dense = layer["attention"]["query_key_value.weight"], layer["attention"]["dense.weight"]
    assert isinstance(qkv, QuantizedWeight) and qkv.values.dtype == jnp.int8
    shard = lambda x: x.addressable_shards[0].data.shape  # noqa: E731
    assert shard(qkv.scale) == (CONFIG.num_heads // model_size, 3, CONFIG.head_dim)
    assert shard(qkv.values) == (CONFIG.num_heads // model_size, 3, CONFIG.head_dim, CONFIG.hidden_size)
    assert shard(dense.scale) == (CONFIG.hidden_size,)
    assert shard(params["embed_out"].scale) == (CONFIG.vocab_size // model_size,)
    allocated = {device: sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
                             if s.device == device) for device in mesh.devices.flat}
    plan = plan_memory(CONFIG, jnp.float32, mesh, quantize="int8")
    assert set(allocated.values()) == {plan.weights_per_device}


def test_the_serving_engine_on_a_mesh_equals_one_device(single):
    """The continuous-batching engine (neox_jax/serve/engine.py) split by heads and by slots gives the one-device
    decoder's tokens, its cache kept in its shards."""
    import threading

    from neox_jax.serve.engine import Engine, Request

    class Collect:
        def __init__(self):
            self.tokens, self.done = [], threading.Event()

        def prompt_logprobs(self, scores):
            pass

        def token(self, token, logprobs):
            self.tokens.append(token)
            return True

        def finish(self, reason, error=None):
            self.done.set()

    mesh = make_mesh(2, 2)
    model = NeoXModel(CONFIG, build_params(CONFIG, TENSORS.items(), jnp.float32, mesh, progress=False), mesh=mesh)
    engine = Engine(model, max_batch=2, context=32)
    engine.start()
    requests = [Request(p, 10, Collect()) for p in PROMPTS]  # more than the slots
    engine.submit(requests)
    assert all(r.sink.done.wait(60) for r in requests)
    engine.stop()
    assert [r.sink.tokens for r in requests] == single[1]
    assert {s.data.shape for x in engine._cache.k for s in x.addressable_shards} == {
        (1, CONFIG.num_heads // 2, engine.slots_per_row, CONFIG.head_dim)}

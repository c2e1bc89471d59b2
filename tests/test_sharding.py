"""Tensor parallelism: the 8-device cases run in a subprocess; mesh parsing and the memory plan here."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from neox_jax.config import PRESETS
from neox_jax.generate import main as generate_main
from neox_jax.sharding import MemoryPlan, ShardingError, make_mesh, parse_mesh, plan_memory, require_fit

from conftest import REPO


def test_sharded_cases_on_eight_virtual_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sharded_cases.py"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.parametrize("text, sizes", [("model=4", {"model": 4, "data": 1}),
                                         ("model=2,data=4", {"model": 2, "data": 4}), ("data=2", {"model": 1, "data": 2})])
def test_parse_mesh(text, sizes):
    assert parse_mesh(text) == sizes


@pytest.mark.parametrize("text", ["model=0", "tensor=2", "model=two", "model"])
def test_bad_mesh_text(text):
    with pytest.raises(ShardingError, match="expected model=N"):
        parse_mesh(text)


def test_mesh_larger_than_the_machine():
    with pytest.raises(ShardingError, match="needs 64 devices"):
        make_mesh(64, 1)


def test_20b_plan_and_what_would_fit():
    mesh = make_mesh(1, 1)
    config = PRESETS["gpt-neox-20b"]
    plan = plan_memory(config, jnp.float16, mesh, batch=8, context=2048)
    assert 40.5e9 < plan.weights_per_device < 41.5e9  # 20.6B parameters in fp16
    assert plan.cache_per_device == 2 * 44 * 8 * 2048 * 6144 * 2  # ~1.1 MB per token per sequence
    on_48gb = MemoryPlan(plan.weights_per_device, plan.cache_per_device, 48 * 2**30)
    with pytest.raises(ShardingError, match=r"at most 4 sequences of 2048 tokens would fit, or 8 sequences of 1205 tokens"):
        require_fit(on_48gb, config, mesh, 8, 2048)
    on_24gb = MemoryPlan(plan.weights_per_device, plan.cache_per_device, 24 * 2**30)
    with pytest.raises(ShardingError, match="the weights alone need about 2 devices"):
        require_fit(on_24gb, config, mesh, 8, 2048)
    require_fit(MemoryPlan(plan.weights_per_device, plan.cache_per_device, 141 * 2**30), config, mesh, 8, 2048)


def test_generate_cli_rejects_a_bad_mesh(capsys):
    import jax

    assert generate_main(["--demo", "--mesh", "model=3"]) == 2
    expected = ("error: a mesh of model=3 x data=1 needs 3 devices; 1 available" if jax.device_count() == 1 else
                "error: num_heads 4 is not divisible by the mesh's model axis (3)")  # the demo has 4 heads
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith(expected) and captured.out == ""


def test_two_processes_share_one_mesh(tmp_path):
    """Multi-host on one machine: two CPU processes (gloo collectives) split the model over model=2."""
    import json
    import socket

    from neox_jax.checkpoints.synthetic import write_hf_checkpoint
    from neox_jax.tokenizer import demo_tokenizer

    from conftest import tiny_config

    path = write_hf_checkpoint(tmp_path / "m", tiny_config(vocab_size=384))
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", str(path), "--prompt", "The quick brown fox", "--prompt", "JAX", "--max-new-tokens", "6",
            "--json", "--stop-token", "-1", "--dtype", "float32"]
    base = [sys.executable, "-m", "neox_jax.generate"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen(base + args + ["--mesh", "model=2", "--distributed", "--coordinator",
                                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outputs]
    single = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    completions = [json.loads(line)["completion_token_ids"] for line in single.stdout.splitlines()]
    assert [json.loads(line)["completion_token_ids"] for line in outputs[0][0].splitlines()] == completions
    assert outputs[1][0] == ""  # only process 0 prints


def _unreadable_checkpoint(config, path):
    """A checkpoint whose weights must not be read: its tensors() fails the test."""
    class Unreadable:
        def tensors(self):
            raise AssertionError("weights were read before the memory check")

    checkpoint = Unreadable()
    checkpoint.config, checkpoint.path = config, path
    return checkpoint


def test_on_cpu_the_plan_uses_the_hosts_available_memory(tmp_path):
    """XLA:CPU reports no memory limit: the plan takes the host's, so a model that cannot fit is one error
    before any weights are read, not a RESOURCE_EXHAUSTED traceback after minutes of loading."""
    from neox_jax.api import load_checkpoint
    from neox_jax.sharding import host_memory

    available = host_memory()
    assert available is not None and available > 2**28  # Linux: MemAvailable
    plan = plan_memory(PRESETS["pythia-70m"], jnp.float32, make_mesh(1, 1))
    assert plan.host and abs(plan.available_per_device - available) < 2**30  # another process may allocate meanwhile
    huge = PRESETS["gpt-neox-20b"].replace(hidden_size=32768, num_heads=256, intermediate_size=131072,
                                           num_layers=8)  # 105B parameters: 420 GB in fp32
    with pytest.raises(ShardingError, match=r"does not fit in host memory \(.*available [0-9.]+ GiB on the host\): the "
                                            r"weights alone need more than the host has available"):
        load_checkpoint(_unreadable_checkpoint(huge, tmp_path), dtype="float32", progress=False)


def test_generate_on_cpu_refuses_a_20b_checkpoint_that_cannot_fit_before_reading_it(tmp_path, capsys):
    """GPT-NeoX-20B's DeepSpeed layout (empty files: reading any of them would fail differently) with the
    20B preset, in fp32 (CPU's default dtype): 82 GB of weights."""
    from neox_jax.checkpoints.deepspeed import pipeline_layout, shard_file
    from neox_jax.sharding import host_memory
    from neox_jax.tokenizer import demo_tokenizer

    config = PRESETS["gpt-neox-20b"]
    if host_memory() > 82e9:
        pytest.skip("this host could hold 20B in fp32")
    for layer in pipeline_layout(config):
        (tmp_path / shard_file(layer.idx, 0)).touch()
    demo_tokenizer()._tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert generate_main(["--model", str(tmp_path), "--preset", "gpt-neox-20b", "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: does not fit in host memory (per device: weights 76."), err

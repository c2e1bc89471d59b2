"""The memory plan's sources (device, host, cgroup) and its verdicts, with the sizes written out by hand."""

import io

import pytest

from neox_jax import sharding
from neox_jax.sharding import MemoryPlan, ShardingError, device_memory, host_memory, make_mesh, require_fit

from conftest import tiny_config

GIB = 2 ** 30
MESH = make_mesh(1, 1)
CONFIG = tiny_config()


class Device:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_device_memory_is_the_backends_byte_limit():
    assert device_memory(Device({"bytes_limit": 123, "bytes_in_use": 7})) == 123
    assert device_memory(Device(None)) is None  # XLA:CPU
    assert device_memory(object()) is None  # a device without memory statistics


def test_the_plan_takes_the_devices_limit_where_the_backend_gives_one(monkeypatch):
    monkeypatch.setattr(sharding, "device_memory", lambda device: 5 * GIB)
    plan = sharding.plan_memory(CONFIG, "float32", MESH)
    assert (plan.available_per_device, plan.host) == (5 * GIB, False)
    assert type(plan.weights_per_device) is int and type(plan.cache_per_device) is int


def fake_files(monkeypatch, files: dict[str, str]):
    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(sharding, "open", fake_open, raising=False)


MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n"


@pytest.mark.parametrize("cgroup, expected", [
    (None, 8 * GIB),  # no cgroup v2 files: MemAvailable
    (("max", str(GIB)), 8 * GIB),  # no limit
    ((str(4 * GIB), str(GIB)), 3 * GIB),  # a container's limit leaves less than the host has
    ((str(64 * GIB), str(GIB)), 8 * GIB),  # a limit above what the host has left
])
def test_host_memory_is_memavailable_lowered_to_the_cgroup_limit(monkeypatch, cgroup, expected):
    files = {"/proc/meminfo": MEMINFO}
    if cgroup:
        files["/sys/fs/cgroup/memory.max"], files["/sys/fs/cgroup/memory.current"] = cgroup
    fake_files(monkeypatch, files)
    assert host_memory() == expected


def test_host_memory_unknown_without_meminfo(monkeypatch):
    fake_files(monkeypatch, {})
    assert host_memory() is None


def refusal(plan: MemoryPlan, batch: int = 8, context: int = 10) -> str:
    with pytest.raises(ShardingError) as info:
        require_fit(plan, CONFIG, MESH, batch, context)
    return str(info.value)


def test_a_plan_that_fits_exactly_passes():
    require_fit(MemoryPlan(100, 50, 150), CONFIG, MESH, 8, 10)
    require_fit(MemoryPlan(100, 50, None), CONFIG, MESH, 8, 10)  # nothing known: nothing refused


def test_weights_beyond_a_device_name_the_devices_they_need():
    message = refusal(MemoryPlan(300, 80, 100))
    assert message.startswith("does not fit in device memory (per device: weights 0.00 GiB")
    assert message.endswith("the weights alone need about 3 devices on the model axis (have 1); or int8 weights "
                            "(--quantize int8: a quarter of fp32's bytes, half of fp16's)")
    quantized = refusal(MemoryPlan(300, 80, 100, quantize="int8"))  # already quantized: not offered again
    assert quantized.endswith("the weights alone need about 3 devices on the model axis (have 1)")


@pytest.mark.parametrize("available", [100, 99])  # no byte left for the cache, or not even the weights
def test_weights_beyond_the_host_say_what_would_help(available):
    message = refusal(MemoryPlan(100, 80, available, host=True))
    assert message.startswith("does not fit in host memory (per device:")
    assert "GiB on the host)" in message
    assert message.endswith("the weights alone need more than the host has available: use a GPU, a smaller "
                            "dtype (float16 halves float32) or a host with more memory; or int8 weights "
                            "(--quantize int8: a quarter of fp32's bytes, half of fp16's)")


def test_a_cache_too_large_names_the_sequences_and_tokens_that_would_fit():
    # 50 bytes free after the weights; each of the 8 sequences of 10 tokens needs 10 bytes (1 a token).
    message = refusal(MemoryPlan(100, 80, 150))
    assert message.endswith("at most 5 sequences of 10 tokens would fit, or 8 sequences of 6 tokens, "
                            "or use more devices")


def test_the_plan_describes_itself_in_gib():
    assert MemoryPlan(3 * GIB, GIB, 8 * GIB, host=True).describe() == (
        "per device: weights 3.00 GiB + KV cache 1.00 GiB = 4.00 GiB; available 8.00 GiB on the host")
    assert MemoryPlan(GIB // 2, 0, None).describe().endswith("= 0.50 GiB; available unknown GiB")


def test_a_prefix_cache_too_large_names_the_budget_that_would_fit():
    # 50 bytes free after the weights, 30 of them for the KV cache: a prefix cache of 20 bytes at most.
    plan = MemoryPlan(100, 30, 150).with_prefix_cache(40, MESH)
    assert plan.needed_per_device == 170
    message = refusal(plan)
    assert "+ KV cache 0.00 GiB + prefix cache 0.00 GiB = 0.00 GiB" in message
    assert message.endswith(f"--prefix-cache-gib {20 / GIB:.2f} or less would fit")
    require_fit(MemoryPlan(100, 30, 150).with_prefix_cache(20, MESH), CONFIG, MESH, 8, 10)


def test_a_cache_too_large_beside_a_prefix_cache_counts_the_prefix_cache():
    # 50 bytes free after the weights, 20 of them for the prefix cache: 3 sequences of 10 tokens, not 5.
    message = refusal(MemoryPlan(100, 80, 150).with_prefix_cache(20, MESH))
    assert message.endswith("at most 3 sequences of 10 tokens would fit, or 8 sequences of 3 tokens, or use more "
                            "devices; or a smaller --prefix-cache-gib")

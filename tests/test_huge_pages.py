"""neox_jax.huge_pages: placed weights' host memory moved into 2 MiB pages, contents unchanged; a no-op where it
cannot apply."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import huge_pages
from neox_jax.checkpoints.synthetic import random_tensors
from neox_jax.weights import build_params

from conftest import tiny_config

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib(address: int, nbytes: int) -> int:
    """AnonHugePages of this process's mappings that overlap [address, address + nbytes), in KiB."""
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: "start-end perms ..."
            start, end = (int(v, 16) for v in fields[0].split("-"))
            overlaps = start < address + nbytes and end > address
        elif overlaps and fields[0] == "AnonHugePages:":
            total += int(fields[1])
    return total


def thp_allowed() -> bool:
    return THP.is_file() and "[never]" not in THP.read_text()


@pytest.mark.parametrize("address, nbytes, want", [
    (0, 1, (0, 2 << 20)), (2 << 20, 2 << 20, (2 << 20, 2 << 20)), ((2 << 20) - 1, 2, (0, 4 << 20)),
    (5 << 20, 1, (4 << 20, 2 << 20)), ((4 << 20) + 7, 3 << 20, (4 << 20, 4 << 20))])
def test_the_span_is_the_whole_pages_around_the_range(address, nbytes, want):
    assert huge_pages.page_span(address, nbytes) == want


@pytest.mark.skipif(not thp_allowed(), reason="needs Linux with transparent huge pages not 'never'")
def test_an_array_is_moved_into_huge_pages_with_its_values_kept():
    values = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB
    array = jnp.asarray(values)
    address = array.unsafe_buffer_pointer()
    huge_pages.back_with_huge_pages(array)
    assert array.unsafe_buffer_pointer() == address  # advised where it lies, not copied
    np.testing.assert_array_equal(np.asarray(array), values)
    # Every whole page inside the array (the partial ones at its ends may not be collapsible).
    inner = huge_pages.page_span(address + (2 << 20) - 1, 0)[0]
    assert huge_kib(address, array.nbytes) >= (address + array.nbytes - inner) // (2 << 20) * 2048


def test_small_empty_and_odd_arrays_are_left_as_they_are():
    for array in (jnp.zeros((0, 3)), jnp.arange(5), jnp.ones((3,), jnp.int8)):
        before = np.asarray(array).copy()
        huge_pages.back_with_huge_pages(array)
        np.testing.assert_array_equal(np.asarray(array), before)


def test_off_linux_nothing_is_advised(monkeypatch):
    huge_pages._madvise.cache_clear()
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    try:
        assert huge_pages._madvise() is None
        huge_pages.back_with_huge_pages(jnp.ones((1 << 20,)))  # no error
    finally:
        huge_pages._madvise.cache_clear()


def test_every_built_param_is_advised(monkeypatch):
    config = tiny_config()
    tensors = random_tensors(config, seed=0)
    advised = []
    monkeypatch.setattr("neox_jax.weights.back_with_huge_pages", advised.append)
    params = build_params(config, tensors.items(), jnp.float32, progress=False)
    assert {id(a) for a in advised} == {id(a) for a in jax.tree.leaves(params)}

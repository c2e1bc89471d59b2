"""The benchmark commands run end to end on the tiny shape (smoke tests: the numbers are not checked)."""

import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from bench.common import SHAPES, decode_weight_bytes, kv_bytes, param_count, prefill_flops, table
from neox_jax.checkpoints import expected_shapes
from neox_jax.config import PRESETS
from neox_jax.weights import abstract_params

from conftest import REPO


def run(*argv, timeout=150):
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows(out: str, engine: str) -> list[str]:
    """Table rows of `engine`: its name, then a column of numbers or a device name."""
    return re.findall(rf"^{re.escape(engine)}  +\S.*$", out, re.M)


def test_cpu_bench_prints_a_table_for_each_case():
    out = run("bench.cpu", "--shapes", "tiny", "--batch", "1,2", "--new-tokens", "4", "--prompt-len", "8",
              "--reps", "1", "--bandwidth-mib", "16")
    assert out.count("== tiny  batch") == 2
    for engine in ("neox-jax", "parity", "transformers"):
        assert len(rows(out, engine)) == 2, out
    assert "prefill tok/s" in out and "ms/step" in out and "peak MB" in out
    assert "1/1 rows" in out and "2/2 rows" in out  # the same greedy tokens from all three
    assert "of host memory bandwidth" in out and "GB/s" in out


def test_gpu_bench_runs_scaled_down_on_cpu():
    out = run("bench.gpu", "--tiny", "--batch", "1,2", "--reps", "1")
    assert "device and prefill" in out and "TFLOP/s" in out
    for engine in ("neox-jax", "parity"):
        assert len(rows(out, engine)) == 3, out  # one prefill row, two decode rows
    assert "failed" not in out and "error" not in out.lower()


def test_counts_match_the_model():
    for config in (SHAPES["tiny"], SHAPES["pythia-70m"], PRESETS["gpt-neox-20b"]):
        shapes = expected_shapes(config)
        assert param_count(config) == sum(int(np.prod(s)) for s in shapes.values())
        leaves = abstract_params(config, jnp.float16)
        assert param_count(config) == sum(int(np.prod(x.shape)) for x in jax_leaves(leaves))
        embed = config.vocab_size * config.hidden_size
        assert decode_weight_bytes(config, 1, 2) == 2 * (param_count(config) - embed + config.hidden_size)
    c = PRESETS["gpt-neox-20b"]
    assert kv_bytes(c, 32, 2048, 2) == 2 * 44 * 32 * 2048 * 6144 * 2  # ~71 GB
    # 2 N T FLOPs per matmul parameter, plus attention: the familiar ~2 x 20B x tokens.
    assert 0.9 < prefill_flops(c, 1, 2048) / (2 * 20e9 * 2048) < 1.2


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_table_aligns_columns():
    text = table(["name", "x"], [["a", 1.5], ["long name", 1234567.0]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[3].endswith("1,234,567")


def test_compile_bench_compiles_from_abstract_shapes():
    out = run("bench.compile", "--preset", "pythia-70m", "--dtype", "float32", "--batch", "2", "--slots", "64")
    assert "pythia-70m (6 layers), float32, batch 2, 64 slots" in out
    assert "prefill" in out and "decode loop" in out and "total" in out

"""Shared pieces of the benchmarks: shapes, the child-process harness, byte and FLOP counts, peak host
memory, tables and the Markdown pages the docs quote."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from neox_jax.config import PRESETS, NeoXConfig

# pythia-410m: the shape where reading the weights dominates a decode step (bench.cpu's bandwidth figures).
SHAPES: dict[str, NeoXConfig] = {name: PRESETS[name] for name in ("tiny", "pythia-70m", "pythia-410m")}


def parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---- one engine per child process ----

class WorkerError(RuntimeError):
    def __init__(self, engine: str, returncode: int, output: str | None):
        self.engine, self.returncode = engine, returncode
        tail = f":\n{output[-4000:]}" if output else " (its log is above)"
        super().__init__(f"{engine} worker exited with {returncode}{tail}")


def run_worker(module: str, engine: str, argv: Sequence[str], env: dict | None = None, capture: bool = False,
               out: str | None = None):
    """`python -m MODULE ARGV --worker ENGINE --worker-out FILE` in a child process -> the JSON it wrote.

    Each engine runs alone in its process: none shares thread pools (XLA's, OpenMP's), allocator state,
    device memory or peak-memory accounting with another, and each starts from a clean heap. `capture`
    keeps the child's output for the error (else it goes straight to the terminal). `out`: the FILE (else
    a temporary one), for a worker that writes what it has measured so far as it goes. Raises WorkerError."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or os.path.join(tmp, "result.json")
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.run([sys.executable, "-m", module, *argv, "--worker", engine, "--worker-out", out],
                              env=env, stdout=pipe, stderr=subprocess.STDOUT if capture else None, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise WorkerError(engine, proc.returncode, proc.stdout)
        with open(out) as f:
            return json.load(f)


# ---- byte and FLOP counts ----

def layer_params(config: NeoXConfig) -> int:
    """Parameters of one transformer layer (weights, biases, LayerNorms)."""
    d, f = config.hidden_size, config.intermediate_size
    return (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d) + 4 * d


def param_count(config: NeoXConfig) -> int:
    embed = config.vocab_size * config.hidden_size
    return embed * (1 if config.tie_word_embeddings else 2) + config.num_layers * layer_params(config) \
        + 2 * config.hidden_size


def decode_weight_bytes(config: NeoXConfig, batch: int, itemsize: int, quantize: str | None = None) -> int:
    """Bytes of parameters one decode step must read: every layer, the final norm and the full output head,
    but only `batch` rows of the input embedding (a gather). KV-cache reads are not included. With
    `quantize`, the matmul weights count as stored: values plus their per-channel scales."""
    d = config.hidden_size
    head = config.vocab_size * d
    embed_rows = 0 if config.tie_word_embeddings else min(batch, config.vocab_size) * d
    total = itemsize * (config.num_layers * layer_params(config) + 2 * d + head + embed_rows)
    if quantize:
        from neox_jax.params import model_params
        from neox_jax.quantize import abstract_leaves, lookup, quantizes

        for spec in filter(quantizes, model_params(config)):
            stored = abstract_leaves(spec, config, np.float32, lookup(quantize))
            total += sum(math.prod(leaf.shape) * leaf.dtype.itemsize for _, leaf in stored)
            total -= itemsize * math.prod(spec.shape(config))
    return total


def kv_bytes(config: NeoXConfig, batch: int, slots: int, itemsize: int) -> int:
    """Bytes of a KV cache of `slots` positions (keys and values, every layer)."""
    return itemsize * 2 * config.num_layers * batch * slots * config.hidden_size


def prefill_flops(config: NeoXConfig, batch: int, tokens: int) -> float:
    """Model FLOPs of a prefill: 2 per multiply-add of every layer matmul on every token, causal attention
    (QK^T and PV over the T(T+1)/2 visible pairs), and the output head on the last token only (what a
    generator needs; neox-jax computes only that one)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    matmul = 2 * batch * tokens * layers * (4 * d * d + 2 * d * f)
    attention = 2 * 2 * batch * layers * d * tokens * (tokens + 1) / 2
    head = 2 * batch * config.vocab_size * d
    return matmul + attention + head


def matmul_weight_sizes(config: NeoXConfig) -> set[int]:
    """Element counts of the weights quantization stores as int8 / fp8 (every `Kind.MATMUL` declaration)."""
    from neox_jax.params import model_params
    from neox_jax.quantize import quantizes

    return {math.prod(spec.shape(config)) for spec in filter(quantizes, model_params(config))}


def weight_sized_float_buffers(hlo: str, sizes: set[int]) -> list[str]:
    """Instructions of an optimised HLO module that write a float array of as many elements as a matmul weight
    (`sizes`), other than views (parameters, tuple elements, bitcasts) and in-place updates
    (dynamic-update-slice): in a quantized decode program, a converted copy of a weight (its matmuls should
    read the stored values). Matching the exact counts leaves out the KV cache's conversions."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"%(\S+) = (f16|bf16|f32|f64)\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not match or math.prod(int(n) for n in match.group(3).split(",") if n) not in sizes:
            continue
        name, opcode = match.group(1), match.group(4)
        in_place_update = "dynamic-update-slice" in (opcode + name).replace("_", "-")
        if opcode not in ("parameter", "get-tuple-element", "bitcast", "tuple") and not in_place_update:
            found.append(line.strip())
    return found


# ---- host memory ----

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import resource  # not Linux: best effort (ru_maxrss is the process peak)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next engine starts from a clean RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size inside a `with` block, in MiB.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry by writing 5 to /proc/self/clear_refs,
    so the peak is exact; elsewhere (or if that is not permitted) a thread samples VmRSS every millisecond.
    """

    def __enter__(self):
        self._exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = _status_kb("VmHWM") is not None
        except OSError:
            pass
        self.start_mb = rss_mb()
        self._peak = self.start_mb
        self._stop = threading.Event()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss_mb())

    def __exit__(self, *exc):
        if self._exact:
            self.peak_mb = _status_kb("VmHWM") / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, rss_mb())
        return False


# ---- output ----

def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    if abs(x) >= 10 ** 5:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence], align_left: int = 1) -> str:
    """A plain-text table; the first `align_left` columns are left-aligned, the rest right-aligned."""
    cells = [list(map(str, headers))] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def sig(x: float, digits: int = 3) -> str:
    """`digits` significant figures, without exponent for ordinary magnitudes."""
    if x == 0 or not np.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - int(np.floor(np.log10(abs(x)))))
    return f"{x:,.{decimals}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[fmt(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                      + ["| " + " | ".join(row) + " |" for row in cells])


# ---- the machine, and pages for the docs ----

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def markdown_page(title: str, module: str, argv: Sequence[str], body: str, started: datetime.datetime) -> str:
    """A figures page: what was run, when, where, then the figures; regenerate it rather than edit it."""
    command = shlex.join(["python", "-m", module, *argv])
    return (f"# {title}\n\n"
            f"Generated by `{command}`: rerun that to refresh this page rather than editing it.\n\n"
            f"- date: {started:%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {machine()}\n"
            f"- load average at the end: {load_average()} (other jobs on a shared machine move the figures)\n\n"
            f"{body.strip()}\n")


def write_page(path: str | os.PathLike, text: str) -> None:
    """Write whole or not at all: a page is never left half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)

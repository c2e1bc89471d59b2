"""Shared pieces of the benchmarks: shapes, byte and FLOP counts, peak host memory, tables."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
from typing import Sequence

import numpy as np

from neox_jax.config import PRESETS, NeoXConfig

# Benchmark shapes. "pythia-70m" is Pythia-70M's architecture with the 20B tokenizer's padded vocabulary
# (50432, as the issue specifies; the released Pythia-70M pads to 50304, 0.25% fewer head rows).
SHAPES: dict[str, NeoXConfig] = {
    "tiny": NeoXConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                       rotary_pct=0.25, activation="gelu", max_position_embeddings=2048),
    "pythia-70m": PRESETS["pythia-70m"].replace(vocab_size=50432),
}


def parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---- byte and FLOP counts ----

def layer_params(config: NeoXConfig) -> int:
    """Parameters of one transformer layer (weights, biases, LayerNorms)."""
    d, f = config.hidden_size, config.intermediate_size
    return (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d) + 4 * d


def param_count(config: NeoXConfig) -> int:
    embed = config.vocab_size * config.hidden_size
    return embed * (1 if config.tie_word_embeddings else 2) + config.num_layers * layer_params(config) \
        + 2 * config.hidden_size


def decode_weight_bytes(config: NeoXConfig, batch: int, itemsize: int) -> int:
    """Bytes of parameters one decode step must read: every layer, the final norm and the full output head,
    but only `batch` rows of the input embedding (a gather). KV-cache reads are not included."""
    d = config.hidden_size
    head = config.vocab_size * d
    embed_rows = 0 if config.tie_word_embeddings else min(batch, config.vocab_size) * d
    return itemsize * (config.num_layers * layer_params(config) + 2 * d + head + embed_rows)


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

"""docs/quickstart.md's hardware table, recomputed from the presets: the page cannot drift from the configs."""

import re

from neox_jax.config import PRESETS

from conftest import REPO


def parameters(config) -> int:
    """Counted here from the shapes, independently of the config module's own count."""
    d, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d)  # 2 LayerNorms, QKV, out, MLP
    return v * d * (1 if config.tie_word_embeddings else 2) + layers * per_layer + 2 * d


def test_the_hardware_table_matches_the_presets():
    text = (REPO / "docs" / "quickstart.md").read_text()
    rows = re.findall(r"^\| (\S+) \| ([\d.]+)M \| ([\d.]+) GB \| ([\d.]+) GB \| (\d+) KB \|$", text, re.M)
    assert len(rows) == 11, rows
    for name, millions, fp16_gb, fp32_gb, cache_kb in rows:
        config, count = PRESETS[name], parameters(PRESETS[name])
        assert f"{count / 1e6:.1f}" == millions, name
        assert (f"{2 * count / 1e9:.2f}", f"{4 * count / 1e9:.2f}") == (fp16_gb, fp32_gb), name
        assert round(2 * 2 * config.num_layers * config.hidden_size / 1e3) == int(cache_kb), name  # K and V, fp16

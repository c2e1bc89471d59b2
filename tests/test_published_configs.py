"""The published GPT-NeoX-20B and Pythia training YAMLs (copied verbatim into tests/data/published_neox_yaml,
each naming its source commit) read by both YAML readers: neox_jax's and parity/'s independent one.
(Pythia-12B's published YAML is not valid YAML: a comma is missing after its "attention-config".)"""

from pathlib import Path

import pytest

from neox_jax.checkpoints.neox_yaml import config_from_neox_args, read_neox_yaml
from neox_jax.config import ConfigError, NeoXConfig
from parity.load import LoadError
from parity.load import read_neox_yaml as parity_read_neox_yaml

PUBLISHED = Path(__file__).parent / "data" / "published_neox_yaml"
# name -> (vocabulary of the released checkpoint, layers, hidden, heads)
RELEASED = {"gpt-neox-20b": (50432, 44, 6144, 64), "pythia-70m": (50304, 6, 512, 8),
            "pythia-410m": (50304, 24, 1024, 16), "pythia-6.9b": (50432, 32, 4096, 32)}


def both_readers(files: list[Path], vocab_size: int) -> tuple[NeoXConfig, NeoXConfig]:
    return config_from_neox_args(read_neox_yaml(files), vocab_size), parity_read_neox_yaml(files, vocab_size)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_both_readers_agree_on_the_published_yaml(name):
    vocab, layers, hidden, heads = RELEASED[name]
    ours, parity = both_readers([PUBLISHED / f"{name}.yml"], vocab)
    assert ours == parity
    assert ours == NeoXConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                              intermediate_size=4 * hidden, rotary_pct=0.25, activation="gelu_tanh",
                              parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False)


def test_both_readers_agree_on_keys_the_published_yaml_leaves_out(tmp_path):
    """GPT-NeoX's own defaults where a key is absent: 4 x hidden unless intermediate-size is given, the
    context from seq-length without max-position-embeddings, and a learned position embedding (refused)."""
    base = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "rotary"}

    def write(**keys) -> list[Path]:
        path = tmp_path / "model.yml"
        path.write_text("\n".join(f"{k}: {v}" for k, v in keys.items()) + "\n")
        return [path]

    ours, parity = both_readers(write(**base, **{"intermediate-size": 96, "seq-length": 128}), 96)
    assert ours == parity and ours.intermediate_size == 96 and ours.max_position_embeddings == 128
    without_rotary = write(**{k: v for k, v in base.items() if k != "pos-emb"}, **{"seq-length": 128})
    with pytest.raises(ConfigError, match="pos-emb"):
        config_from_neox_args(read_neox_yaml(without_rotary), 96)
    with pytest.raises(LoadError, match="pos-emb 'learned'"):
        parity_read_neox_yaml(without_rotary, 96)

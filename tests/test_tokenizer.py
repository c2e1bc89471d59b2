"""Tokenizers: the real GPT-NeoX-20B tokenizer (skipped where absent) and the in-memory demo one."""

import pytest

from neox_jax import load_tokenizer
from neox_jax.tokenizer import demo_tokenizer


def test_real_20b_tokenizer_known_encoding_and_round_trip(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.eos_id == 0
    text = "GPT-NeoX-20B:\n    def f(x):  return x ** 2  # ünïcödé ✓ 日本語"
    assert tok.decode(tok.encode(text)) == text


def test_demo_tokenizer_encodes_any_text():
    tok = demo_tokenizer()
    text = "Anything at all, even ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 0 and tok.vocab_size <= 320


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)

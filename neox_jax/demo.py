"""`--demo`: a tiny random GPT-NeoX and an in-memory tokenizer, so the whole path runs with no files."""

from __future__ import annotations

from .api import DTYPES, NeoXModel
from .checkpoints.synthetic import random_tensors
from .config import NeoXConfig
from .tokenizer import demo_tokenizer
from .weights import build_params


def demo_config(vocab_size: int) -> NeoXConfig:
    padded_vocab = -(-vocab_size // 128) * 128  # padded like GPT-NeoX's embedding
    return NeoXConfig(vocab_size=padded_vocab, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=256, rotary_pct=0.25, max_position_embeddings=256)


def demo_model(dtype: str = "float32", rotary_dtype: str | None = None, mesh=None) -> NeoXModel:
    tokenizer = demo_tokenizer()
    config = demo_config(tokenizer.vocab_size)
    tensors = random_tensors(config, seed=0)
    params = build_params(config, tensors.items(), DTYPES[dtype], mesh, progress=False)
    return NeoXModel(config, params, dtype, rotary_dtype, tokenizer, mesh)

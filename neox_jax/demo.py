"""`--demo`: a tiny random GPT-NeoX and an in-memory tokenizer, so the whole path runs with no files."""

from __future__ import annotations

from .api import NeoXModel
from .checkpoints.synthetic import random_tensors
from .config import PRESETS
from .dtypes import lookup
from .tokenizer import demo_tokenizer
from .weights import build_params


def demo_model(dtype: str = "float32", rotary_dtype: str | None = None, mesh=None,
               quantize: str | None = None) -> NeoXModel:
    tokenizer = demo_tokenizer()
    config = PRESETS["tiny"]
    tensors = random_tensors(config, seed=0)
    params = build_params(config, tensors.items(), lookup(dtype).jax, mesh, progress=False, quantize=quantize)
    return NeoXModel(config, params, dtype, rotary_dtype, tokenizer, mesh, quantize)

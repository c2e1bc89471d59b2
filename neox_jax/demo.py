"""`--demo`: the GPT-NeoX pair trained in this repository on the Python documentation, shipped in
`neox_jax/models/` (docs/training.md), so the whole path runs with no model download; and the tiny random
model the unit tests run on.

- `pydocs-target`: 6 layers x 128 (Pythia-14M's shape, embeddings tied), 256 positions: the demo's model.
- `pydocs-draft`: 2 layers x 64, the same tokenizer: a draft for speculative decoding.

Both use EleutherAI's GPT-NeoX-20B tokenizer, which is not shipped with them (the project keeps no copy of
it): `trained_tokenizer()` finds it. Without it, `--demo` says so in one line and runs the random model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .api import NeoXModel, load
from .checkpoints.synthetic import random_tensors
from .config import PRESETS
from .dtypes import lookup
from .tokenizer import demo_tokenizer
from .weights import build_params

MODELS = Path(__file__).parent / "models"
TARGET = MODELS / "pydocs-target"
DRAFT = MODELS / "pydocs-draft"
PROMPTS = ["The Python interpreter", "A dictionary is"]


TOKENIZER_HUB_ID = "EleutherAI/gpt-neox-20b"


def trained_tokenizer() -> Path | None:
    """The GPT-NeoX-20B tokenizer the shipped models were trained with: $NEOX_TOKENIZER, else a checkout's
    ../shared/data/20B_tokenizer.json, else EleutherAI/gpt-neox-20b's tokenizer.json in the Hugging Face
    cache (looked up offline); None if none is there."""
    if os.environ.get("NEOX_TOKENIZER"):
        return Path(os.environ["NEOX_TOKENIZER"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "20B_tokenizer.json"
    if beside.is_file():
        return beside
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(TOKENIZER_HUB_ID, "tokenizer.json")
    return Path(cached) if isinstance(cached, str) else None


def demo_model(dtype: str = "float32", rotary_dtype: str | None = None, mesh=None,
               quantize: str | None = None, path: Path = TARGET) -> NeoXModel:
    """The shipped trained model at `path` (default the target) with the 20B tokenizer; without the
    tokenizer, one line on stderr and the random model."""
    tokenizer = trained_tokenizer()
    if tokenizer is None:
        print(f"note: the demo's trained model needs the GPT-NeoX-20B tokenizer, not found (set NEOX_TOKENIZER=FILE, "
              f"or `huggingface-cli download {TOKENIZER_HUB_ID} tokenizer.json`): running the tiny random model "
              f"instead, whose text is noise", file=sys.stderr)
        return random_model(dtype, rotary_dtype, mesh, quantize)
    return load(path, dtype, rotary_dtype, tokenizer=tokenizer, mesh=mesh, progress=False, quantize=quantize)


def random_model(dtype: str = "float32", rotary_dtype: str | None = None, mesh=None,
                 quantize: str | None = None) -> NeoXModel:
    """The `tiny` preset with seeded random weights and an in-memory tokenizer: no files, fast to compile."""
    tokenizer = demo_tokenizer()
    config = PRESETS["tiny"]
    tensors = random_tensors(config, seed=0)
    params = build_params(config, tensors.items(), lookup(dtype).jax, mesh, progress=False, quantize=quantize)
    return NeoXModel(config, params, dtype, rotary_dtype, tokenizer, mesh, quantize)

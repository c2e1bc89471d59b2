"""neox-jax: GPT-NeoX-20B and the GPT-NeoX family (Pythia) in JAX."""

from .api import NeoXModel, load
from .config import PRESETS, NeoXConfig
from .tokenizer import load_tokenizer

__all__ = ["NeoXConfig", "NeoXModel", "PRESETS", "load", "load_tokenizer"]

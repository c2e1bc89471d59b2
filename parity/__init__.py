"""An independent PyTorch GPT-NeoX and a check that neox_jax computes the same thing (`python -m parity.check`)."""

from .load import LoadError, load, load_deepspeed, load_hf
from .model import GPTNeoX, KVCache

__all__ = ["GPTNeoX", "KVCache", "LoadError", "load", "load_deepspeed", "load_hf"]

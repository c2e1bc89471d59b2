"""neox-jax: GPT-NeoX-20B and the GPT-NeoX family (Pythia) in JAX.

Imports are lazy, so that light users (the PyTorch parity reference reads only `neox_jax.config`) do not
pay for JAX and Flax, and so that `python -m neox_jax.generate` can take over Ctrl-C before anything heavy
is imported.
"""

__all__ = ["KVCache", "NeoX", "NeoXConfig", "NeoXModel", "PRESETS", "load", "load_tokenizer"]


def __getattr__(name):
    if name in ("NeoXConfig", "PRESETS"):
        from . import config

        return getattr(config, name)
    if name in ("NeoX", "KVCache"):
        from . import model

        return getattr(model, name)
    if name in ("load", "NeoXModel"):
        from . import api

        return getattr(api, name)
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'neox_jax' has no attribute {name!r}")

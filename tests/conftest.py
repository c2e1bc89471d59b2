"""Shared fixtures: tiny configs, reference models from Hugging Face transformers, the real tokenizer."""

from pathlib import Path

import numpy as np
import pytest

from neox_jax.config import PRESETS, NeoXConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> NeoXConfig:
    """The `tiny` preset (what --demo and the benchmarks' smoke runs use), with `changes`."""
    return PRESETS["tiny"].replace(**changes)


def hf_reference(config: NeoXConfig, seed: int = 0):
    """transformers' GPTNeoXForCausalLM with random weights large enough to give peaked distributions."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict("float32")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.05)
    return model.eval()


def peaked_model(vocab_size: int, seed: int, dtype: str = "float32", **changes):
    """A tiny NeoXModel whose next-token distributions are peaked but not one-hot (weights scaled up 4x);
    `changes` to its config (the `tiny` preset's)."""
    import jax.numpy as jnp

    from neox_jax.api import NeoXModel
    from neox_jax.checkpoints.synthetic import random_tensors
    from neox_jax.weights import build_params

    config = tiny_config(vocab_size=vocab_size, **changes)
    tensors = {k: v * (4.0 if "layernorm" not in k and "layer_norm" not in k else 1.0)
               for k, v in random_tensors(config, seed=seed).items()}
    return NeoXModel(config, build_params(config, tensors.items(), jnp.dtype(dtype), progress=False), dtype)


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a random transformers model for `config`, return (dir, torch model)."""

    def make(config: NeoXConfig, seed: int = 0, **save_kwargs):
        model = hf_reference(config, seed)
        out = tmp_path / f"hf-{seed}-{abs(hash(config))}"
        model.save_pretrained(out, **save_kwargs)
        return out, model

    return make


@pytest.fixture
def tokenizer_path():
    """The real GPT-NeoX-20B tokenizer, found as --demo finds it: $NEOX_TOKENIZER, ../shared/data/20B_tokenizer.json
    or the Hugging Face cache (neox_jax.demo.trained_tokenizer)."""
    from neox_jax.demo import trained_tokenizer

    path = trained_tokenizer()
    if path is None or not path.is_file():
        pytest.skip(f"real 20B tokenizer not found ({path or 'no NEOX_TOKENIZER, ../shared or hub cache'}; "
                    f"set NEOX_TOKENIZER)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)

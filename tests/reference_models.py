"""One set of Hugging Face-named weights, loaded both into `neox_jax` and into the independent PyTorch model
in `parity/` (which computes fp16 rotary angles as GPT-NeoX's training code did), for numerical comparisons."""

import numpy as np
import torch

from neox_jax.api import NeoXModel
from neox_jax.checkpoints import expected_shapes
from neox_jax.dtypes import DTYPES
from neox_jax.weights import build_params
from parity.model import GPTNeoX, rotary_tables



def peaked_tensors(config, seed: int = 0, qkv_scale: float = 1.0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """fp32 weights by HF name giving O(1) activations and peaked logits (unit-variance embeddings, linear
    weights of std 1/sqrt(fan_in)); `qkv_scale` sharpens attention, so that rotary angles matter more;
    `scale` multiplies every non-LayerNorm tensor (large activations, for fp16 range checks)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if "layernorm" in name or "layer_norm" in name:
            out[name] = 1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise
            continue
        if name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_in" in name:
            value = noise
        else:
            gain = 3.0 if "embed_out" in name else qkv_scale if "query_key_value" in name else 1.0
            value = noise * gain / np.sqrt(shape[1])
        out[name] = (value * scale).astype(np.float32)
    return out


def jax_model(config, tensors, dtype: str, rotary_dtype: str | None = None) -> NeoXModel:
    """The public entry point with its default rotary precision unless one is given."""
    params = build_params(config, tensors.items(), DTYPES[dtype].jax, progress=False)
    return NeoXModel(config, params, dtype, rotary_dtype)


def parity_model(config, tensors, dtype: str = "float32", table_dtype: str | None = None) -> GPTNeoX:
    """parity's GPTNeoX in `dtype`; `table_dtype` replaces its rotary tables (model dtype by default) by
    tables whose angles were computed in that dtype, then cast to the model dtype."""
    model = GPTNeoX(config, DTYPES[dtype].torch)
    model.load_state_dict({name.removeprefix("gpt_neox."): torch.from_numpy(value) for name, value in tensors.items()})
    if table_dtype is not None:
        cos, sin = rotary_tables(config.rotary_dim, config.rotary_base, config.max_position_embeddings,
                                 DTYPES[table_dtype].torch, "cpu")
        model._rotary = (cos.to(DTYPES[dtype].torch), sin.to(DTYPES[dtype].torch))
    return model.eval()


def parity_logits(model: GPTNeoX, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).float().numpy()


def relative_max_error(got, expected) -> float:
    """max |got - expected| / max |expected|."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())

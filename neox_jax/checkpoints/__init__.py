"""Checkpoint formats, all speaking one canonical stream.

Every source yields `(hf_name, array)` pairs, one layer at a time, with Hugging Face GPT-NeoX tensor
names and layouts (`torch.nn.Linear` weights as `[out, in]`, fused QKV rows head-major
`[heads, (q, k, v), head_dim]`). Sinks (the HF writer, the JAX params builder) consume that stream,
so nothing ever needs the whole model in host memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..config import NeoXConfig

LAYER_PREFIX = "gpt_neox.layers"


class CheckpointError(Exception):
    """A checkpoint that cannot be read as described (the message names the file and tensor)."""


class Checkpoint(Protocol):
    config: NeoXConfig
    path: Path

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """All parameters as `(hf_name, array)`: embedding, then each layer in order, then norm and head."""


def layer_shapes(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one transformer layer's tensors, by name relative to `gpt_neox.layers.N.`."""
    d, f = config.hidden_size, config.intermediate_size
    return {
        "input_layernorm.weight": (d,),
        "input_layernorm.bias": (d,),
        "post_attention_layernorm.weight": (d,),
        "post_attention_layernorm.bias": (d,),
        "attention.query_key_value.weight": (3 * d, d),
        "attention.query_key_value.bias": (3 * d,),
        "attention.dense.weight": (d, d),
        "attention.dense.bias": (d,),
        "mlp.dense_h_to_4h.weight": (f, d),
        "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (d, f),
        "mlp.dense_4h_to_h.bias": (d,),
    }


def expected_shapes(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the canonical stream, in stream order, with its shape."""
    shapes = {"gpt_neox.embed_in.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        for name, shape in layer_shapes(config).items():
            shapes[f"{LAYER_PREFIX}.{i}.{name}"] = shape
    shapes["gpt_neox.final_layer_norm.weight"] = (config.hidden_size,)
    shapes["gpt_neox.final_layer_norm.bias"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["embed_out.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def check_shape(name: str, array: np.ndarray, expected: tuple[int, ...], where: str) -> None:
    if tuple(array.shape) != tuple(expected):
        raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(array.shape)}, "
                              f"the config expects {tuple(expected)}")


_FINITE_CHECK_BLOCK = 1 << 24  # elements per np.isfinite call: a 16 MB mask, whatever the tensor's size


def check_finite(name: str, array: np.ndarray, where: str) -> None:
    """Refuse a tensor holding NaN or infinity, as it streams past (one more read of memory already mapped).

    A NaN weight makes every logit NaN, and the argmax of NaN logits is token 0, `<|endoftext|>`: without
    this check a broken checkpoint would convert, load and answer with empty completions."""
    if array.dtype.kind in "iub":
        return
    flat = array.reshape(-1)
    bad = sum(int(block.size - np.count_nonzero(np.isfinite(block)))
              for block in (flat[i:i + _FINITE_CHECK_BLOCK] for i in range(0, flat.size, _FINITE_CHECK_BLOCK)))
    if bad:
        raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                              f"(NaN or infinity) of {flat.size}")


def open_checkpoint(path: str | os.PathLike, config: NeoXConfig | str | os.PathLike | None = None,
                    revision: str | None = None) -> Checkpoint:
    """Open a Hugging Face GPT-NeoX directory or a GPT-NeoX (DeepSpeed) checkpoint directory, or a model id
    on the Hugging Face hub (`EleutherAI/pythia-410m`, at `revision`) through its cache.

    A directory that exists always wins over a hub id of the same spelling. `config` (a NeoXConfig or a
    NeoX YAML path) describes DeepSpeed shards that have no `configs/*.yml` beside them; a Hugging Face
    directory's own config.json always applies.
    """
    from . import hf, hub

    if not Path(path).exists() and hub.is_repo_id(os.fspath(path)):
        path = hub.snapshot(os.fspath(path), revision)
    elif revision is not None:
        raise CheckpointError(f"{path}: a revision applies to Hugging Face hub ids, not to a local directory")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory)")
    if (path / "config.json").exists():
        if config is not None:
            raise CheckpointError(f"{path}: a Hugging Face directory uses its own config.json; "
                                  f"--config/--preset apply to DeepSpeed shards only")
        return hf.HFCheckpoint(path)
    from . import deepspeed

    if deepspeed.looks_like_deepspeed(path):
        return deepspeed.DeepSpeedCheckpoint(path, config)
    raise CheckpointError(
        f"{path}: not a checkpoint directory: expected a Hugging Face layout (config.json + *.safetensors) "
        f"or GPT-NeoX DeepSpeed shards (layer_XX-model_YY-model_states.pt)")

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
from ..params import LAYER_PREFIX, expected_shapes  # noqa: F401  (the shapes every reader checks)


class CheckpointError(Exception):
    """A checkpoint that cannot be read as described (the message names the file and tensor)."""


class Checkpoint(Protocol):
    config: NeoXConfig
    path: Path

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """All parameters as `(hf_name, array)`: embedding, then each layer in order, then norm and head."""


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

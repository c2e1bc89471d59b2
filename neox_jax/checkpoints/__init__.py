"""Checkpoint formats, all speaking one canonical stream.

Every source yields `(hf_name, array)` pairs, one layer at a time, with Hugging Face GPT-NeoX tensor
names and layouts (`torch.nn.Linear` weights as `[out, in]`, fused QKV rows head-major
`[heads, (q, k, v), head_dim]`). Sinks (the HF writer, the JAX params builder) consume that stream,
so nothing ever needs the whole model in host memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import NeoXConfig
from ..params import expected_shapes  # noqa: F401  (the shapes every reader checks)
from .stream import Checkpoint, CheckpointError, check_finite, check_shape  # noqa: F401


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

"""Random GPT-NeoX weights in either on-disk layout, for tests, benchmarks and demos.

`random_tensors` gives merged canonical tensors; the writers lay them out as a Hugging Face directory or
as GPT-NeoX's DeepSpeed tensor-parallel shards, split so that merging them recovers the merged tensors.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from ..config import NeoXConfig
from ..dtypes import DTYPES
from ..params import expected_shapes
from . import hf
from .deepspeed import INV_FREQ, Split, check_ranks_divide, pipeline_layout, rotary_inv_freq, sequential_key, shard_file



def random_tensors(config: NeoXConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Merged canonical tensors, in stream order, scaled like a trained model so that every path matters.

    Biases are nonzero and LayerNorm parameters are away from (1, 0) so that a dropped or doubled
    bias or norm changes the logits; output projections are scaled down with depth (GPT-NeoX's wang_init).
    """
    rng = np.random.default_rng(seed)
    out_scale = 0.02 / np.sqrt(2 * config.num_layers)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if "layernorm" in name or "layer_norm" in name:
            mean, std = (1.0, 0.1) if name.endswith("weight") else (0.0, 0.05)
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            mean, std = 0.0, out_scale
        else:
            mean, std = 0.0, 0.02
        tensors[name] = (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    return tensors


def decisive_tensors(config: NeoXConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """`random_tensors` with attention scores and logits as decisive as a trained model's (a std of ~3, not
    near-uniform): the QKV weights scaled to 1.7 / sqrt(D) and the output head to 3 / sqrt(D). Comparisons
    whose verdict depends on which token wins (fp16 parity on GPU, quantized top-1 agreement) use these."""
    tensors = random_tensors(config, seed)
    d = config.hidden_size
    for name in tensors:
        if name.endswith("query_key_value.weight"):
            tensors[name] *= 1.7 / np.sqrt(d) / 0.02
        elif name == "embed_out.weight":
            tensors[name] *= 3 / np.sqrt(d) / 0.02
    return tensors


def write_hf_checkpoint(path: str | os.PathLike, config: NeoXConfig, tensors: dict[str, np.ndarray] | None = None,
                        *, seed: int = 0, dtype=np.float32) -> Path:
    """A Hugging Face GPT-NeoX directory holding `tensors` (default: `random_tensors`) stored as `dtype`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    tensors = random_tensors(config, seed) if tensors is None else tensors
    stream = ((name, np.asarray(tensors[name]).astype(dtype)) for name in expected_shapes(config))
    hf.write_hf(path, config, stream, torch_dtype=dtype.name)
    return path


def write_deepspeed_checkpoint(path: str | os.PathLike, config: NeoXConfig,
                               tensors: dict[str, np.ndarray] | None = None, *, ranks: int = 2, seed: int = 0,
                               dtype=np.float16, layernorm_jitter: float = 2e-3, row_bias_jitter: float = 0.0,
                               step: int | None = None,
                               write_config_yaml: bool = True, layout: str = "pipeline") -> Path:
    """GPT-NeoX DeepSpeed shards of `tensors` (default: `random_tensors`) over `ranks` tensor-parallel ranks.

    Column-parallel tensors split on dim 0 and row-parallel weights on dim 1; row-parallel biases become
    random parts that sum to the merged bias under the parallel residual (copies otherwise, differing per
    rank by `row_bias_jitter` times a standard normal, by default not at all); LayerNorm copies differ per
    rank by `layernorm_jitter` times a standard normal with their average equal to the merged value, as in
    real multi-rank checkpoints (a large jitter makes the exact tensor-parallel mode and the merged model
    tell apart). Each layer also stores `attention.rotary_emb.inv_freq`.

    `layout`: "pipeline" (`layer_XX-model_YY-model_states.pt` plus weightless `mp_rank_YY` files) or
    "sequential" (weights under `module` in `mp_rank_YY_model_states.pt`). With `step`, the shards go to
    `path/global_stepN/` with `path/latest` naming it; the NeoX YAML goes to `path/configs/model.yml`.
    Returns `path`.
    """
    if layout not in ("pipeline", "sequential"):
        raise ValueError(f"layout must be 'pipeline' or 'sequential', got {layout!r}")
    root = Path(path)
    ckpt_dir = root if step is None else root / f"global_step{step}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    check_ranks_divide(config, ranks)
    dtype = np.dtype(dtype)
    torch_dtype = DTYPES[dtype.name].torch
    tensors = random_tensors(config, seed) if tensors is None else tensors
    rng = np.random.default_rng(seed + 1)

    def to_torch(a: np.ndarray) -> torch.Tensor:
        # A fresh tensor per shard: torch.save would otherwise store the whole array behind a view.
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch_dtype)

    modules: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
    for layer in pipeline_layout(config):
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
        for p in layer.params:
            parts = _split(p.split, np.asarray(tensors[p.hf_name], dtype=np.float32), ranks, config, rng,
                           layernorm_jitter, row_bias_jitter, dtype)
            for state, part in zip(states, parts):
                state[p.key] = to_torch(part)
        if layer.transformer:
            for state in states:
                state[INV_FREQ] = rotary_inv_freq(config).to(torch_dtype)
        for rank, state in enumerate(states):
            if layout == "pipeline":
                torch.save(state, ckpt_dir / shard_file(layer.idx, rank))
            else:
                modules[rank].update({sequential_key(layer.idx, k): v for k, v in state.items()})

    for rank in range(ranks):
        meta = {"module": modules[rank] if layout == "sequential" else None, "global_steps": step or 0,
                "skipped_steps": 0, "mp_world_size": ranks, "dp_world_size": 1, "ds_version": "0.3.15",
                "iteration": step or 0}
        if layout == "sequential":
            # Real files carry pickled training arguments: the reader must get past them without running them.
            meta["args"] = argparse.Namespace(num_layers=config.num_layers, lr=6e-4)
        torch.save(meta, ckpt_dir / f"mp_rank_{rank:02d}_model_states.pt")

    if step is not None:
        (root / "latest").write_text(f"global_step{step}\n")
    if write_config_yaml:
        (root / "configs").mkdir(exist_ok=True)
        (root / "configs" / "model.yml").write_text(neox_yaml(config, ranks, layout))
    return root


def neox_yaml(config: NeoXConfig, ranks: int = 1, layout: str = "pipeline") -> str:
    """A GPT-NeoX training YAML describing `config`, mixing `-` and `_` keys as real ones do."""
    lines = [
        "# written by neox_jax.checkpoints.synthetic",
        "{",
        f'  "pipe-parallel-size": {1 if layout == "pipeline" else 0},',
        f'  "model-parallel-size": {ranks},',
        f'  "num-layers": {config.num_layers},',
        f'  "hidden-size": {config.hidden_size},',
        f'  "num-attention-heads": {config.num_heads},',
        f'  "intermediate_size": {config.intermediate_size},',
        f'  "seq-length": {config.max_position_embeddings},',
        f'  "max-position-embeddings": {config.max_position_embeddings},',
        '  "norm": "layernorm",',
        '  "pos-emb": "rotary",',
        f'  "rotary_pct": {config.rotary_pct},',
        f'  "rotary_emb_base": {config.rotary_base},',
        f'  "no-weight-tying": {str(not config.tie_word_embeddings).lower()},',
        f'  "gpt_j_residual": {str(config.parallel_residual).lower()},',
        '  "activation": "gelu",',
        f'  "bias-gelu-fusion": {str(config.activation == "gelu_tanh").lower()},',
        f'  "layernorm-epsilon": {config.layer_norm_eps!r},',
        '  "fp16": {"enabled": true},',
        "}",
    ]
    return "\n".join(lines) + "\n"


def _split(split: Split, merged: np.ndarray, ranks: int, config: NeoXConfig, rng: np.random.Generator,
           jitter: float, row_bias_jitter: float, dtype: np.dtype) -> list[np.ndarray]:
    if split is Split.COLUMN:
        return np.split(merged, ranks, axis=0)
    if split is Split.ROW:
        return np.split(merged, ranks, axis=1)
    if ranks == 1:
        return [merged]
    copies = split is Split.ROW_BIAS and not config.parallel_residual
    if copies and not row_bias_jitter:
        return [merged] * ranks
    noise = rng.standard_normal((ranks, *merged.shape)).astype(np.float32)
    noise -= noise.mean(axis=0)
    if copies:
        return list(merged + row_bias_jitter * noise)
    if split is Split.REPLICATED:
        return list(merged + jitter * noise)
    # Parallel residual: each rank adds its own bias before the all-reduce. Round the parts to the stored
    # dtype first so that the last part absorbs the rounding and the stored parts sum to `merged`.
    parts = [(merged / ranks + 0.02 * n).astype(dtype).astype(np.float32) for n in noise[:-1]]
    with np.errstate(invalid="ignore"):  # a NaN planted by a fault test stays NaN
        return parts + [merged - np.sum(parts, axis=0)]

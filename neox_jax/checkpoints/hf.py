"""Hugging Face GPT-NeoX directories: read (headers read, tensors memory-mapped) and write (sharded safetensors)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError, NeoXConfig
from ..params import expected_shapes
from .stream import CheckpointError, check_finite, check_shape

# Buffers older transformers versions saved next to the weights; they hold no parameters.
_IGNORED = re.compile(r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_ALIASES = {"lm_head.weight": "embed_out.weight"}

INDEX_NAME = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; numpy has no float8
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy where numpy has the dtype; bfloat16 goes through ml_dtypes (numpy has no bf16)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    """Inverse of `torch_to_numpy`: torch.from_numpy rejects ml_dtypes' bfloat16."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class HFCheckpoint:
    """A directory with `config.json` and `model.safetensors` or sharded `model-*.safetensors` + index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.config = NeoXConfig.from_hf_json(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._location = self._index()

    def _index(self) -> dict[str, tuple[Path, str]]:
        """Canonical tensor name -> (safetensors file, key in it), checked against every file's header."""
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names in "
                                      f"{self.path}")
            files = sorted({self.path / v for v in weight_map.values()})
        else:
            if not (self.path / "model.safetensors").exists():
                hint = " (only PyTorch .bin weights found: re-save with safetensors)" if any(
                    self.path.glob("*.bin")) else ""
                raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}{hint}")
            files = [self.path / "model.safetensors"]

        expected = expected_shapes(self.config)
        mapped: dict[str, tuple[Path, str]] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index_path} names {file.name}, which does not exist")
            for key, shape in self._header(file).items():
                name = _ALIASES.get(key, key)
                if _IGNORED.match(name) or (self.config.tie_word_embeddings and name == "embed_out.weight"):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for a GPT-NeoX model with "
                                          f"{self.config.num_layers} layers")
                if shape != expected[name]:
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                                          f"the config expects {expected[name]}")
                if name in mapped:  # which copy is meant cannot be known: never take one silently
                    other, other_key = mapped[name]
                    raise CheckpointError(f"tensor {name!r} is stored twice: as {other_key!r} in {other} and as "
                                          f"{key!r} in {file}")
                mapped[name] = file, key
        missing = [n for n in expected if n not in mapped]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]!r}"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        return mapped

    @staticmethod
    def _header(file: Path) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape, from the file's JSON header: read, not memory-mapped, so that a file larger than
        the host's memory is described (and the memory plan can refuse it) before anything maps it."""
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
                if length is None or not 2 <= length <= min(size - 8, _MAX_HEADER_BYTES):
                    raise CheckpointError(f"{file}: unreadable safetensors file (a header of "
                                          f"{'no' if length is None else length} bytes in {size})")
                header = json.loads(f.read(length))
        except OSError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e.strerror or e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file}: unreadable safetensors file (its header is not a JSON object)")
        shapes = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                        and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size - 8 - length):
                    raise ValueError
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{file}: unreadable safetensors file (tensor {key!r}: {str(info)[:80]})") \
                    from None
            if dtype not in _FLOAT_DTYPES and not _IGNORED.match(key):
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}; model weights are floating "
                                      f"point ({', '.join(_FLOAT_DTYPES)})")
            shapes[key] = shape
        return shapes

    def tensors(self, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
        """The stored tensors as stored (`dtype` is unused: nothing here is computed)."""
        order = list(expected_shapes(self.config).items())
        last_use = {self._location[name][0]: i for i, (name, _) in enumerate(order)}
        handles = {}
        for i, (name, shape) in enumerate(order):
            file, key = self._location[name]
            if file not in handles:
                try:
                    handles[file] = safe_open(file, "pt")
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
            handle = handles[file]
            try:
                array = torch_to_numpy(handle.get_tensor(key))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None
            if last_use[file] == i:  # unmap a shard once read, so resident memory stays bounded
                del handles[file]
            check_shape(name, array, shape, str(file))
            check_finite(key, array, str(file))
            yield name, array


def write_hf(out_dir: str | os.PathLike, config: NeoXConfig, tensors: Iterable[tuple[str, np.ndarray]],
             *, shard_bytes: int = 10**9, torch_dtype: str | None = None,
             metadata: dict[str, str] | None = None) -> dict:
    """Write a stream of canonical tensors as a transformers-loadable GPT-NeoX directory.

    Streams: at most one shard's worth of tensors is held at a time. `out_dir` must exist and is
    written into directly; callers that need atomicity write to a temporary directory and rename.
    Returns the safetensors index (weight map and total size).
    """
    out_dir = Path(out_dir)
    expected = expected_shapes(config)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0
    shard_files: list[str] = []
    dtype_seen = None

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(shard_files) + 1:05d}.safetensors.tmp"
            save_file(pending, str(out_dir / name), metadata={"format": "pt", **(metadata or {})})
            shard_files.append(name)
            for k in pending:
                weight_map[k] = name
            pending, pending_bytes = {}, 0

    for name, array in tensors:
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in stream")
        check_shape(name, array, expected[name], "conversion")
        t = numpy_to_torch(np.ascontiguousarray(array))
        dtype_seen = dtype_seen or str(t.dtype).removeprefix("torch.")
        nbytes = t.numel() * t.element_size()
        if pending and pending_bytes + nbytes > shard_bytes:
            flush()
        pending[name] = t
        pending_bytes += nbytes
        total_bytes += nbytes
    flush()
    missing = [n for n in expected if n not in weight_map]
    if missing:
        raise CheckpointError(f"stream ended without tensor {missing[0]!r}")

    # Final names carry the shard count, known only now.
    final = {tmp: f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
             for i, tmp in enumerate(shard_files)}
    for tmp, name in final.items():
        os.replace(out_dir / tmp, out_dir / name)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(
        json.dumps(config.to_hf_dict(torch_dtype or dtype_seen or "float16"), indent=2) + "\n")
    return index

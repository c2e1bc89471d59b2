"""The canonical stream's protocol and the checks every checkpoint reader applies to the tensors it yields."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..config import NeoXConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be read as described (the message names the file and tensor)."""


class Checkpoint(Protocol):
    config: NeoXConfig
    path: Path

    def tensors(self, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
        """All parameters as `(hf_name, array)`: embedding, then each layer in order, then norm and head.

        `dtype`: what the consumer will hold. A tensor the reader computes (a merge of tensor-parallel
        ranks) is rounded once, to it; a stored tensor comes as stored, for the consumer to cast."""


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

"""The floating-point dtypes a model computes or is stored in, by name: one table for the API, the
command lines, the converter, the parity check and the benchmarks."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class Dtype:
    name: str  # as the command lines, config.json's torch_dtype and torch spell it
    numpy: np.dtype  # bfloat16 through ml_dtypes (numpy has none)

    @property
    def jax(self) -> np.dtype:
        return self.numpy  # JAX's dtypes are these same objects (jnp.bfloat16 is ml_dtypes')

    @property
    def bytes(self) -> int:
        return self.numpy.itemsize

    @property
    def torch(self):
        import torch  # only the callers that use torch pay for importing it

        return getattr(torch, self.name)


DTYPES: dict[str, Dtype] = {d.name: d for d in (
    Dtype("float16", np.dtype(np.float16)),
    Dtype("bfloat16", np.dtype(ml_dtypes.bfloat16)),
    Dtype("float32", np.dtype(np.float32)),
)}
NAMES = tuple(DTYPES)  # the choices of every --dtype


def lookup(name: str) -> Dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(NAMES)}, got {name!r}")
    return DTYPES[name]


def default_dtype(backend: str | None = None) -> str:
    """fp16 on accelerators, as the checkpoints were trained; fp32 on CPU, where fp16 is slow.
    `backend`: "cpu" or an accelerator's name (default: JAX's default backend)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "float32" if backend == "cpu" else "float16"

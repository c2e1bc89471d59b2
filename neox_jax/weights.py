"""The params sink of the canonical stream: `(hf_name, array)` pairs -> the model's device pytree.

Each tensor is cast on the host and sent straight to its shards on the device, so host memory holds
one tensor at a time and the device never holds two copies of the model.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, check_finite
from .config import NeoXConfig
from .params import model_params
from .sharding import check_model_axis_divides, make_mesh, param_shardings, put


def abstract_params(config: NeoXConfig, dtype) -> dict:
    """Shapes and dtypes of the params pytree (jax.ShapeDtypeStruct leaves), without allocating it."""
    tree: dict = {}
    for spec in model_params(config):
        node = tree
        for key in spec.tree_path[:-1]:
            node = node.setdefault(key, {})
        node[spec.tree_path[-1]] = jax.ShapeDtypeStruct(spec.shape(config), jnp.dtype(dtype))
    return tree


def build_params(config: NeoXConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype, mesh: Mesh | None = None,
                 *, progress: bool = True, description: str = "loading") -> dict:
    """Consume a canonical stream into a params pytree of `dtype`, each tensor placed in its shards on `mesh`
    (default: one device)."""
    mesh = mesh or make_mesh(1, 1)
    check_model_axis_divides(config, mesh)
    shardings = param_shardings(abstract_params(config, dtype), mesh)
    specs = {spec.hf_name: spec for spec in model_params(config)}
    params: dict = {}
    remaining = set(specs)
    np_dtype = jnp.dtype(dtype)

    # `with`: the bar is cleared before an error propagates, so the error is the only line left.
    with tqdm(tensors, total=len(remaining), desc=description, unit="tensor", disable=not progress,
              leave=False) as bar:
        for name, array in bar:
            if name not in specs:
                raise CheckpointError(f"no parameter for tensor {name!r}")
            spec = specs[name]
            remaining.discard(name)
            with np.errstate(over="ignore"):  # an overflow is reported below, by name
                # The params layout names the head axes of the stored tensor: a reshape, never a transpose.
                value = np.asarray(array).reshape(spec.shape(config)).astype(np_dtype, copy=False)
            if value.dtype.itemsize < array.dtype.itemsize:  # the stored values were checked; a cast can overflow
                check_finite(name, value, f"{np_dtype.name} cannot hold its values")
            node, sharding = params, shardings
            for key in spec.tree_path[:-1]:
                node, sharding = node.setdefault(key, {}), sharding[key]
            node[spec.tree_path[-1]] = put(value, sharding[spec.tree_path[-1]])
    if remaining:
        raise CheckpointError(f"checkpoint stream ended without tensor {sorted(remaining)[0]!r}")
    return params

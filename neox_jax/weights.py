"""The params sink of the canonical stream: `(hf_name, array)` pairs -> the model's device pytree.

Each tensor is cast (or quantized, `quantize="int8"`) on the host and sent straight to its shards on the
device, so host memory holds one tensor at a time and the device never holds two copies of the model, nor
an unquantized one.
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
from .huge_pages import back_with_huge_pages
from .params import model_params
from .quantize import QuantizedWeight, abstract_param, lookup, quantize as quantize_weight, quantizes
from .sharding import check_model_axis_divides, make_mesh, param_shardings, put


def abstract_params(config: NeoXConfig, dtype, tp_ranks: int | None = None, quantize: str | None = None) -> dict:
    """Shapes and dtypes of the params pytree (jax.ShapeDtypeStruct leaves, QuantizedWeights of them for the
    matmul weights with `quantize`), without allocating it; `tp_ranks`: the exact tensor-parallel mode's tree
    over that many ranks (None: merged)."""
    tree: dict = {}
    mode = lookup(quantize)
    for spec in model_params(config):
        node = tree
        for key in spec.tree_path[:-1]:
            node = node.setdefault(key, {})
        node[spec.tree_path[-1]] = abstract_param(spec, config, dtype, mode, tp_ranks)
    return tree


def tp_ranks_of(params: dict) -> int | None:
    """The rank count of an exact tensor-parallel params tree (its LayerNorms have a leading rank axis);
    None for merged params. The tree is the model: reading it here keeps module and params in step."""
    norm = params["final_layer_norm"]["weight"]
    return norm.shape[0] if norm.ndim == 2 else None


def build_params(config: NeoXConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype, mesh: Mesh | None = None,
                 *, progress: bool = True, description: str = "loading", tp_ranks: int | None = None,
                 quantize: str | None = None) -> dict:
    """Consume a canonical stream into a params pytree of `dtype`, each tensor placed in its shards on `mesh`
    (default: one device). `tp_ranks`: the stream is `DeepSpeedCheckpoint.per_rank_tensors` of that many
    ranks, for the exact tensor-parallel mode (per-rank tensors `[ranks, ...]`). `quantize` ("int8", "fp8",
    "int8-dynamic"): each matmul weight is quantized on the host first and its values and scales placed in their
    shards. Arrays placed in host memory are moved into huge pages (`neox_jax.huge_pages`)."""
    mesh = mesh or make_mesh(1, 1)
    check_model_axis_divides(config, mesh, tp_ranks)
    mode = lookup(quantize)
    shardings = param_shardings(abstract_params(config, dtype, tp_ranks, quantize), mesh, tp_ranks)
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
            # The params layout names the head axes of the stored tensor: a reshape, never a transpose.
            value = np.asarray(array).reshape(spec.shape(config, tp_ranks))
            if mode is not None and quantizes(spec):
                value = QuantizedWeight(*quantize_weight(value, spec, config, mode), mode.dynamic_activations)
            else:
                with np.errstate(over="ignore"):  # an overflow is reported below, by name
                    value = value.astype(np_dtype, copy=False)
                if value.dtype.itemsize < array.dtype.itemsize:  # the stored values were checked; a cast can overflow
                    check_finite(name, value, f"{np_dtype.name} cannot hold its values")
            node, sharding = params, shardings
            for key in spec.tree_path[:-1]:
                node, sharding = node.setdefault(key, {}), sharding[key]
            node[spec.tree_path[-1]] = jax.tree.map(put, value, sharding[spec.tree_path[-1]])
    if remaining:
        raise CheckpointError(f"checkpoint stream ended without tensor {sorted(remaining)[0]!r}")
    # Once all are placed: small weights share pages with the ones placed after them.
    jax.tree.map(back_with_huge_pages, params)
    return params

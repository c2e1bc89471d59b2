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

from .checkpoints import LAYER_PREFIX, CheckpointError, check_finite, expected_shapes
from .config import NeoXConfig
from .model import NeoX
from .sharding import check_divisible, make_mesh, param_shardings, put


def param_path(name: str) -> tuple[str, ...]:
    """HF tensor name -> path in the params dict."""
    if name == "gpt_neox.embed_in.weight":
        return ("embed_in",)
    if name == "embed_out.weight":
        return ("embed_out",)
    if name.startswith("gpt_neox.final_layer_norm."):
        return ("final_layer_norm", name.rsplit(".", 1)[1])
    if name.startswith(LAYER_PREFIX + "."):
        index, module, leaf = name[len(LAYER_PREFIX) + 1:].split(".", 2)
        return (f"layers_{index}", module, leaf)
    raise CheckpointError(f"no parameter for tensor {name!r}")


def to_param_layout(name: str, array: np.ndarray, config: NeoXConfig) -> np.ndarray:
    """Name the head axes of the attention tensors; everything else is used as stored."""
    n, h, d = config.num_heads, config.head_dim, config.hidden_size
    if name.endswith("attention.query_key_value.weight"):
        return array.reshape(n, 3, h, d)
    if name.endswith("attention.query_key_value.bias"):
        return array.reshape(n, 3, h)
    if name.endswith("attention.dense.weight"):
        return array.reshape(d, n, h)
    return array


def abstract_params(config: NeoXConfig, dtype) -> dict:
    """Shapes and dtypes of the params pytree, without allocating it."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: NeoX(config, dtype).init(jax.random.PRNGKey(0), t, t)["params"], tokens)


def build_params(config: NeoXConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype, mesh: Mesh | None = None,
                 *, progress: bool = True, description: str = "loading") -> dict:
    """Consume a canonical stream into a params pytree of `dtype`, each tensor placed in its shards on `mesh`
    (default: one device)."""
    mesh = mesh or make_mesh(1, 1)
    check_divisible(config, mesh)
    abstract = abstract_params(config, dtype)
    shardings = param_shardings(abstract, mesh)
    params: dict = {}
    remaining = set(expected_shapes(config))
    np_dtype = jnp.dtype(dtype)

    # `with`: the bar is cleared before an error propagates, so the error is the only line left.
    with tqdm(tensors, total=len(remaining), desc=description, unit="tensor", disable=not progress,
              leave=False) as bar:
        for name, array in bar:
            path = param_path(name)
            remaining.discard(name)
            with np.errstate(over="ignore"):  # an overflow is reported below, by name
                value = np.asarray(to_param_layout(name, array, config)).astype(np_dtype, copy=False)
            if value.dtype.itemsize < array.dtype.itemsize:  # the stored values were checked; a cast can overflow
                check_finite(name, value, f"{np_dtype.name} cannot hold its values")
            node, sharding = params, shardings
            for key in path[:-1]:
                node, sharding = node.setdefault(key, {}), sharding[key]
            node[path[-1]] = put(value, sharding[path[-1]])
    if remaining:
        raise CheckpointError(f"checkpoint stream ended without tensor {sorted(remaining)[0]!r}")
    return params

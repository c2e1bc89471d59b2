"""Tensor parallelism over a device mesh, and a memory plan made before anything is loaded.

A `jax.sharding.Mesh` with axes ("data", "model"): attention is split by heads (each device holds whole
heads of the fused QKV and the matching rows of the output projection), the MLP up-projection by columns
and the down-projection by rows, the embedding and output head by vocabulary, the KV cache by heads and
batch; LayerNorms and the row-parallel biases are replicated, except in the exact tensor-parallel mode, where
each rank's copies lie on the model axis with that rank's heads. The model code is unchanged: GSPMD
partitions the jit-compiled programs from the shardings of their inputs and inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import NeoXConfig
from .params import MODEL, model_params, spec_at, split_sizes
from .quantize import QUANTIZED_FIELDS, abstract_leaves, leaf_mesh_axes, lookup

DATA = "data"

CACHE_SPEC = P(DATA, MODEL, None, None)  # each layer's keys or values, [B, N, S, H]
BATCH_SPEC = P(DATA)  # leading batch axis of tokens, positions, per-row state


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-host run: one process per host, all devices in one mesh. With no arguments JAX reads
    them from the environment (SLURM, Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS & co.)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL regardless
    jax.distributed.initialize(coordinator, num_processes, process_id)


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array -> device array built shard by shard: no device (and no host of a multi-host run) is
    sent more than its own slices."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value on every process, also when other hosts hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ShardingError(ValueError):
    """A mesh that cannot split this model, or a request that cannot fit in device memory."""


def parse_mesh(text: str) -> dict[str, int]:
    """'model=4' or 'model=2,data=2' -> {'model': 4, 'data': 1}."""
    sizes = {MODEL: 1, DATA: 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ShardingError(f"--mesh {text!r}: expected model=N[,data=M] with positive integers")
        sizes[name] = int(value)
    return sizes


def make_mesh(model: int = 1, data: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if model * data > len(devices):
        raise ShardingError(f"a mesh of model={model} x data={data} needs {model * data} devices; "
                            f"{len(devices)} available")
    return Mesh(np.array(devices[:model * data]).reshape(data, model), (DATA, MODEL))


def check_model_axis_divides(config: NeoXConfig, mesh: Mesh, tp_ranks: int | None = None) -> None:
    """Refuse a mesh whose model axis does not divide the sizes the partition specs split over it (in the
    exact tensor-parallel mode also the rank count: each device holds whole ranks)."""
    model = mesh.shape[MODEL]
    if tp_ranks and tp_ranks % model:
        raise ShardingError(f"the exact tensor-parallel mode keeps the checkpoint's {tp_ranks} ranks, which do not "
                            f"split over the mesh's model axis ({model}): choose a model size that divides "
                            f"{tp_ranks}")
    for what, size in split_sizes(config).items():
        if size % model:
            raise ShardingError(f"{what} {size} is not divisible by the mesh's model axis ({model}): "
                                f"choose a model size that divides it")


def param_spec(path: tuple[str, ...], tp_ranks: int | None = None) -> P:
    """The partition spec of the params leaf at `path`, from its logical axes (`params.LOGICAL_AXIS_RULES`);
    a quantized weight's leaves are at `(*path, "values")` and `(*path, "scale")` (merged mode only)."""
    if path and path[-1] in QUANTIZED_FIELDS:
        return P(*leaf_mesh_axes(spec_at(path[:-1]), path[-1]))
    return P(*leaf_mesh_axes(spec_at(path), None, tp_ranks))


def param_shardings(abstract_params: dict, mesh: Mesh, tp_ranks: int | None = None) -> dict:
    """A NamedSharding for every leaf of the params pytree (`tp_ranks`: of the exact mode's tree)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, param_spec(tuple(getattr(k, "key", getattr(k, "name", None))
                                                             for k in path), tp_ranks)), abstract_params)


def shard_bytes(shape, dtype, spec: P, mesh: Mesh | dict[str, int]) -> int:
    """Bytes of one device's shard of an array, on a mesh or on mesh axis sizes ({"model": 4, "data": 1})."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    parts = math.prod(sizes[axis] for axis in spec if axis is not None)
    return math.prod(shape) * jnp.dtype(dtype).itemsize // parts


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weights_per_device: int
    cache_per_device: int
    available_per_device: int | None  # None where neither the backend nor the host says
    host: bool = False  # CPU devices: the host's available memory, shared between this process's devices
    quantize: str | None = None  # how the weights are counted (None: in the model dtype)
    prefix_cache_per_device: int = 0  # the server's prefix-cache budget (`with_prefix_cache`)

    @property
    def needed_per_device(self) -> int:
        return self.weights_per_device + self.cache_per_device + self.prefix_cache_per_device

    def with_prefix_cache(self, budget_bytes: int, mesh: Mesh) -> "MemoryPlan":
        """This plan and a prefix cache of `budget_bytes` in all: its blocks are slices of the KV cache, split
        over heads on the model axis as the cache is."""
        return dataclasses.replace(self, prefix_cache_per_device=-(-budget_bytes // mesh.shape[MODEL]))

    def plus(self, other: "MemoryPlan") -> "MemoryPlan":
        """This plan and `other`'s on the same devices (a model and its draft): their bytes summed."""
        return dataclasses.replace(self, weights_per_device=self.weights_per_device + other.weights_per_device,
                                   cache_per_device=self.cache_per_device + other.cache_per_device)

    def fits(self) -> bool:
        return self.available_per_device is None or self.needed_per_device <= self.available_per_device

    def describe(self) -> str:
        gib = 2 ** 30
        available = "unknown" if self.available_per_device is None else f"{self.available_per_device / gib:.2f}"
        where = " on the host" if self.host else ""
        prefix = f" + prefix cache {self.prefix_cache_per_device / gib:.2f} GiB" if self.prefix_cache_per_device else ""
        return (f"per device: weights {self.weights_per_device / gib:.2f} GiB + KV cache "
                f"{self.cache_per_device / gib:.2f} GiB{prefix} = {self.needed_per_device / gib:.2f} GiB; "
                f"available {available} GiB{where}")


def device_memory(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats.get("bytes_limit") if stats else None


def host_memory() -> int | None:
    """Bytes this process can still allocate without swapping: Linux's MemAvailable, lowered to what is left
    under a cgroup (v2) limit, as in a container; None where neither is known."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
        with open("/sys/fs/cgroup/memory.max") as f_max, open("/sys/fs/cgroup/memory.current") as f_current:
            limit, current = f_max.read().strip(), int(f_current.read())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass
    return available


def planned_bytes(config: NeoXConfig, dtype, mesh: Mesh | dict[str, int], batch: int = 0, context: int = 0,
                  tp_ranks: int | None = None, quantize: str | None = None) -> tuple[int, int]:
    """(weights, KV cache) bytes per device, from the declared params (quantized ones as values plus scales,
    each with its own sharding; `tp_ranks`: the exact tensor-parallel mode's) and the cache's shape; `mesh`
    may be axis sizes, for a mesh not on this machine."""
    mode = lookup(quantize)
    weights = sum(shard_bytes(leaf.shape, leaf.dtype, P(*leaf_mesh_axes(spec, field, tp_ranks)), mesh)
                  for spec in model_params(config)
                  for field, leaf in abstract_leaves(spec, config, dtype, mode, tp_ranks))
    layer_cache = (batch, config.num_heads, context, config.head_dim)
    return weights, 2 * config.num_layers * shard_bytes(layer_cache, dtype, CACHE_SPEC, mesh)


def plan_memory(config: NeoXConfig, dtype, mesh: Mesh, batch: int = 0, context: int = 0,
                tp_ranks: int | None = None, quantize: str | None = None) -> MemoryPlan:
    """Bytes each device needs for the weights (`tp_ranks`: those of the exact tensor-parallel mode;
    `quantize`: as stored quantized) and a KV cache of `batch` sequences of `context` tokens, against what
    the devices offer."""
    weights, cache = planned_bytes(config, dtype, mesh, batch, context, tp_ranks, quantize)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    available = device_memory(local[0])
    if available is None and local[0].platform == "cpu":  # XLA:CPU reports no limit: the host's memory is it
        host = host_memory()
        return MemoryPlan(weights, cache, None if host is None else host // len(local), host=True, quantize=quantize)
    return MemoryPlan(weights, cache, available, quantize=quantize)


def require_fit(plan: MemoryPlan, config: NeoXConfig, mesh: Mesh, batch: int, context: int) -> None:
    """Stop before loading when the plan does not fit, saying what would."""
    if plan.fits():
        return
    free = plan.available_per_device - plan.weights_per_device
    per_sequence = plan.cache_per_device / max(batch, 1)
    int8 = "" if plan.quantize else "; or int8 weights (--quantize int8: a quarter of fp32's bytes, half of fp16's)"
    if free <= 0 and plan.host:  # more CPU devices share the same memory
        hint = ("the weights alone need more than the host has available: use a GPU, a smaller dtype (float16 "
                "halves float32) or a host with more memory") + int8
    elif free <= 0:
        model = mesh.shape[MODEL]
        needed = math.ceil(plan.weights_per_device * model / plan.available_per_device)
        hint = f"the weights alone need about {needed} devices on the model axis (have {model})" + int8
    elif plan.cache_per_device <= free:  # the KV cache fits: the prefix cache's budget is what does not
        room = (free - plan.cache_per_device) * mesh.shape[MODEL] / 2 ** 30
        hint = f"--prefix-cache-gib {room:.2f} or less would fit"
    else:
        free -= plan.prefix_cache_per_device
        sequences = max(int(free // per_sequence), 0) if per_sequence else batch
        tokens = max(int(free // (per_sequence / context)), 0) if per_sequence and batch else context
        hint = (f"at most {sequences} sequences of {context} tokens would fit, or {batch} sequences of "
                f"{min(tokens // max(batch, 1), context)} tokens, or use more devices")
        hint += "; or a smaller --prefix-cache-gib" if plan.prefix_cache_per_device else ""
    raise ShardingError(f"does not fit in {'host' if plan.host else 'device'} memory ({plan.describe()}): {hint}")


def default_mesh(config: NeoXConfig, dtype, quantize: str | None = None) -> Mesh:
    """One device when the weights fit on it with room to spare, else every local device on `model`."""
    one = make_mesh(1, 1)
    plan = plan_memory(config, dtype, one, quantize=quantize)
    if plan.available_per_device is None or plan.weights_per_device < 0.9 * plan.available_per_device:
        return one
    return make_mesh(len(jax.local_devices()), 1, jax.local_devices())

"""The device mesh, the logical-axis rules that shard every array on it, and multi-host start-up.

One mesh, axes ('data', 'fsdp', 'tensor'), sized by `config.mesh` (one size may
be -1: the devices left over). Batches are split over 'data' and 'fsdp' together
(FSDP is data parallelism whose weights and optimizer state are sharded too);
weights are split by their logical axis names through `RULES`, the one table
that says where each kind of dimension goes. A multi-slice TPU job adds
`mesh.dcn_data` slices, joined over the data-centre network along 'data'.

Parameters carry `logical_axes` metadata (models/layers.py, peft/); optimizer
state built by optax keeps the parameters' variables and so their names; any
array without names (step counters, PRNG keys) is replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.errors import ConfigError

log = logging.getLogger("jaxft")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> the mesh axes it may be split over, by preference (() = replicated). Weights:
# FSDP splits the model width, tensor parallelism the heads, the MLP width and the vocabulary
# (Megatron's column/row split of each block's matmuls). A second choice is taken only where no
# other dimension of the array took that axis first: a LoRA B [rank, mlp] has no model-width
# dimension, so FSDP splits its output dimension instead. Activations between blocks are split
# over the batch only.
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "batch_fsdp": ("fsdp",),  # a step on the way to "batch" (models/layers.py, Embed)
    "embed": ("fsdp",),
    "heads": ("tensor", "fsdp"),
    "kv_heads": ("tensor", "fsdp"),
    "mlp": ("tensor", "fsdp"),
    "vocab": ("tensor", "fsdp"),
    "norm": (),
    "layers": (),  # the leading axis of stacked decoder blocks (models/stack.py): each device holds every layer
    "length": (),
    "act_embed": (),
}


# ----------------------------------------------------------------------------- mesh


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_devices`, with a -1 filled in; ConfigError when they cannot fit.

    `data` counts every slice's data-parallel groups: `mesh.data` x `mesh.dcn_data`.
    """
    dcn = int(mesh_cfg.dcn_data)
    if dcn < 1 or num_devices % dcn:
        raise ConfigError(f"mesh.dcn_data={dcn} must be a positive divisor of the {num_devices} devices "
                          f"(one data-parallel group per slice).")
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    per_slice = num_devices // dcn
    fill = [axis for axis, size in sizes.items() if size == -1]
    bad = [f"mesh.{axis}={size}" for axis, size in sizes.items() if size == 0 or size < -1]
    if bad or len(fill) > 1:
        raise ConfigError(f"{', '.join(bad) or 'more than one mesh size is -1'}: each of mesh.data, mesh.fsdp, "
                          f"mesh.tensor is a positive size, and at most one may be -1 (the devices left over).")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if per_slice % known:
            raise ConfigError(_no_fit(sizes, dcn, num_devices, f"{known} does not divide {per_slice}"))
        sizes[fill[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise ConfigError(_no_fit(sizes, dcn, num_devices, f"their product is {math.prod(sizes.values())}, "
                                                           f"not {per_slice}"))
    return sizes["data"] * dcn, sizes["fsdp"], sizes["tensor"]


def _no_fit(sizes, dcn, num_devices, why) -> str:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    slices = f" per slice (mesh.dcn_data={dcn})" if dcn > 1 else ""
    return (f"The mesh {shown} does not fit the {num_devices} devices{slices}: {why}. Set the sizes so their "
            f"product is the device count, or leave one at -1 to take the rest.")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), laid out for the interconnect.

    With `mesh.dcn_data` > 1 the slices (TPU multi-slice; processes where the devices
    are all of one slice, as GPU nodes or CPU hosts) are outermost on 'data', so only the data-parallel
    gradient reduction crosses the slower network between them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    dcn = int(mesh_cfg.dcn_data)
    if dcn == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        per_slice = (shape[0] // dcn, shape[1], shape[2])
        # TPU slices where there are several; otherwise processes (GPU nodes, CPU hosts) stand in for them.
        by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
        granules = len({d.process_index for d in devices}) if by_process else len({d.slice_index for d in devices})
        if granules != dcn:
            raise ConfigError(f"mesh.dcn_data={dcn} but the devices come from {granules} "
                              f"{'processes' if by_process else 'slices'}.")
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (dcn, 1, 1), devices,
                                                    process_is_granule=by_process)
    return Mesh(grid, MESH_AXES)


# ----------------------------------------------------------------------------- arrays


def spec_for(logical_axes, shape, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec that `RULES` gives an array of `shape` named `logical_axes` on `mesh`.

    Every dimension takes its first choice, then the dimensions take their further
    choices, in order. A mesh axis is used once per array, and only where it divides
    the dimension; a dimension none fits stays whole (replicated): always correct,
    only larger.
    """
    if logical_axes is None or len(logical_axes) != len(shape):
        return PartitionSpec()
    choices = [RULES.get(name, ()) if name else () for name in logical_axes]
    used, chosen = set(), [[] for _ in shape]
    for rank in range(max(map(len, choices), default=0)):
        for dim, size in enumerate(shape):
            if rank >= len(choices[dim]):
                continue
            axis = choices[dim][rank]
            n = mesh.shape[axis]
            if axis in used or n == 1 or size % (math.prod(mesh.shape[a] for a in chosen[dim]) * n):
                continue
            chosen[dim].append(axis)
            used.add(axis)
    return PartitionSpec(*(tuple(c) if len(c) > 1 else c[0] if c else None for c in chosen))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh):
    """A NamedSharding for every array of `tree` (params, optimizer state, frozen weights), as a pytree
    prefix of it: one per `nnx.Variable` by its logical axes, replicated for anything unnamed."""
    def sharding(leaf):
        if _is_variable(leaf):
            value = leaf.get_value()
            shape = value.shape if hasattr(value, "shape") else np.shape(value)  # arrays or ShapeDtypeStructs
            return NamedSharding(mesh, spec_for(leaf.get_metadata().get("logical_axes"), shape, mesh))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def place(tree, shardings):
    """`tree` with every array laid out as `shardings` says, on one process or many.

    Every process holds the same values (pretrained weights, adapters from the
    same seed); each keeps the shards of its own devices.
    """
    def put(value, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # keys: their raw data, then wrap back
            data = place(jax.random.key_data(value), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, _expand(shardings, tree))


def gather(tree):
    """`tree` with every array whole and on the host on every process (for export); PRNG keys as they are."""
    from jax.experimental import multihost_utils

    def whole(x):
        if (not isinstance(x, jax.Array) or x.is_fully_addressable
                or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
            return x
        return multihost_utils.process_allgather(x, tiled=True)
    return jax.tree.map(whole, tree)


def _expand(prefix, tree):
    """A sharding per leaf of `tree` from `tree_shardings`' per-Variable prefix."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the batch axes ('data' and 'fsdp'), everything else whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_ways(mesh: Mesh) -> int:
    """Into how many parts the batch axes split a batch."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, accum_steps: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    """ConfigError, before compiling, when a (micro-)batch does not split evenly over the batch axes."""
    ways, micro = batch_ways(mesh), batch_size // accum_steps
    if micro % ways:
        per = f" (micro-batches of {micro} rows with optim.grad_accum_steps={accum_steps})" if accum_steps > 1 else ""
        raise ConfigError(f"{what}={batch_size}{per} does not split over the mesh's batch axes: data x fsdp = "
                          f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {ways} ways. Use a multiple of {ways} "
                          f"rows per micro-batch, or a mesh with fewer data/fsdp ways.")


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold under `sharding`."""
    indices = sharding.addressable_devices_indices_map((global_rows,)).values()
    starts = [(index[0].start or 0) for index in indices]
    stops = [(index[0].stop if index[0].stop is not None else global_rows) for index in indices]
    rows = slice(min(starts), max(stops))
    held = sum(stop - start for start, stop in {(a, b) for a, b in zip(starts, stops)})
    if held != rows.stop - rows.start:
        raise ConfigError(f"this process's devices hold rows {sorted(set(zip(starts, stops)))} of each batch, "
                          f"not one contiguous block; reorder the mesh so each host's devices are adjacent.")
    return rows


# ----------------------------------------------------------------------------- activations

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxft_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Inside, `constrain` lays activations out on `mesh` (outside it does nothing: one device)."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh `use_mesh` made active, if it has more than one device."""
    mesh = _MESH.get()
    return mesh if mesh is not None and mesh.size > 1 else None


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """`x` constrained to the layout `RULES` gives `logical_axes` on the active mesh, if any."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical_axes, x.shape, mesh)))


# ----------------------------------------------------------------------------- hosts


def barrier(name: str) -> None:
    """Wait until every process of a multi-host job reaches the barrier `name`; nothing on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def from_process_zero(obj):
    """Process 0's `obj` (anything JSON can carry) on every process: what process 0 decided, for all to follow.
    `obj` is ignored on the other processes; on one process it is returned as it is."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    data = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())


def initialize_distributed() -> bool:
    """Join the other processes of a multi-host job, before JAX uses a device; True if it did.

    Explicit (launch/local.sh, or any launcher that sets them): JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID. Detected by JAX: SLURM with several tasks, GKE
    TPU pods (TPU_WORKER_HOSTNAMES), and, with JAXFT_DISTRIBUTED=1, Cloud TPU VM pods.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        if jax.config.jax_platforms == "cpu" or env.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env.get("JAX_PROCESS_ID", "0")))
    elif (int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or env.get("JAXFT_DISTRIBUTED") == "1"):
        jax.distributed.initialize()
    else:
        return False
    log.info("Process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True

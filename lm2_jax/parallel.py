"""Meshes, logical-axis sharding rules and multi-host start-up.

One mesh with axes ('data', 'fsdp', 'tensor'). Parameters, optimizer state, the memory bank and the
large activations carry logical axis names ('embed', 'mlp', 'heads', 'batch', ...); the one rules
table `config.mesh.rules` maps each to mesh axes. `resolve` applies it to a concrete shape: a mesh
axis already used by an earlier dimension, or one that does not divide the dimension, is dropped
(that dimension is then replicated over it), so a rule table works for any model size and mesh.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm2_jax.errors import ConfigError, UsageError

AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: 'embed' is split over fsdp (ZeRO-3 style), the per-head,
# MLP and memory-gate dimensions over tensor. Activations and the memory bank: the batch over
# data x fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("memory_gate", "tensor"),  # the output dimension of the memory's D x D gates and their biases
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("mem_slots", None),
    ("layers", None),
)


def mesh_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),  # (data, fsdp, tensor); one -1 takes the devices left over
        rules=DEFAULT_RULES,
    ))


class MeshError(ConfigError):
    """A mesh that does not fit the devices (a `ConfigError` on `mesh.shape`)."""


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Resolve a -1 entry; a shape that does not use exactly `n_devices` is an error naming it."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise MeshError("mesh.shape", shape, f"needs 3 positive sizes for {AXES}, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise MeshError("mesh.shape", shape, f"{known} does not divide the {n_devices} devices")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise MeshError("mesh.shape", shape, f"needs {math.prod(shape)} devices, "
                        f"but {n_devices} are available ({jax.devices()[0].platform})")
    return shape


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh; across TPU slices, the data axis spans slices (DCN) and the rest stays inside."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg.shape, len(devices))
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        from jax.experimental import mesh_utils

        if shape[0] % n_slices:
            raise MeshError("mesh.shape", shape, f"data={shape[0]} must be a multiple of the {n_slices} slices")
        ici = (shape[0] // n_slices, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (n_slices, 1, 1), devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def resolve(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """PartitionSpec of an array with these logical axis names, under `rules`, on `mesh`."""
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for ax in axes:
            n = mesh.shape[ax]
            if ax in used or n == 1 or size % (math.prod(mesh.shape[a] for a in keep) * n):
                continue
            keep.append(ax)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_specs(boxed_tree) -> Any:
    """The logical PartitionSpec of every leaf of a tree of (abstract) boxed values; P() if unboxed."""
    return nn.get_partition_spec(boxed_tree)


def shardings(boxed_tree, mesh: Mesh, rules) -> Any:
    """NamedSharding per leaf of a boxed (abstract) tree; unboxed leaves are replicated."""
    specs = logical_specs(boxed_tree)
    values = nn.meta.unbox(boxed_tree)
    return jax.tree.map(lambda spec, v: NamedSharding(mesh, resolve(tuple(spec), v.shape, mesh, rules)),
                        specs, values, is_leaf=lambda x: isinstance(x, P))


# -- activation constraints ----------------------------------------------------------------------
_CONTEXT: list[tuple[Mesh, Any]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing inside this context, `constrain` pins activations to the rules' shardings."""
    _CONTEXT.append((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.pop()


def current_mesh() -> Mesh | None:
    """The mesh of the innermost `activation_sharding`, or None outside one."""
    return _CONTEXT[-1][0] if _CONTEXT else None


def current_rules():
    """The rules of the innermost `activation_sharding` (the defaults outside one)."""
    return _CONTEXT[-1][1] if _CONTEXT else DEFAULT_RULES


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
    if not _CONTEXT:
        return x
    mesh, rules = _CONTEXT[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, resolve(logical, x.shape, mesh, rules)))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes, everything else replicated (the input batch, per-row outputs)."""
    axes = dict(rules).get("batch")
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def global_batch(local: dict, mesh: Mesh, rules) -> dict:
    """Assemble each process's rows into one global array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
            for k, v in local.items()}


def global_batch_from_full(full: dict, mesh: Mesh, rules) -> dict:
    """The same global batch known whole to every process (evaluation) -> sharded global arrays."""
    out = {}
    for k, v in full.items():
        sharding = batch_sharding(mesh, rules, v.ndim)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


# -- multi-host ------------------------------------------------------------------------------------
def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Start JAX's multi-process runtime when this is one of several processes.

    Explicit values (flags) win, then LM2_COORDINATOR / LM2_NUM_PROCESSES / LM2_PROCESS_ID; on a
    TPU pod (TPU_WORKER_HOSTNAMES with several hosts) or under SLURM/OpenMPI, JAX detects everything
    itself. Returns whether the runtime was started.
    """
    coordinator = coordinator or os.environ.get("LM2_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("LM2_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("LM2_PROCESS_ID", "-1"))
    if coordinator or num_processes > 1:
        if not (coordinator and num_processes > 0 and 0 <= process_id < num_processes):
            raise UsageError(f"multi-process start needs a coordinator, a process count and an id in range; got "
                            f"coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}")
        # Cross-process collectives on the CPU backend (only it reads this option). Asking which
        # backend is in use would start it, which must not happen before initialize().
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    auto = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 or (
        "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1) or (
        "OMPI_COMM_WORLD_SIZE" in os.environ and int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1)
    if auto:
        jax.distributed.initialize()
    return auto

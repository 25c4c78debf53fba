"""`python -m lm2_jax.aot`: compile the real train step for a TPU slice on a CPU-only machine.

    pip install -e ".[tpu]"     # libtpu, which provides the compile-only TPU devices
    python -m lm2_jax.aot --config=configs/lm2_1p7b.py --topology=v5p-8 --config.mesh.shape="(1,-1,1)"
    python -m lm2_jax.aot --config=configs/tiny.py --topology=v5e-4 --num_slices=2 --config.mesh.shape="(2,-1,1)"

It builds the slice's devices with `jax.experimental.topologies.get_topology_desc` (as MaxText's
train_compile does), the mesh with `parallel.make_mesh` (across slices the data axis spans them),
and lowers `loop.jit_steps`' train step, the same jit with the same shardings as training, on an
abstract state and batch: nothing is allocated. It prints per-device figures from the compiled
program (peak memory against the chip's HBM, arguments, temporaries, FLOPs) and the bytes of
params and optimizer state per device. A program that does not fit fails at compile time with
the compiler's own numbers, reported as one error naming the topology, the peak and the HBM.
`--batch` and `--seq_len` override `data.batch_size` and `data.seq_len`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

from absl import flags

from lm2_jax import cli

# Compile-only TPU devices need no TPU metadata server, and this process computes on the CPU.
# (the worker variables only quiet libtpu's start-up complaint that it cannot find its hosts).
# ALLOW_MULTIPLE_LIBTPU_LOAD: no TPU is used, so several compiles (or a test suite's parallel
# workers) may load libtpu at once without contending for /tmp/libtpu_lockfile.
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("JAX_PLATFORMS", "cpu"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_key, _value)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # get_topology_desc's topology name
    chip_config: str
    chips_per_host: tuple[int, int, int]
    hbm_gib: float  # per chip, as the TPU compiler counts it


# User-facing slice names (gcloud's accelerator types; chips = the number after the dash for v5e /
# v6e, cores / 2 for v4 / v5p) -> the compile-only topology. v5p and v4 chips are megacore.
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 30.75),
    "v4-16": Topology("v4:2x2x2", "megacore", (2, 2, 1), 30.75),
    "v5e-4": Topology("v5e:2x2", "default", (2, 2, 1), 15.75),
    "v5e-16": Topology("v5e:4x4", "default", (2, 2, 1), 15.75),
    "v5e-64": Topology("v5e:8x8", "default", (2, 2, 1), 15.75),
    "v5e-256": Topology("v5e:16x16", "default", (2, 2, 1), 15.75),
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1), 95.74),
    "v5p-16": Topology("v5:2x2x2", "megacore", (2, 2, 1), 95.74),
    "v5p-64": Topology("v5:4x4x2", "megacore", (2, 2, 1), 95.74),
    "v5p-128": Topology("v5:4x4x4", "megacore", (2, 2, 1), 95.74),
    "v6e-8": Topology("v6e:2x4", "default", (2, 4, 1), 31.25),
    "v6e-16": Topology("v6e:4x4", "default", (2, 2, 1), 31.25),
    "v6e-256": Topology("v6e:16x16", "default", (2, 2, 1), 31.25),
}


def topology_devices(name: str, num_slices: int = 1):
    from lm2_jax.errors import UsageError

    if name not in TOPOLOGIES:
        raise UsageError(f"--topology={name}: unknown; one of {', '.join(TOPOLOGIES)}")
    if num_slices < 1:
        raise UsageError(f"--num_slices={num_slices}: must be >= 1")
    if importlib.util.find_spec("libtpu") is None:
        raise UsageError("--topology needs libtpu for the compile-only TPU devices: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    t = TOPOLOGIES[name]
    return topologies.get_topology_desc(t.name, "tpu", chip_config_name=t.chip_config,
                                        chips_per_host_bounds=t.chips_per_host, num_slices=num_slices,
                                        wrap=[False] * 3).devices


def _bytes_per_device(abstract_tree) -> int:
    """Bytes of one device's shards of every leaf (each leaf's shard shape under its sharding)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def compile_for(config, topology: str, num_slices: int = 1) -> dict:
    """Lower and compile the train step for the slice(s); the per-device figures."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lm2_jax import config as cfglib, parallel
    from lm2_jax.errors import Lm2Error
    from lm2_jax.model import decoder, layers
    from lm2_jax.train import loop, optimizer as optlib, state as statelib

    cfglib.validate(config)
    devices = topology_devices(topology, num_slices)
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    B, T = config.data.batch_size, config.data.seq_len
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % rows:
        raise cfglib.ConfigError("data.batch_size", B, f"must be a multiple of data x fsdp = {rows} "
                                                         f"(mesh {dict(mesh.shape)})")
    tx = optlib.make_optimizer(config.train)
    train, _, state_sh, batch_sh = loop.jit_steps(config, mesh, rules, tx)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(statelib._boxed_state(config, tx)))
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, state_sh)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sh)
             for k in ("tokens", "loss_mask", "doc_ids", "positions")}
    t = TOPOLOGIES[topology]
    where = f"{topology}{f' x {num_slices} slices' if num_slices > 1 else ''}"
    start = time.time()
    try:
        with parallel.activation_sharding(mesh, rules):
            compiled = train.lower(state, batch).compile()
    except Exception as err:  # the TPU compiler reports running out of HBM as RESOURCE_EXHAUSTED
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "HBM" not in text:
            raise
        need = re.search(r"required for HLO temporaries \(([0-9.]+[KMGT]?)\)", text)
        raise Lm2Error(f"{where} ({t.name}): the train step does not fit: it needs "
                       f"{need.group(1) if need else '?'} of HBM per device, the chip has {t.hbm_gib} GiB "
                       f"(batch {B} x {T}, mesh {dict(mesh.shape)}; {text.splitlines()[0][:300]})") from None
    m = config.model
    attention = layers.attention_kernel(m, decoder.segment_len(m, T), devices[0].platform)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "topology": where, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "batch": B, "seq_len": T,
        "peak_gib": mem.peak_memory_in_bytes / GIB, "hbm_gib": t.hbm_gib,
        "argument_gib": mem.argument_size_in_bytes / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
        "params_gib": _bytes_per_device(state.params) / GIB, "opt_state_gib": _bytes_per_device(state.opt_state) / GIB,
        "flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "compile_s": time.time() - start, "attention": attention,
        # Pallas kernels lower to Mosaic custom calls: how many the compiled step holds
        "mosaic_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
    }


_CONFIG = cli.config_flag(None, "The config whose train step is compiled (e.g. configs/lm2_1p7b.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {', '.join(TOPOLOGIES)}.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology (multislice; data spans them).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch rows (overrides data.batch_size).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Row length (overrides data.seq_len).")


def main(argv) -> int:
    from absl import logging as absl_logging

    from lm2_jax import config as cfglib
    from lm2_jax.errors import UsageError

    cli.no_extra_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)
    if _CONFIG.value is None:
        raise UsageError("--config is required (e.g. --config=configs/lm2_1p7b.py)")
    if not _TOPOLOGY.value:
        raise UsageError(f"--topology is required: one of {', '.join(TOPOLOGIES)}")
    # libtpu reads the slice type at start-up; the compile-only devices come from --topology anyway
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _TOPOLOGY.value.replace("v5e-", "v5litepod-"))
    config = _CONFIG.value
    if _BATCH.value is not None:
        config.data.batch_size = _BATCH.value
    if _SEQ.value is not None:
        config.data.seq_len = _SEQ.value
    r = compile_for(config, _TOPOLOGY.value, _SLICES.value)
    print(f"{r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, "
          f"{cfglib.describe_model(config.model)}, batch {r['batch']} x {r['seq_len']}")
    print(f"per device: peak {r['peak_gib']:.2f} GiB of {r['hbm_gib']} GiB HBM "
          f"({'fits' if r['peak_gib'] <= r['hbm_gib'] else 'DOES NOT FIT'}); arguments {r['argument_gib']:.2f} GiB, "
          f"temporaries {r['temp_gib']:.2f} GiB; params {r['params_gib']:.2f} GiB, optimizer state "
          f"{r['opt_state_gib']:.2f} GiB; {r['flops_per_device']:.3g} FLOPs per step (XLA's count: a scanned "
          f"loop's body once); compiled in "
          f"{r['compile_s']:.0f} s")
    print(f"attention: {r['attention']} (model.attention={config.model.attention}); "
          f"{r['mosaic_calls']} Mosaic kernel calls in the compiled step")
    return 0


if __name__ == "__main__":
    cli.run(main)
    sys.exit(0)

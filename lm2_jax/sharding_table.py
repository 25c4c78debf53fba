"""Print how every parameter, optimizer moment and the memory bank is sharded on a mesh.

    python -m lm2_jax.sharding_table --config=configs/tiny.py --config.mesh.shape="(2,2,2)" --cpu_devices=8

`--cpu_devices=N` emulates N CPU devices (it must act before JAX starts, hence this module sets
XLA_FLAGS itself). Each row: path, shape, logical axis names, the PartitionSpec the rules give.
"""

from __future__ import annotations

import os
import sys


def _emulate(argv) -> None:
    for arg in argv:
        n = arg.split("=", 1)[1] if arg.startswith("--cpu_devices=") else ""
        if n.isdigit():  # anything else is left to absl, which names the flag
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _emulate(sys.argv)

import jax  # noqa: E402  (after XLA_FLAGS)
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from lm2_jax import cli, config as cfglib, parallel  # noqa: E402
from lm2_jax.train import optimizer as optlib, state as statelib  # noqa: E402


def rows(config, mesh) -> list[tuple[str, tuple, tuple, str]]:
    """(path, shape, logical names, PartitionSpec) for every leaf of the train state."""
    rules = tuple(tuple(r) for r in config.mesh.rules)
    tx = optlib.make_optimizer(config.train)
    boxed = statelib.abstract_boxed_state(config, tx)
    specs = parallel.logical_specs(boxed)
    values = nn.meta.unbox(boxed)
    out = []
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    for (path, spec), value in zip(flat_specs, jax.tree.leaves(values)):
        logical = tuple(spec)
        out.append((jax.tree_util.keystr(path), tuple(value.shape), logical,
                    str(parallel.resolve(logical, value.shape, mesh, rules))))
    return out


def main(argv) -> int:
    cli.no_extra_args(argv)
    config = cfglib.validate(flags.FLAGS.config)
    mesh = parallel.make_mesh(config.mesh)
    print(f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} devices")
    table = rows(config, mesh)
    w = max(len(r[0]) for r in table)
    for path, shape, logical, spec in table:
        print(f"{path:<{w}}  {str(shape):<22} {str(logical):<44} {spec}")


if __name__ == "__main__":
    cli.config_flag(cfglib.checkout_config("tiny.py"))
    flags.DEFINE_integer("cpu_devices", 0, "Emulate this many CPU devices (0 = the real devices).")
    cli.run(main)

"""Per-module parameter table of a config, from `jax.eval_shape` (nothing is allocated).

    python -m lm2_jax.model.summary --config=configs/lm2_1p7b.py
"""

from __future__ import annotations

import math

import jax
from flax import linen as nn

from lm2_jax import cli, config as cfglib
from lm2_jax.model import decoder


def param_shapes(model_cfg) -> dict:
    """The parameter tree as ShapeDtypeStructs, computed abstractly."""
    boxed = jax.eval_shape(lambda: decoder.init_params(model_cfg, jax.random.key(0)))
    return nn.meta.unbox(boxed)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def module_counts(model_cfg) -> list[tuple[str, int]]:
    """(module path, parameter count) rows: per top-level module, blocks split by sub-module."""
    rows = []
    for name, sub in param_shapes(model_cfg).items():
        if isinstance(sub, dict) and name.endswith("blocks"):
            rows += [(f"{name}/{child}", count(v)) for child, v in sub.items()]
        else:
            rows.append((name, count(sub)))
    return rows


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(model_cfg) -> str:
    rows = module_counts(model_cfg)
    total = sum(n for _, n in rows)
    width = max(len(r[0]) for r in rows + [("total", 0)])
    lines = [f"{'module':<{width}}  {'params':>15}  {'':>8}  {'share':>6}"]
    lines += [f"{name:<{width}}  {n:>15,}  {human(n):>8}  {n / total:>6.1%}" for name, n in rows]
    lines.append(f"{'total':<{width}}  {total:>15,}  {human(total):>8}  {1:>6.1%}")
    return "\n".join(lines)


def main(argv) -> int:
    from absl import flags

    cli.no_extra_args(argv)
    config = cfglib.validate(flags.FLAGS.config)
    m = config.model
    print(f"L_m={m.memory.layers} of {m.n_layers} blocks, D={m.d_model}, N={m.memory.slots} slots, "
          f"vocab={m.vocab_size}, tied={m.tie_embeddings}")
    print(table(m))


if __name__ == "__main__":
    cli.config_flag(cfglib.checkout_config("tiny.py"))
    cli.run(main)

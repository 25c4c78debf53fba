"""The train state (params, optimizer state, streamed memory) and its sharded initialisation.

The optimizer itself is `lm2_jax.train.optimizer`."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from lm2_jax.model import decoder
from lm2_jax.train import optimizer as optlib


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `mem` is the streamed memory (carry="stream"), else an empty array."""

    step: jax.Array
    params: Any
    opt_state: Any
    mem: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create(params, tx: optax.GradientTransformation, mem: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), mem=mem, tx=tx)


def _boxed_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state whose leaves still carry their logical axis names (flax boxes)."""
    model_cfg = config.model
    params = decoder.init_params(model_cfg, jax.random.key(config.train.seed))
    if model_cfg.memory.carry == "stream" and decoder.memory_slots(model_cfg):
        # One memory row per global batch row, sharded like the batch.
        mem = nn.LogicallyPartitioned(decoder.initial_memory(model_cfg, params, config.data.batch_size),
                                      decoder.MEM_BND)
    else:
        mem = jnp.zeros((0,), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), mem=mem, tx=tx)


def abstract_boxed_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
    """The fresh state as ShapeDtypeStructs, leaves still boxed with their logical names."""
    return jax.eval_shape(lambda: _boxed_state(config, tx))


def state_shardings(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """NamedSharding of every leaf of the train state, from the logical names and the rules table.

    Optimizer moments inherit their parameter's names because `tx.init` maps over boxed leaves."""
    from lm2_jax import parallel

    return parallel.shardings(abstract_boxed_state(config, tx), mesh, rules)


def init_state(config: ml_collections.ConfigDict, mesh=None, rules=None, tx=None) -> TrainState:
    """Fresh params (seeded by train.seed), optimizer state and, for carry="stream", memory M_0,
    created by a jit whose outputs already have their shardings: nothing is built whole on one
    device first. Without a mesh: one device."""
    from lm2_jax import parallel

    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
        rules = parallel.DEFAULT_RULES
    tx = tx or optlib.make_optimizer(config.train)
    shardings = state_shardings(config, tx, mesh, rules)
    return jax.jit(lambda: nn.meta.unbox(_boxed_state(config, tx)), out_shardings=shardings)()

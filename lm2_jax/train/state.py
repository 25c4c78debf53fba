"""Train state and optimizer: AdamW with warmup + cosine decay, global-norm clipping, decay masks."""

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

# Leaves that are not weight matrices: RMSNorm scales, gate biases and the learned initial memory.
NO_DECAY = frozenset({"scale", "in_bias", "forget_bias", "memory_init"})


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `mem` is the streamed memory (carry="stream"), else an empty array."""

    step: jax.Array
    params: Any
    opt_state: Any
    mem: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.lr * train.end_lr_frac,
    )


def decay_mask(params) -> Any:
    """True where weight decay applies: every leaf but norms, biases and the memory init."""
    def wanted(path, _):  # the leaf's name: its last dict key (boxed leaves add attribute keys)
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return name not in NO_DECAY

    return jax.tree_util.tree_map_with_path(wanted, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                    weight_decay=train.weight_decay, mask=decay_mask),
    )


def create(params, tx: optax.GradientTransformation, mem: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), mem=mem, tx=tx)


def _boxed_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state whose leaves still carry their logical axis names (flax boxes)."""
    model_cfg = config.model
    params = decoder.init_params(model_cfg, jax.random.key(config.train.seed))
    if model_cfg.memory.carry == "stream" and model_cfg.memory.layers:
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
        mesh, rules = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES), parallel.DEFAULT_RULES
    tx = tx or make_optimizer(config.train)
    shardings = state_shardings(config, tx, mesh, rules)
    return jax.jit(lambda: nn.meta.unbox(_boxed_state(config, tx)), out_shardings=shardings)()

"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Leaves that are not weight matrices: RMSNorm scales, gate biases and the learned initial memory.
NO_DECAY = frozenset({"scale", "in_bias", "forget_bias", "write_bias", "memory_init"})


def schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.lr * train.end_lr_frac,
    )


def _mask(params, wanted) -> Any:
    """`wanted(names)` per leaf, `names` its path's dict keys (boxed leaves add attribute keys)."""
    names = lambda path: [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return jax.tree_util.tree_map_with_path(lambda path, _: wanted(names(path)), params)


def decay_mask(params) -> Any:
    """True where weight decay applies: every leaf but norms, biases and the memory init."""
    return _mask(params, lambda names: names[-1] not in NO_DECAY)


def memory_mask(params) -> Any:
    """True on the LM2 memory modules' parameters (`.../memory/...`; not the backbone's)."""
    return _mask(params, lambda names: "memory" in names)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(train.clip_norm),
             optax.adamw(schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                         weight_decay=train.weight_decay, mask=decay_mask)]
    if train.memory_lr_mult != 1.0:  # Adam's update is lr-proportional: scaling it scales the memory's lr
        parts.append(optax.masked(optax.scale(train.memory_lr_mult), memory_mask))
    return optax.chain(*parts)

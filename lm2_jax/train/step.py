"""Loss and the pure train/eval steps.

A batch is a dict of (B, T) arrays: `tokens` (inputs; the target at t is tokens[t+1]),
`loss_mask` (1 where the target at t counts), `doc_ids` (0 = padding), `positions`.
The loss is reduced inside the segment scan, so B x T x V logits are never materialised.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm2_jax import config as cfglib
from lm2_jax.model import decoder
from lm2_jax.train import vocab_loss
from lm2_jax.train.state import TrainState


def _segmented(a_BT, n_seg: int, S: int):
    B, T = a_BT.shape
    a_BT = jnp.pad(a_BT, ((0, 0), (0, n_seg * S - T)))
    return jnp.swapaxes(a_BT.reshape(B, n_seg, S), 0, 1)


class LossSums(NamedTuple):
    """What `loss_sums` returns: sums over a batch, not means, so micro-batches and hosts add up."""

    ce_sum: jax.Array  # () summed masked cross-entropy
    n_targets: jax.Array  # () number of masked targets (the sum of the loss mask)
    correct_B: jax.Array  # (B,) per row: masked targets that are the argmax of their logits
    targets_B: jax.Array  # (B,) per row: masked targets
    mem_BND: jax.Array  # the final memory, (B, N, D)


def loss_sums(model_cfg: ml_collections.ConfigDict, params, batch: dict, mem_BND=None,
              loss_positions: int = 0) -> LossSums:
    """Masked cross-entropy and exact-match counts of one batch, and the final memory (`LossSums`).

    A row's answer is exactly right under greedy decoding iff every masked target is the argmax
    of its teacher-forced logits, so #correct == #masked is the exact-match of greedy generation.

    `loss_positions = P > 0` projects onto the vocabulary only each row's first P masked positions
    (a QA row's answer and [eos]) instead of all T: the same loss and gradients while no row has
    more than P targets, which the caller must ensure (`check_loss_positions`); on the tiny QA
    config the vocabulary projection at every position was two thirds of the step's FLOPs.
    """
    tokens = batch["tokens"]
    B, T = tokens.shape
    targets_BT = jnp.roll(tokens, -1, axis=1)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    positions, doc_ids = batch.get("positions"), batch.get("doc_ids")

    def reduce(logits_BPV, tgt_BP, m_BP):  # P: the loss positions, or a segment's S
        logp = jax.nn.log_softmax(logits_BPV)
        ce = -jnp.take_along_axis(logp, tgt_BP[..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits_BPV, axis=-1) == tgt_BP).astype(jnp.float32)
        return jnp.sum(ce * m_BP), jnp.sum(m_BP), jnp.sum(hit * m_BP, axis=1), jnp.sum(m_BP, axis=1)

    if loss_positions:
        P = loss_positions
        h_BTD, mem = decoder.forward(model_cfg, params, tokens, positions, doc_ids, mem_BND, hidden=True)
        # Indices of each row's first P masked targets; rows with fewer pad with T - 1 and weight 0.
        # `!= 0` (not `> 0`) keeps a NaN mask a NaN loss.
        idx_BP = jax.vmap(lambda m: jnp.nonzero(m != 0, size=P, fill_value=T - 1)[0])(mask_BT)
        count_B = jnp.sum(mask_BT != 0, axis=1)
        m_BP = jnp.where(jnp.arange(P)[None, :] < count_B[:, None], jnp.take_along_axis(mask_BT, idx_BP, axis=1), 0.0)
        h_BPD = jnp.take_along_axis(h_BTD, idx_BP[..., None], axis=1)
        ce, n, hit_B, n_B = reduce(decoder.project(model_cfg, params, h_BPD),
                                   jnp.take_along_axis(targets_BT, idx_BP, axis=1), m_BP)
        return LossSums(ce, n, hit_B, n_B, mem)

    S = decoder.segment_len(model_cfg, T)
    n_seg = -(-T // S)
    targets, mask = _segmented(targets_BT, n_seg, S), _segmented(mask_BT, n_seg, S)
    head = decoder.head_weight(model_cfg, params)

    def segment_loss(h_BSD, i):
        ce, hit_B = vocab_loss.vocab_ce(h_BSD, head, targets[i], mask[i], model_cfg.tie_embeddings)
        return ce, jnp.sum(mask[i]), hit_B, jnp.sum(mask[i], axis=1)

    (ce, n, hit_B, n_B), mem = decoder.forward(
        model_cfg, params, tokens, positions, doc_ids, mem_BND, segment_fn=segment_loss, hidden=True)
    return LossSums(jnp.sum(ce), jnp.sum(n), jnp.sum(hit_B, 0), jnp.sum(n_B, 0), mem)


def check_loss_positions(loss_mask, loss_positions: int, where: str) -> None:
    """Host-side guard for `loss_positions`: no row of this (numpy) batch may have more targets."""
    if loss_positions:
        most = int(np.max(np.sum(np.asarray(loss_mask) != 0, axis=1)))
        if most > loss_positions:
            raise cfglib.ConfigError("train.loss_positions", loss_positions, f"a row of {where} has {most} loss "
                                     "targets; raise it (0 = logits at every position)")


def _microbatches(tree, k: int):
    """(B, ...) -> (k, B/k, ...) with micro-batch j = rows j, j+k, ...: every device's contiguous
    block of rows holds an equal share of each micro-batch, so the split needs no communication."""
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1), tree)


def _unmicrobatch(a):
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def train_step(config: ml_collections.ConfigDict, state: TrainState, batch: dict):
    """One optimizer update over `train.grad_accum` micro-batches; returns (state, metrics).

    Gradients of the summed CE are accumulated over micro-batches and divided once by the total
    number of masked targets, so k micro-batches give the same update as one batch k times larger.
    """
    model_cfg, k = config.model, config.train.grad_accum
    stream = model_cfg.memory.carry == "stream" and decoder.memory_slots(model_cfg) > 0

    def micro_loss(params, mb, mem):
        sums = loss_sums(model_cfg, params, mb, mem if stream else None, config.train.loss_positions)
        return sums.ce_sum, (sums.n_targets, sums.mem_BND)

    def micro(carry, xs):
        grads, ce, n = carry
        (ce_i, (n_i, new_mem)), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params, *xs)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, ce + ce_i, n + n_i), jax.lax.stop_gradient(new_mem)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    mems = _microbatches(state.mem, k) if stream else jnp.zeros((k,))
    (grads, ce, n), new_mems = jax.lax.scan(micro, (zeros, 0.0, 0.0), (_microbatches(batch, k), mems))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    # The streamed memory crosses the step boundary without gradient (stop_gradient above).
    mem = _unmicrobatch(new_mems) if stream else state.mem
    metrics = {"loss": ce / denom, "tokens": n, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, mem=mem), metrics


def eval_step(config: ml_collections.ConfigDict, params, batch: dict):
    """Summed loss and per-row exact-match counts for one padded QA batch (fresh memory per row)."""
    sums = loss_sums(config.model, params, batch, loss_positions=config.train.loss_positions)
    answered_B = sums.targets_B > 0
    exact = jnp.sum(((sums.correct_B == sums.targets_B) & answered_B).astype(jnp.float32))
    rows = jnp.sum(answered_B.astype(jnp.float32))
    return {"ce": sums.ce_sum, "n": sums.n_targets, "exact": exact, "rows": rows}

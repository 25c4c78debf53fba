"""The pure train step: gradient accumulation, masked loss, streamed memory, decay masks."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm2_jax import config as cfglib
from lm2_jax.train import optimizer as optlib, state as statelib, step as steplib
from tests.conftest import tiny_model


def _config(grad_accum=1, carry="sequence"):
    m = tiny_model(53, layers=1, segment_len=6, carry=carry)
    train = cfglib.train_defaults()
    train.update(dict(grad_accum=grad_accum, lr=1e-2, warmup_steps=0, steps=10))
    config = ml_collections.ConfigDict(dict(model=m, train=train))
    cfglib.validate(config)
    return config


def _batch(B=8, T=18, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 53, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.4).astype(np.float32)
    mask[:, -1] = 0
    doc = np.ones((B, T), np.int32)
    doc[0, 12:] = 0  # a padded tail: different rows have different numbers of targets
    mask[0, 11:] = 0
    positions = np.broadcast_to(np.arange(T), (B, T)).copy()
    return {"tokens": tokens, "loss_mask": mask, "doc_ids": doc, "positions": positions}


def _state(config, batch_rows=8):
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.grad_accum = 1  # accumulation changes the step, not the state
    return _cached_state(config.to_json(), batch_rows)


@functools.cache
def _cached_state(config_json, batch_rows):
    """States are immutable arrays, so tests with the same model and optimizer share one (each
    `init_state` is a compile of its own)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    config.data = ml_collections.ConfigDict({"batch_size": batch_rows})
    return statelib.init_state(config)


def test_four_micro_batches_equal_one_big_batch():
    batch = _batch()
    new = {}
    for k in (1, 4):
        config = _config(grad_accum=k)
        state = _state(config)
        new[k], metrics = jax.jit(functools.partial(steplib.train_step, config))(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    before = jax.tree.leaves(_state(_config()).params)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new[1].params), before))
    assert moved > 1e-4  # the step really updated the parameters
    for a, b in zip(jax.tree.leaves(new[1].params), jax.tree.leaves(new[4].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_loss_is_masked_mean_cross_entropy():
    from lm2_jax.model import decoder

    config = _config()
    params = _state(config).params
    batch = _batch(seed=1)
    sums = steplib.loss_sums(config.model, params, batch)
    ce, n, hit_B = sums.ce_sum, sums.n_targets, sums.correct_B
    logits, _ = decoder.forward(config.model, params, batch["tokens"], batch["positions"], batch["doc_ids"])
    logp = np.asarray(jax.nn.log_softmax(logits))
    tgt = np.roll(batch["tokens"], -1, axis=1)
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(ce), (nll * batch["loss_mask"]).sum(), rtol=1e-5)
    assert float(n) == batch["loss_mask"].sum()
    hits = (logp.argmax(-1) == tgt) * batch["loss_mask"]
    np.testing.assert_array_equal(np.asarray(hit_B), hits.sum(1))


def test_stream_carry_keeps_memory_across_steps_without_gradient():
    config = _config(carry="stream")
    state = _state(config)
    step = jax.jit(functools.partial(steplib.train_step, config))
    mem0 = np.asarray(state.mem)
    state, _ = step(state, _batch(seed=2))
    assert state.mem.shape == mem0.shape and np.abs(np.asarray(state.mem) - mem0).max() > 1e-4
    mem1 = np.asarray(state.mem)
    state2, _ = step(state, _batch(seed=3))
    assert np.abs(np.asarray(state2.mem) - mem1).max() > 1e-4


def test_weight_decay_mask_skips_norms_biases_and_memory_init():
    params = {"embed": 1, "mem_blocks": {"attn_norm": {"scale": 1}, "memory": {"in_bias": 1, "in_gate": 1}},
              "memory_init": 1}
    mask = optlib.decay_mask(params)
    assert mask == {"embed": True, "mem_blocks": {"attn_norm": {"scale": False},
                                                  "memory": {"in_bias": False, "in_gate": True}},
                    "memory_init": False}


def test_memory_lr_mult_scales_only_the_memory_updates():
    config = _config()
    params = _state(config).params
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)
    updates = {}
    for mult in (1.0, 3.0):
        config.train.memory_lr_mult = mult
        tx = optlib.make_optimizer(config.train)
        updates[mult] = tx.update(grads, tx.init(params), params)[0]
    mask = optlib.memory_mask(params)
    flat = lambda tree: jax.tree_util.tree_leaves(tree)
    assert any(flat(mask)) and not all(flat(mask))
    for one, three, is_memory in zip(flat(updates[1.0]), flat(updates[3.0]), flat(mask)):
        assert np.abs(one).max() > 0
        np.testing.assert_allclose(three, one * (3.0 if is_memory else 1.0), rtol=1e-6)


@pytest.mark.parametrize("field,value", [("grad_accum", 0), ("lr", 0.0), ("b2", 1.0), ("end_lr_frac", 2.0),
                                         ("memory_lr_mult", 0.0)])
def test_bad_train_values_are_named(field, value):
    tree = _config().to_dict()
    tree["train"][field] = value
    with pytest.raises(cfglib.ConfigError, match=rf"train\.{field}="):
        cfglib.validate(ml_collections.ConfigDict(tree))


@pytest.mark.parametrize("tie", [True, False])
def test_answer_position_logits_equal_full_logits(tie):
    """`loss_positions=K` projects only each row's first K targets: same loss, counts and gradients
    (to 1e-5) as the vocabulary projection at every position, with rows of 0..K targets."""
    config = _config()
    config.model.tie_embeddings = tie
    params = _state(config).params
    batch = _batch(seed=4)
    mask = np.zeros_like(batch["loss_mask"])
    for row, cols in enumerate([[3], [5, 6, 7], [], [0, 16], [1, 2, 9, 10], [17 - 1], [8], [2, 13]]):
        mask[row, cols] = 1.0
    batch["loss_mask"] = mask
    K = 4
    steplib.check_loss_positions(mask, K, "the test batch")

    def summed(p, k):
        sums = steplib.loss_sums(config.model, p, batch, loss_positions=k)
        return sums.ce_sum, (sums.n_targets, sums.correct_B, sums.targets_B, sums.mem_BND)

    grad = jax.jit(jax.value_and_grad(summed, has_aux=True), static_argnums=1)
    (ce_full, aux_full), g_full = grad(params, 0)
    (ce_k, aux_k), g_k = grad(params, K)
    np.testing.assert_allclose(float(ce_k), float(ce_full), rtol=1e-6, atol=1e-5)
    for a, b in zip(aux_k, aux_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    assert float(aux_k[0]) == mask.sum()
    leaves = jax.tree_util.tree_leaves_with_path(g_full)
    for (path, a), b in zip(leaves, jax.tree.leaves(g_k)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full)) > 1e-3  # not vacuous


def test_loss_positions_guard_names_the_field():
    mask = np.zeros((2, 10), np.float32)
    mask[1, 2:7] = 1
    steplib.check_loss_positions(mask, 5, "batch 1")
    steplib.check_loss_positions(mask, 0, "batch 1")  # 0 = every position: nothing to check
    with pytest.raises(cfglib.ConfigError, match=r"train\.loss_positions=4: a row of batch 1 has 5 loss targets"):
        steplib.check_loss_positions(mask, 4, "batch 1")

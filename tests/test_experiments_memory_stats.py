"""Memory diagnostics: known values on a case worked out by hand, sane ranges on a random one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.experiments.memory_stats import memory_report
from lm2_jax.train import state as statelib
from tests.conftest import tiny_config


def _config(**memory):
    return tiny_config(61, batch_size=4, **dict(dict(layers=2, segment_len=6), **memory))


def _batch(T=15):
    rng = np.random.default_rng(0)
    doc = np.ones((4, T), np.int32)
    doc[1, 6:] = 0  # row 1 has tokens only in segment 0: segments 1 and 2 average rows 0, 2, 3
    mask = np.zeros((4, T), np.int32)
    mask[[0, 1, 2, 3], [13, 4, 12, 10]] = 1
    return {"tokens": rng.integers(1, 61, (4, T)).astype(np.int32), "loss_mask": mask, "doc_ids": doc,
            "positions": np.broadcast_to(np.arange(T), (4, T)).astype(np.int32)}


def test_uniform_read_gives_the_hand_computed_statistics():
    """With zero key weights every token attends 1/N to each slot: entropy 1, max 1/N, all N slots
    used; with zero gate weights g_in = sigmoid(0) and g_f = sigmoid(forget bias)."""
    config = _config(forget_bias_init=2.0)
    params = statelib.init_state(config).params
    mem = params["mem_blocks"]["memory"]
    for name in ("k", "in_gate", "forget_gate"):
        mem[name] = jnp.zeros_like(mem[name])
    report = memory_report(config, params, _batch())
    assert set(report["per_layer"]) == {"layer0", "layer1"}
    for layer in report["per_layer"].values():
        assert len(layer["read_entropy"]) == 3  # 15 tokens in segments of 6
        np.testing.assert_allclose(layer["read_entropy"], 1.0, atol=1e-6)
        np.testing.assert_allclose(layer["read_max"], 1 / 8, atol=1e-6)
        np.testing.assert_allclose(layer["slots_used"], 8.0, atol=1e-4)
        np.testing.assert_allclose(layer["g_in"], 0.5, atol=1e-6)
        np.testing.assert_allclose(layer["g_f"], 1 / (1 + np.exp(-2.0)), atol=1e-6)


def test_random_model_ranges_and_gradient_groups():
    config = _config(write_candidate="tokens", placement="after_attention", normalize_bank=True, top_k=3)
    params = statelib.init_state(config).params
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), params)
    report = memory_report(config, params, _batch())
    for layer in report["per_layer"].values():
        for s in range(3):
            assert 0 <= layer["read_entropy"][s] < 1 and 1 / 8 < layer["read_max"][s] <= 1
            assert 1 <= layer["slots_used"][s] <= 8 + 1e-5
            assert 0 < layer["g_in"][s] < 1 and 0 < layer["g_f"][s] < 1
            assert layer["memory_change_rms"][s] > 0 and layer["read_over_input_rms"][s] > 0
    grads = report["grad_norm"]
    assert {"memory/cand", "memory/q", "memory/k", "memory/in_gate", "memory/forget_gate", "attn", "mlp"} <= set(grads)
    assert all(np.isfinite(v) for v in grads.values()) and grads["memory/cand"] > 0


def test_vanilla_has_nothing_to_inspect():
    config = _config()
    config.model.memory.layers = 0
    with pytest.raises(ValueError, match="memory.layers=0"):
        memory_report(config, statelib.init_state(config).params, _batch())


def test_token_read_scope_is_refused_by_name():
    config = tiny_config(61, batch_size=4, layers=1, segment_len=6, write_rule="delta", write_candidate="tokens",
                         address="slots", read_scope="token")
    with pytest.raises(ValueError, match="model.memory.read_scope='token'"):
        memory_report(config, statelib.init_state(config).params, _batch())

"""Layer-level checks against NumPy: RMSNorm, RoPE's relative-position property, the attention mask."""

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax import config as cfglib
from lm2_jax.model import layers


def test_rmsnorm_matches_numpy():
    cfg = cfglib.model_defaults()
    x = np.random.default_rng(0).normal(size=(2, 5, 128)).astype(np.float32)
    norm = layers.RMSNorm(cfg)
    params = {"params": {"scale": np.linspace(0.5, 1.5, 128, dtype=np.float32)}}
    ours = norm.apply(params, jnp.asarray(x))
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + cfg.norm_eps) * params["params"]["scale"]
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    cfg = cfglib.model_defaults()
    dh = cfg.d_model // cfg.n_heads
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, dh)), jnp.float32) for _ in range(2))

    def score(m, n):
        rot = lambda x, p: layers.apply_rope(x, *layers.rope_tables(cfg, jnp.array([[p]])))
        return float(jnp.sum(rot(q, m) * rot(k, n)))

    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-3
    np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, *layers.rope_tables(cfg, jnp.array([[9]])))),
                               jnp.linalg.norm(q), rtol=1e-6)


def test_attention_mask_is_causal_document_local_and_ignores_padding():
    doc = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(layers.attention_mask(doc))[0]
    ref = np.zeros((5, 5), bool)
    for i in range(5):
        for j in range(i + 1):
            ref[i, j] = doc[0, i] == doc[0, j] and doc[0, j] != 0
    np.testing.assert_array_equal(mask, ref)

"""`vocab_loss.vocab_ce` (blocked projection + CE, gradient in the forward pass) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.train import vocab_loss


def _numpy_ce(h, w, tgt, m, w_last):
    lg = np.einsum("bsd,vd->bsv", h, w) if w_last else np.einsum("bsd,dv->bsv", h, w)
    lg = lg.astype(np.float64)
    lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
    tl = np.take_along_axis(lg, tgt[..., None], -1)[..., 0]
    p = np.exp(lg - lse[..., None])
    g = (p - np.eye(lg.shape[-1])[tgt]) * m[..., None]
    dh = np.einsum("bsv,vd->bsd", g, w) if w_last else np.einsum("bsv,dv->bsd", g, w)
    dw = np.einsum("bsv,bsd->vd", g, h) if w_last else np.einsum("bsd,bsv->dv", h, g)
    hit = (lg.argmax(-1) == tgt).astype(np.float64)
    return np.sum((lse - tl) * m), np.sum(hit * m, 1), dh, dw


@pytest.mark.parametrize("w_last", [True, False])
def test_values_and_gradients_match_numpy(w_last):
    r = np.random.default_rng(0)
    B, S, D, V = 2, 300, 8, 37  # S spans three blocks, the last one partial
    h = r.standard_normal((B, S, D)).astype(np.float32)
    w = r.standard_normal((V, D) if w_last else (D, V)).astype(np.float32)
    tgt = r.integers(0, V, (B, S)).astype(np.int32)
    m = r.integers(0, 2, (B, S)).astype(np.float32)
    want_ce, want_hit, want_dh, want_dw = _numpy_ce(h, w, tgt, m, w_last)
    ce, hit = jax.jit(vocab_loss.vocab_ce, static_argnums=4)(h, w, tgt, m, w_last)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_array_equal(hit, want_hit)

    def scaled(h, w):  # a non-unit cotangent reaches the saved gradients
        return 3.0 * vocab_loss.vocab_ce(h, w, tgt, m, w_last)[0]
    (val, (dh, dw)) = jax.jit(jax.value_and_grad(scaled, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(val, 3 * want_ce, rtol=1e-5)
    np.testing.assert_allclose(dh, 3 * want_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, 3 * want_dw, rtol=1e-4, atol=1e-5)


def test_blocks_cover_the_segment():
    assert vocab_loss.blocks(16) == [(0, 16)]
    assert vocab_loss.blocks(300) == [(0, 128), (128, 256), (256, 300)]
    long = vocab_loss.blocks(8192)
    assert len(long) == vocab_loss.MAX_BLOCKS and long[-1][1] == 8192


def test_nan_weight_gives_nan_loss():
    h, w = jnp.ones((1, 4, 2)), jnp.ones((5, 2))
    m = jnp.asarray([[1.0, jnp.nan, 0.0, 1.0]])
    ce, _ = vocab_loss.vocab_ce(h, w, jnp.zeros((1, 4), jnp.int32), m, True)
    assert np.isnan(float(ce))

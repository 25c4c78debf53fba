"""Layer-level checks against NumPy: RMSNorm, RoPE's relative-position property, the attention mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_attention_mask_block_is_the_slice_of_the_full_mask():
    doc = jnp.array([[1, 1, 2, 2, 2, 0, 3], [1, 1, 1, 1, 1, 1, 1]])
    full = np.asarray(layers.attention_mask(doc))
    np.testing.assert_array_equal(np.asarray(layers.attention_mask(doc, 2, 5, 5)), full[:, 2:5, :5])


def test_query_blocks_cover_the_segment_and_stay_few():
    for S in (1, 7, 128, 129, 1000, 1024, 65536):
        blocks = layers.query_blocks(S)
        assert blocks[0][0] == 0 and blocks[-1][1] == S
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert len(blocks) <= layers.MAX_QUERY_BLOCKS


@pytest.mark.parametrize("S", [5, 128, 300])
def test_blocked_attention_equals_einsum_values_and_gradients(S):
    """The blocked kernel skips keys after each query block; it must equal the full masked softmax,
    with packed documents and padding, in the forward pass and in all three input gradients."""
    rng = np.random.default_rng(S)
    B, K, G, dh = 2, 2, 3, 8
    q = jnp.asarray(rng.standard_normal((B, S, K, G, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, dh)), jnp.float32)
    doc = np.ones((B, S), np.int32)
    doc[0, S // 3:] = 2
    doc[1, S - S // 4:] = 0  # padding at the end of row 1
    doc = jnp.asarray(doc)
    # A padded query attends to nothing, so its output is unspecified (each kernel averages the
    # keys it looks at); it never reaches a loss, so the test weights it zero.
    valid = np.asarray(doc != 0)[:, :, None, None, None]
    w = jnp.asarray(rng.standard_normal((B, S, K, G, dh)) * valid, jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, doc) * w)

    ref, blk = layers.ATTENTION_FNS["einsum"], layers.ATTENTION_FNS["blocked"]
    np.testing.assert_allclose(blk(q, k, v, doc) * valid, ref(q, k, v, doc) * valid, atol=2e-6)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(loss(blk), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("narrow_out", [False, True])
@pytest.mark.parametrize("x_shape, w_shape, n, w_last", [
    ((2, 3, 5), (5, 7), 1, False),  # the MLP's and lm_head's layout
    ((2, 3, 5), (5, 2, 4), 1, False),  # q/k/v: D -> heads x head dim
    ((2, 3, 2, 4), (2, 4, 5), 2, False),  # o: heads x head dim -> D
    ((2, 3, 5), (7, 5), 1, True),  # the tied embedding (V, D)
])
def test_dense_values_and_gradients_are_tensordots(x_shape, w_shape, n, w_last, narrow_out):
    # `dense`'s hand-written backward against NumPy: dx = g · wᵀ, dw = xᵀ · g over the batch-like axes.
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    w_in = tuple(range(w.ndim - n, w.ndim)) if w_last else tuple(range(n))
    y = np.tensordot(x, w, (tuple(range(x.ndim - n, x.ndim)), w_in))
    g = rng.normal(size=y.shape)
    out, vjp = jax.vjp(lambda x, w: layers.dense(x, w, n, w_last, narrow_out), jnp.asarray(x, jnp.float32),
                       jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    w_out = tuple(i for i in range(w.ndim) if i not in w_in)
    lead = tuple(range(x.ndim - n))
    ref_dx = np.tensordot(g, w, (tuple(range(len(lead), g.ndim)), w_out))
    ref_dw = np.tensordot(x, g, (lead, lead))  # (K..., M...)
    if w_last:
        ref_dw = np.moveaxis(ref_dw, tuple(range(n)), tuple(range(w.ndim - n, w.ndim)))
    for ours, ref in ((out, y), (dx, ref_dx), (dw, ref_dw)):
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-5)

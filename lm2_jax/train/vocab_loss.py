"""The vocabulary projection and its cross-entropy, by blocks of positions, with the gradient
computed in the same pass.

The train step's loss is the last thing it computes, so when it is differentiated the logits'
cotangent is known up to one scalar (the incoming cotangent of the summed CE): the forward rule
of `vocab_ce` computes, block by block, the logits, their log-softmax, the softmax minus the
one-hot targets, and from them the hidden states' and the projection's gradients; the backward
rule only scales those by that scalar. No (B, S, V) array is ever built: each block's logits
(B x 128 positions x V: 32 MiB on the bench config) stay in cache for the passes over them, where
the autodiffed log-softmax made six passes over a 268 MiB array and saved it for the backward
(README, performance notes). Without differentiation (evaluation) it computes the loss only.

h_BSD: final-norm hidden states; w: the tied embedding (V, D) with `w_last`, else the head (D, V);
tgt_BS int targets, m_BS float weights (0 = not counted; a NaN weight gives a NaN loss, as before).
Returns (summed weighted CE, per row the weighted count of targets that are their logits' argmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm2_jax.model.layers import dense, row_blocks

Array = jax.Array

BLOCK = 128  # positions per block; more for long segments, so that there are at most MAX_BLOCKS
MAX_BLOCKS = 16


def blocks(S: int) -> list[tuple[int, int]]:
    return row_blocks(S, BLOCK, MAX_BLOCKS)


def _logits(h_BcD, w, w_last):
    """float32 logits of one block, as `decoder.project` computes them."""
    return dense(h_BcD, w.astype(h_BcD.dtype), 1, w_last=w_last).astype(jnp.float32)


def _block_loss(lg_BcV, tgt_Bc, m_Bc):
    mx = jnp.max(lg_BcV, axis=-1, keepdims=True)
    lse_Bc = (mx + jnp.log(jnp.sum(jnp.exp(lg_BcV - mx), axis=-1, keepdims=True)))[..., 0]
    tl_Bc = jnp.take_along_axis(lg_BcV, tgt_Bc[..., None], axis=-1)[..., 0]
    hit_Bc = (jnp.argmax(lg_BcV, axis=-1) == tgt_Bc).astype(jnp.float32)
    return jnp.sum((lse_Bc - tl_Bc) * m_Bc), jnp.sum(hit_Bc * m_Bc, axis=1), lse_Bc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def vocab_ce(h_BSD: Array, w: Array, tgt_BS: Array, m_BS: Array, w_last: bool) -> tuple[Array, Array]:
    ce, hit_B = jnp.zeros((), jnp.float32), jnp.zeros(h_BSD.shape[:1], jnp.float32)
    for lo, hi in blocks(h_BSD.shape[1]):
        ce_c, hit_c, _ = _block_loss(_logits(h_BSD[:, lo:hi], w, w_last), tgt_BS[:, lo:hi], m_BS[:, lo:hi])
        ce, hit_B = ce + ce_c, hit_B + hit_c
    return ce, hit_B


def _fwd(h_BSD, w, tgt_BS, m_BS, w_last):
    V = w.shape[0] if w_last else w.shape[1]
    ce, hit_B = jnp.zeros((), jnp.float32), jnp.zeros(h_BSD.shape[:1], jnp.float32)
    dh_blocks, dw_DV = [], jnp.zeros((h_BSD.shape[2], V), jnp.float32)
    w_c = w.astype(h_BSD.dtype)
    dims = ((2,), (0,)) if w_last else ((2,), (1,))  # g's vocabulary axis against w's
    for lo, hi in blocks(h_BSD.shape[1]):
        h_BcD, m_Bc = h_BSD[:, lo:hi], m_BS[:, lo:hi]
        lg_BcV = _logits(h_BcD, w, w_last)
        ce_c, hit_c, lse_Bc = _block_loss(lg_BcV, tgt_BS[:, lo:hi], m_Bc)
        ce, hit_B = ce + ce_c, hit_B + hit_c
        # d(sum CE)/d logits = (softmax - onehot(target)) * weight
        onehot = jnp.arange(V)[None, None, :] == tgt_BS[:, lo:hi, None]
        g_BcV = ((jnp.exp(lg_BcV - lse_Bc[..., None]) - onehot) * m_Bc[..., None]).astype(h_BSD.dtype)
        dh_blocks.append(jax.lax.dot_general(g_BcV, w_c, (dims, ((), ())), preferred_element_type=jnp.float32))
        # (D, V) in one dot over the block's rows: the small result is transposed at the end, never g.
        dw_DV = dw_DV + jax.lax.dot_general(h_BcD, g_BcV, (((0, 1), (0, 1)), ((), ())),
                                            preferred_element_type=jnp.float32)
    dh_BSD = jnp.concatenate(dh_blocks, axis=1).astype(h_BSD.dtype)
    return (ce, hit_B), (dh_BSD, (dw_DV.T if w_last else dw_DV).astype(w.dtype))


def _bwd(w_last, res, cts):
    dh_BSD, dw = res
    ct_ce = cts[0]  # the argmax counts have no gradient
    return (dh_BSD * ct_ce).astype(dh_BSD.dtype), (dw * ct_ce).astype(dw.dtype), None, None


vocab_ce.defvjp(_fwd, _bwd)

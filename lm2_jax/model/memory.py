"""LM2's memory bank: the gated read and the chained, causal write of DESIGN.md §2.

The math lives in pure functions of arrays (`read`, `route`, `write`); `MemoryModule` only owns
their parameters, so the naive reference in the tests and a future KV-cache decoder can call the
same equations. The memory itself (B x N x D, float32) is never module state: it is passed in and
returned by the decoder's segment scan.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm2_jax.model.layers import dense_init, dtype_of, param
from lm2_jax.parallel import constrain

Array = jax.Array
# Keeps the slot routing finite for a slot no token attended to; it then receives a zero summary.
ROUTE_EPS = 1e-6


def initial_memory(n_slots: int, d_model: int, batch: int) -> Array:
    """M_0 = eye(N, D) for every row, as in the paper."""
    return jnp.broadcast_to(jnp.eye(n_slots, d_model, dtype=jnp.float32), (batch, n_slots, d_model))


def read(x_BSD, mem_BND, wq_DHK, wk_DHK, wv_DHK, wo_HKD, wout_DD, top_k: int):
    """Cross-attention from the tokens to the slots, gated by g_out.

    Returns (g_out ⊙ E_mem, E_mem, A) with A the (B, H, S, N) attention over slots.
    """
    dtype = x_BSD.dtype
    # The memory, its keys/values and E_mem are pinned to the batch layout. Left to propagation,
    # XLA's CPU SPMD partitioner (jaxlib 0.10.2) computed wrong values on a (data, fsdp, tensor) =
    # (2, 2, 2) mesh (rows from the wrong devices in E_mem; wrong gradients into the memory); the
    # 8-device mesh-equivalence test in tests/test_parallel.py guards this.
    mem = constrain(mem_BND.astype(dtype), ("batch", "mem_slots", "act_embed"))
    q = jnp.einsum("bsd,dhk->bhsk", x_BSD, wq_DHK)
    k = constrain(jnp.einsum("bnd,dhk->bhnk", mem, wk_DHK), ("batch", "heads", "mem_slots", "head_dim"))
    v = constrain(jnp.einsum("bnd,dhk->bhnk", mem, wv_DHK), ("batch", "heads", "mem_slots", "head_dim"))
    scores = jnp.einsum("bhsk,bhnk->bhsn", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if top_k:
        kth = jax.lax.top_k(scores, top_k)[0][..., -1:]
        scores = jnp.where(scores >= kth, scores, -jnp.inf)  # softmax over the k best = renormalised top-k
    attn_BHSN = jax.nn.softmax(scores, axis=-1)
    e_mem = jnp.einsum("bhsn,bhnk->bshk", attn_BHSN.astype(dtype), v)
    e_mem_BSD = constrain(jnp.einsum("bshk,hkd->bsd", e_mem, wo_HKD), ("batch", "length", "act_embed"))
    g_out = jax.nn.sigmoid((e_mem_BSD @ wout_DD).astype(jnp.float32)).astype(dtype)
    return constrain(g_out * e_mem_BSD, ("batch", "length", "act_embed")), e_mem_BSD, attn_BHSN


def route(attn_BHSN: Array, valid_BS: Array) -> Array:
    """P (B, N, S): each slot's normalised share of the segment's (valid) tokens."""
    abar_BSN = jnp.mean(attn_BHSN, axis=1) * valid_BS[..., None].astype(jnp.float32)
    colsum_BN = jnp.sum(abar_BSN, axis=1)
    return jnp.swapaxes(abar_BSN, 1, 2) / (colsum_BN[..., None] + ROUTE_EPS)


def write(p_BNS, x_BSD, e_mem_BSD, w_prev_BND, win_DD, bin_D, wf_DD, bf_D, wc_DD=None):
    """W_ℓ = g_in ⊙ candidate + g_f ⊙ W_{ℓ-1}, all in float32.

    g_in is driven by the routed tokens, g_f and the paper's candidate tanh(Ē_mem) by the routed
    memory read; `wc_DD` switches the candidate to routed tokens, tanh(X̄ W_c) (an ablation).
    """
    f32 = jnp.float32
    rows = ("batch", "mem_slots", "act_embed")  # pinned like the read's tensors: see `read`
    xbar = constrain(jnp.einsum("bns,bsd->bnd", p_BNS, x_BSD.astype(f32)), rows)
    ebar = constrain(jnp.einsum("bns,bsd->bnd", p_BNS, e_mem_BSD.astype(f32)), rows)
    g_in = jax.nn.sigmoid(xbar @ win_DD.astype(f32) + bin_D.astype(f32))
    g_f = jax.nn.sigmoid(ebar @ wf_DD.astype(f32) + bf_D.astype(f32))
    cand = jnp.tanh(ebar) if wc_DD is None else jnp.tanh(xbar @ wc_DD.astype(f32))
    return constrain(g_in * cand + g_f * w_prev_BND, rows)


class MemoryModule(nn.Module):
    """Parameters of one memory block: seven D x D matrices (eight with the token candidate)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BSD, mem_BND, w_prev_BND, valid_BS):
        cfg, mcfg = self.cfg, self.cfg.memory
        D, H = cfg.d_model, mcfg.heads
        dh = D // H
        init = dense_init(cfg)
        wq = param(self, "q", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wk = param(self, "k", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wv = param(self, "v", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wo = param(self, "o", init, (H, dh, D), ("heads", "head_dim", "embed"), cfg)
        wout = param(self, "out_gate", init, (D, D), ("embed", "mlp"), cfg)
        gated_BSD, e_mem_BSD, attn_BHSN = read(x_BSD, mem_BND, wq, wk, wv, wo, wout, mcfg.top_k)

        f32 = dtype_of(cfg.param_dtype)
        gate = lambda name: self.param(name, nn.with_logical_partitioning(init, ("embed", "mlp")), (D, D), f32)
        bias = lambda name, value: self.param(
            name, nn.with_logical_partitioning(nn.initializers.constant(value), ("mlp",)), (D,), f32)
        wc = gate("cand") if mcfg.write_candidate == "tokens" else None
        w_new = write(route(attn_BHSN, valid_BS), x_BSD, e_mem_BSD, w_prev_BND,
                      gate("in_gate"), bias("in_bias", 0.0), gate("forget_gate"),
                      bias("forget_bias", mcfg.forget_bias_init), wc)
        return gated_BSD, w_new

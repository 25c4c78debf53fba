"""LM2's memory bank: the gated read and the chained, causal write of docs/design.md §2.

The math lives in pure functions of arrays (`read`, `route`, `write_terms`); `MemoryModule` only owns
their parameters, so the naive reference in the tests and a future KV-cache decoder can call the
same equations. The memory itself (B x N x D, float32) is never module state: it is passed in and
returned by the decoder's segment scan, which starts it from `decoder.initial_memory` (M_0).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm2_jax.model.layers import RMSNorm, dense, dense_init, dtype_of, param
from lm2_jax.parallel import constrain

Array = jax.Array
# Keeps the slot routing finite for a slot no token attended to; it then receives a zero summary.
ROUTE_EPS = 1e-6


def bank_kv(mem_BND, wk_DHDh, wv_DHDh, dtype) -> tuple[Array, Array]:
    """The bank's keys and values (B, H, N, Dh each). They change only when the memory does, so
    generation computes them once per segment instead of once per token (2·N·D² per block)."""
    # The memory, its keys/values and E_mem are pinned to the batch layout. Left to propagation,
    # XLA's CPU SPMD partitioner (jaxlib 0.10.2) computed wrong values on a (data, fsdp, tensor) =
    # (2, 2, 2) mesh (rows from the wrong devices in E_mem; wrong gradients into the memory); the
    # 8-device mesh-equivalence test in tests/test_parallel.py guards this.
    mem = constrain(mem_BND.astype(dtype), ("batch", "mem_slots", "act_embed"))
    k_BHNDh = constrain(jnp.einsum("bnd,dhx->bhnx", mem, wk_DHDh), ("batch", "heads", "mem_slots", "head_dim"))
    v_BHNDh = constrain(jnp.einsum("bnd,dhx->bhnx", mem, wv_DHDh), ("batch", "heads", "mem_slots", "head_dim"))
    return k_BHNDh, v_BHNDh


def read(x_BSD, mem_BND, wq_DHDh, wk_DHDh, wv_DHDh, wo_HDhD, wout_DD, top_k: int, kv=None):
    """Cross-attention from the tokens to the slots, gated by g_out; `kv`: the bank's keys and
    values when already computed (`bank_kv`).

    Returns (g_out ⊙ E_mem, E_mem, A) with A the (B, H, S, N) attention over slots.
    """
    dtype = x_BSD.dtype
    q_BHSDh = jnp.swapaxes(dense(x_BSD, wq_DHDh), 1, 2)
    k_BHNDh, v_BHNDh = bank_kv(mem_BND, wk_DHDh, wv_DHDh, dtype) if kv is None else kv
    scores_BHSN = jnp.einsum("bhsx,bhnx->bhsn", q_BHSDh, k_BHNDh,
                             preferred_element_type=jnp.float32) / math.sqrt(q_BHSDh.shape[-1])
    if top_k:
        kth = jax.lax.top_k(scores_BHSN, top_k)[0][..., -1:]
        # softmax over the k best = renormalised top-k
        scores_BHSN = jnp.where(scores_BHSN >= kth, scores_BHSN, -jnp.inf)
    attn_BHSN = jax.nn.softmax(scores_BHSN, axis=-1)
    e_mem_BSHDh = jnp.einsum("bhsn,bhnx->bshx", attn_BHSN.astype(dtype), v_BHNDh)
    e_mem_BSD = constrain(dense(e_mem_BSHDh, wo_HDhD, 2), ("batch", "length", "act_embed"))
    g_out = jax.nn.sigmoid(dense(e_mem_BSD, wout_DD).astype(jnp.float32)).astype(dtype)
    return constrain(g_out * e_mem_BSD, ("batch", "length", "act_embed")), e_mem_BSD, attn_BHSN


def route(attn_BHSN: Array, valid_BS: Array, mode: str = "normalized") -> Array:
    """P (B, N, S): how much of each (valid) token of the segment each slot receives.

    "normalized" (docs/design.md §2): Āᵀ / column sums, each slot a weighted *average* of the segment,
    full size however little attention it got. "mass": Āᵀ / (number of valid tokens), so a slot
    receives in proportion to the attention its tokens paid it, and a slot nobody addressed gets
    (almost) nothing to write and keeps its content.
    """
    abar_BSN = jnp.mean(attn_BHSN, axis=1) * valid_BS[..., None].astype(jnp.float32)
    if mode == "mass":
        n_valid_B = jnp.sum(valid_BS.astype(jnp.float32), axis=1)
        return jnp.swapaxes(abar_BSN, 1, 2) / jnp.maximum(n_valid_B, 1.0)[:, None, None]
    colsum_BN = jnp.sum(abar_BSN, axis=1)
    return jnp.swapaxes(abar_BSN, 1, 2) / (colsum_BN[..., None] + ROUTE_EPS)


def write_terms(p_BNS, x_BSD, e_mem_BSD, win_DD, bin_D, wf_DD, bf_D, wc_DD=None):
    """(g_in, g_f, candidate), each (B, N, D) float32, from the segment routed to the slots.

    g_in is driven by the routed tokens, g_f and the paper's candidate tanh(Ē_mem) by the routed
    memory read; `wc_DD` switches the candidate to routed tokens, tanh(X̄ W_c) (an ablation).
    """
    f32 = jnp.float32
    rows = ("batch", "mem_slots", "act_embed")  # pinned like the read's tensors: see `read`
    xbar = constrain(jnp.einsum("bns,bsd->bnd", p_BNS, x_BSD.astype(f32)), rows)
    ebar = constrain(jnp.einsum("bns,bsd->bnd", p_BNS, e_mem_BSD.astype(f32)), rows)
    g_in = jax.nn.sigmoid(xbar @ win_DD.astype(f32) + bin_D.astype(f32)[None, None, :])
    g_f = jax.nn.sigmoid(ebar @ wf_DD.astype(f32) + bf_D.astype(f32)[None, None, :])
    cand = jnp.tanh(ebar) if wc_DD is None else jnp.tanh(xbar @ wc_DD.astype(f32))
    return g_in, g_f, cand


def delta_write(attn_BHSN, valid_BS, x_BSD, wc_DD, wb_D, bb, w_prev_BND):
    """`memory.write_rule="delta"`: the segment's tokens write one after another, each moving what
    its address reads toward its own candidate (the delta rule of fast-weight memories):

        M ← M + β_s a_sᵀ (v_s − a_s M),   a_s = the token's read attention over the N slots (mean of
        the heads), v_s = tanh(x_s W_c), β_s = sigmoid(x_s · w_β + b_β) (0 on padding).

    A later move of the same person, addressed like the first, replaces that slot's room instead of
    being blended with every slot's; slots no token addresses keep their content. ‖a_s‖ ≤ 1 and
    β_s ≤ 1 keep each step a contraction toward v_s. Returns (W_ℓ, β_BS, v_BSD) in float32."""
    f32 = jnp.float32
    a_BSN = jnp.mean(attn_BHSN, axis=1).astype(f32)
    v_BSD = jnp.tanh(x_BSD.astype(f32) @ wc_DD.astype(f32))
    beta_BS = jax.nn.sigmoid(x_BSD.astype(f32) @ wb_D.astype(f32) + bb.astype(f32)[0]) * valid_BS.astype(f32)

    def step(m_BND, t):
        a_BN, v_BD, b_B = t
        err_BD = v_BD - jnp.einsum("bn,bnd->bd", a_BN, m_BND)
        return m_BND + (b_B[:, None] * a_BN)[:, :, None] * err_BD[:, None, :], None

    xs = (jnp.swapaxes(a_BSN, 0, 1), jnp.swapaxes(v_BSD, 0, 1), jnp.swapaxes(beta_BS, 0, 1))
    # Unrolled (up to 16 tokens per loop iteration): each step is a few tiny ops, which a rolled
    # loop on CPU pays more for in dispatch than in arithmetic.
    w_BND, _ = jax.lax.scan(step, w_prev_BND.astype(f32), xs, unroll=min(16, x_BSD.shape[1]))
    return constrain(w_BND, ("batch", "mem_slots", "act_embed")), beta_BS, v_BSD


def summary(attn_BHSN, valid_BS, g_in, g_f, cand, gated_BSD, x_BSD, w_prev_BND, w_new_BND) -> dict:
    """Per-row diagnostics of one memory block on one segment (see `lm2_jax.experiments.memory_stats`)."""
    f32 = jnp.float32
    v = valid_BS.astype(f32)
    n_valid = jnp.maximum(jnp.sum(v, axis=1), 1.0)
    N = attn_BHSN.shape[-1]
    ent = -jnp.sum(attn_BHSN * jnp.log(jnp.maximum(attn_BHSN, 1e-30)), axis=-1) / jnp.log(N)  # (B, H, S)
    tok_mean = lambda a_BS: jnp.sum(a_BS * v, axis=1) / n_valid
    mass = jnp.sum(jnp.mean(attn_BHSN, axis=1) * v[..., None], axis=1)  # (B, N) routing mass per slot
    share = mass / jnp.maximum(jnp.sum(mass, axis=1, keepdims=True), 1e-30)
    rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a.astype(f32)), axis=(1, 2)))
    return {
        "valid_tokens": jnp.sum(v, axis=1),
        "read_entropy": tok_mean(jnp.mean(ent, axis=1)),  # 1 = uniform over the N slots
        "read_max": tok_mean(jnp.mean(jnp.max(attn_BHSN, axis=-1), axis=1)),
        "slots_used": jnp.exp(-jnp.sum(share * jnp.log(jnp.maximum(share, 1e-30)), axis=1)),  # effective count
        "g_in": jnp.mean(g_in, axis=(1, 2)),
        "g_f": jnp.mean(g_f, axis=(1, 2)),
        "candidate_rms": rms(cand),
        "read_over_input_rms": rms(gated_BSD) / rms(x_BSD),  # memory output vs the block's normed input
        "memory_rms": rms(w_new_BND),
        "memory_change_rms": rms(w_new_BND - w_prev_BND),
    }


def block_bank_kv(cfg: ml_collections.ConfigDict, memory_params: dict, mem_BND: Array) -> tuple[Array, Array]:
    """`bank_kv` of one memory block from its (unboxed) params, exactly as `MemoryModule` computes
    them: the optional bank RMSNorm, then the key/value projections in the compute dtype."""
    if cfg.memory.normalize_bank:
        mem_BND = RMSNorm(cfg).apply({"params": memory_params["bank_norm"]}, mem_BND)
    dtype = dtype_of(cfg.dtype)
    return bank_kv(mem_BND, jnp.asarray(memory_params["k"], dtype), jnp.asarray(memory_params["v"], dtype), dtype)


class MemoryModule(nn.Module):
    """Parameters of one memory block: seven D x D matrices (eight with the token candidate)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BSD, mem_BND, w_prev_BND, valid_BS, write: bool = True, kv=None):
        """(g_out ⊙ E_mem, W_ℓ). `write=False` (generation inside a segment, whose write runs once
        the segment is complete) skips the write and returns `w_prev_BND` unchanged; `kv`, the
        bank's keys and values computed once for the segment (`bank_kv`), replaces the bank."""
        cfg, mcfg = self.cfg, self.cfg.memory
        D, H = cfg.d_model, mcfg.heads
        dh = D // H
        init = dense_init(cfg)
        wq_DHDh = param(self, "q", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wk_DHDh = param(self, "k", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wv_DHDh = param(self, "v", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wo_HDhD = param(self, "o", init, (H, dh, D), ("heads", "head_dim", "embed"), cfg)
        wout_DD = param(self, "out_gate", init, (D, D), ("embed", "memory_gate"), cfg)
        # Optionally the bank is RMS-normalised before its key/value projections, like every other
        # projection input of a Llama block: M_0 = eye(N, D) has RMS 1/sqrt(D), a normed token RMS 1,
        # so un-normalised reads start ~1e-3 the size of the residual stream (see docs/memory.md).
        bank = RMSNorm(cfg, name="bank_norm")(mem_BND) if mcfg.normalize_bank and kv is None else mem_BND
        gated_BSD, e_mem_BSD, attn_BHSN = read(x_BSD, bank, wq_DHDh, wk_DHDh, wv_DHDh, wo_HDhD, wout_DD, mcfg.top_k,
                                               kv)
        if self.is_mutable_collection("attention"):  # only the memory heatmaps (`lm2_jax.eval memory`) ask
            self.sow("attention", "read", jnp.mean(attn_BHSN, axis=1))
        if not write:
            return gated_BSD, w_prev_BND

        f32 = dtype_of(cfg.param_dtype)
        gate = lambda name: self.param(
            name, nn.with_logical_partitioning(init, ("embed", "memory_gate")), (D, D), f32)
        if mcfg.write_rule == "delta":
            boxed = nn.with_logical_partitioning
            wc = gate("cand")
            wb = self.param("write_strength", boxed(nn.initializers.zeros, ("embed",)), (D,), f32)
            bb = self.param("write_bias", boxed(nn.initializers.constant(mcfg.forget_bias_init), (None,)), (1,), f32)
            w_new, beta_BS, v_BSD = delta_write(attn_BHSN, valid_BS, x_BSD, wc, wb, bb, w_prev_BND)
            if self.is_mutable_collection("intermediates"):
                # g_in: the tokens' write strength; g_f: what a slot keeps of its old content
                keep_BN = jnp.prod(1.0 - beta_BS[:, :, None] * jnp.mean(attn_BHSN, axis=1), axis=1)
                self.sow("intermediates", "summary",
                         summary(attn_BHSN, valid_BS, beta_BS[:, :, None], keep_BN[:, :, None], v_BSD, gated_BSD,
                                 x_BSD, w_prev_BND, w_new))
            return gated_BSD, w_new
        bias = lambda name, value: self.param(
            name, nn.with_logical_partitioning(nn.initializers.constant(value), ("memory_gate",)), (D,), f32)
        wc = gate("cand") if mcfg.write_candidate == "tokens" else None
        route_BNS = route(attn_BHSN, valid_BS, mcfg.routing)
        terms = write_terms(route_BNS, x_BSD, e_mem_BSD, gate("in_gate"), bias("in_bias", 0.0),
                            gate("forget_gate"), bias("forget_bias", mcfg.forget_bias_init), wc)
        g_in, g_f, cand = terms  # W_ℓ = g_in ⊙ candidate + g_f ⊙ W_{ℓ-1}, in float32
        w_new = constrain(g_in * cand + g_f * w_prev_BND, ("batch", "mem_slots", "act_embed"))
        if self.is_mutable_collection("intermediates"):  # only `experiments.memory_stats` asks for these
            self.sow("intermediates", "summary",
                     summary(attn_BHSN, valid_BS, *terms, gated_BSD, x_BSD, w_prev_BND, w_new))
        return gated_BSD, w_new

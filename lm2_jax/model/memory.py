"""LM2's memory bank: the gated read and the chained, causal write of docs/design.md §2.

The math lives in pure functions of arrays (`read`, `route`, `write_terms`); `MemoryModule` only owns
their parameters, so the naive reference in the tests and a future KV-cache decoder can call the
same equations. The memory itself (B x N x D, float32) is never module state: it is passed in and
returned by the decoder's segment scan, which starts it from `decoder.initial_memory` (M_0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def slot_kv(bank_BND, keys_HNDh, wv_DHDh, dtype) -> tuple[Array, Array]:
    """`memory.address="slots"`: the learned slot keys (broadcast over the batch) and the bank's values."""
    v_BHNDh = constrain(jnp.einsum("bnd,dhx->bhnx", bank_BND.astype(dtype), wv_DHDh),
                        ("batch", "heads", "mem_slots", "head_dim"))
    return jnp.broadcast_to(keys_HNDh.astype(dtype), v_BHNDh.shape), v_BHNDh


def address(q_BHSDh, k_BHNDh, top_k: int) -> Array:
    """A (B, H, S, N) float32: each token's softmax attention over the slots (the k best with `top_k`)."""
    scores_BHSN = jnp.einsum("bhsx,bhnx->bhsn", q_BHSDh, k_BHNDh,
                             preferred_element_type=jnp.float32) / math.sqrt(q_BHSDh.shape[-1])
    if top_k:
        kth = jax.lax.top_k(scores_BHSN, top_k)[0][..., -1:]
        # softmax over the k best = renormalised top-k
        scores_BHSN = jnp.where(scores_BHSN >= kth, scores_BHSN, -jnp.inf)
    return jax.nn.softmax(scores_BHSN, axis=-1)


def _out(e_mem_BSHDh, wo_HDhD, wout_DD) -> tuple[Array, Array]:
    """(g_out ⊙ E_mem, E_mem) from the heads' reads."""
    e_mem_BSD = constrain(dense(e_mem_BSHDh, wo_HDhD, 2), ("batch", "length", "act_embed"))
    g_out = jax.nn.sigmoid(dense(e_mem_BSD, wout_DD).astype(jnp.float32)).astype(e_mem_BSD.dtype)
    return constrain(g_out * e_mem_BSD, ("batch", "length", "act_embed")), e_mem_BSD


def read(x_BSD, kv, wq_DHDh, wo_HDhD, wout_DD, top_k: int):
    """Cross-attention from the tokens to the slots, gated by g_out; `kv`: the bank's keys and
    values (`bank_kv` or `slot_kv`, computed once per segment).

    Returns (g_out ⊙ E_mem, E_mem, A) with A the (B, H, S, N) attention over slots.
    """
    dtype = x_BSD.dtype
    q_BHSDh = jnp.swapaxes(dense(x_BSD, wq_DHDh), 1, 2)
    k_BHNDh, v_BHNDh = kv
    attn_BHSN = address(q_BHSDh, k_BHNDh, top_k)
    e_mem_BSHDh = jnp.einsum("bhsn,bhnx->bshx", attn_BHSN.astype(dtype), v_BHNDh)
    return (*_out(e_mem_BSHDh, wo_HDhD, wout_DD), attn_BHSN)


def token_scope(x_BSD, wq_DHDh, keys_HNDh, wv_DHDh, wo_HDhD, wout_DD, top_k: int, delta: Callable):
    """`memory.read_scope="token"`: each token reads the memory as the tokens before it left it,
    those of its own segment included. The addresses come from the learned slot keys alone
    (`address="slots"`), so they are known before the write; `delta(attn_BHSN)` runs the delta
    write and returns (W_ℓ, the tokens' reads (B, S, H, D)): `delta_write`'s reads with `read_eps`,
    times the bank norm's scale. Returns (g_out ⊙ E_mem, W_ℓ, the (B, H, S, N) addresses)."""
    dtype = x_BSD.dtype
    q_BHSDh = jnp.swapaxes(dense(x_BSD, wq_DHDh), 1, 2)
    attn_BHSN = address(q_BHSDh, jnp.broadcast_to(keys_HNDh.astype(dtype), (*q_BHSDh.shape[:2], *keys_HNDh.shape[1:])),
                        top_k)
    w_new, u_BSHD = delta(attn_BHSN)
    # the slots' values are projected after the attention-weighted sum over slots (the same linear map)
    gated_BSD, _ = _out(jnp.einsum("bshd,dhx->bshx", u_BSHD.astype(dtype), wv_DHDh), wo_HDhD, wout_DD)
    return gated_BSD, w_new, attn_BHSN


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


def delta_write(attn_BHSN, valid_BS, x_BSD, wc_DD, wb_D, bb, w_prev_BND, read_eps: float | None = None):
    """`memory.write_rule="delta"`: the segment's tokens write one after another, each moving what
    its address reads toward its own candidate (the delta rule of fast-weight memories):

        M ← M + β_s a_sᵀ (v_s − a_s M),   a_s = the token's read attention over the N slots (mean of
        the heads), v_s = tanh(x_s W_c), β_s = sigmoid(x_s · w_β + b_β) (0 on padding).

    A later move of the same person, addressed like the first, replaces that slot's room instead of
    being blended with every slot's; slots no token addresses keep their content. ‖a_s‖ ≤ 1 and
    β_s ≤ 1 keep each step a contraction toward v_s. Returns (W_ℓ, β_BS, v_BSD) in float32.

    `read_eps` (`read_scope="token"`): also each token's read, before its own write, of the memory
    as the earlier tokens left it, per head at that head's address: (B, S, H, D) float32, the
    attention-weighted sum of the slots, each slot RMS-normalised with this epsilon (0: not
    normalised; the norm's scale, a per-D factor, is left to the caller)."""
    f32 = jnp.float32
    a_BSN = jnp.mean(attn_BHSN, axis=1).astype(f32)
    v_BSD = jnp.tanh(x_BSD.astype(f32) @ wc_DD.astype(f32))
    beta_BS = jax.nn.sigmoid(x_BSD.astype(f32) @ wb_D.astype(f32) + bb.astype(f32)[0]) * valid_BS.astype(f32)

    def step(m_BND, t):
        a_BN, v_BD, b_B, ah_BHN = t
        read_BHD = None
        if read_eps is not None:  # computed here, not from stacked states: half the time on CPU
            if read_eps:
                ah_BHN = ah_BHN * jax.lax.rsqrt(jnp.mean(jnp.square(m_BND), axis=-1) + read_eps)[:, None, :]
            read_BHD = jnp.einsum("bhn,bnd->bhd", ah_BHN, m_BND)
        err_BD = v_BD - jnp.einsum("bn,bnd->bd", a_BN, m_BND)
        return m_BND + (b_B[:, None] * a_BN)[:, :, None] * err_BD[:, None, :], read_BHD

    heads_SBHN = jnp.moveaxis(attn_BHSN.astype(f32), 2, 0) if read_eps is not None else None
    xs = (jnp.swapaxes(a_BSN, 0, 1), jnp.swapaxes(v_BSD, 0, 1), jnp.swapaxes(beta_BS, 0, 1), heads_SBHN)
    # Unrolled (up to 16 tokens per loop iteration): each step is a few tiny ops, which a rolled
    # loop on CPU pays more for in dispatch than in arithmetic.
    w_BND, read_SBHD = jax.lax.scan(step, w_prev_BND.astype(f32), xs, unroll=min(16, x_BSD.shape[1]))
    out = (constrain(w_BND, ("batch", "mem_slots", "act_embed")), beta_BS, v_BSD)
    return (*out, jnp.swapaxes(read_SBHD, 0, 1)) if read_eps is not None else out


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
    wv = jnp.asarray(memory_params["v"], dtype)
    if cfg.memory.address == "slots":
        return slot_kv(mem_BND, jnp.asarray(memory_params["slot_keys"], dtype), wv, dtype)
    return bank_kv(mem_BND, jnp.asarray(memory_params["k"], dtype), wv, dtype)


class NormScale(nn.Module):
    """The scale of an `RMSNorm` (the same parameter, name and layout) without the normalisation:
    the token-scope read normalises the slots inside the write's scan and applies the scale after."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self):
        return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                          (self.cfg.d_model,), dtype_of(self.cfg.param_dtype))


class MemoryModule(nn.Module):
    """Parameters of one memory block: seven D x D matrices (eight with the token candidate); with
    `address="slots"` the key projection is replaced by N learned keys per head."""

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
        head_axes = ("embed", "heads", "head_dim")
        wq_DHDh = param(self, "q", init, (D, H, dh), head_axes, cfg)
        if mcfg.address == "slots":
            # Learned keys, scaled like the content keys of M_0 = eye at init: the address a token
            # reads and writes depends on the token alone, not on what the slot holds.
            keys_HNDh = param(self, "slot_keys", nn.initializers.normal(cfg.init_std * math.sqrt(D)),
                              (H, mcfg.slots, dh), ("heads", "mem_slots", "head_dim"), cfg)
            wk_DHDh = None
        else:
            wk_DHDh = param(self, "k", init, (D, H, dh), head_axes, cfg)
        wv_DHDh = param(self, "v", init, (D, H, dh), head_axes, cfg)
        wo_HDhD = param(self, "o", init, (H, dh, D), ("heads", "head_dim", "embed"), cfg)
        wout_DD = param(self, "out_gate", init, (D, D), ("embed", "memory_gate"), cfg)
        f32 = dtype_of(cfg.param_dtype)
        gate = lambda name: self.param(
            name, nn.with_logical_partitioning(init, ("embed", "memory_gate")), (D, D), f32)
        # Optionally the bank is RMS-normalised before its key/value projections, like every other
        # projection input of a Llama block: M_0 = eye(N, D) has RMS 1/sqrt(D), a normed token RMS 1,
        # so un-normalised reads start ~1e-3 the size of the residual stream (see docs/memory.md).
        norm = (lambda m: RMSNorm(cfg, name="bank_norm")(m)) if mcfg.normalize_bank else (lambda m: m)

        if mcfg.read_scope == "token" and write:
            def delta(attn_BHSN):
                eps = cfg.norm_eps if mcfg.normalize_bank else 0.0
                w_new, _, _, u_BSHD = self._delta_write(attn_BHSN, valid_BS, x_BSD, w_prev_BND, gate, eps)
                if mcfg.normalize_bank:  # RMSNorm's per-D scale commutes with the sum over slots
                    u_BSHD = u_BSHD * jnp.asarray(NormScale(cfg, name="bank_norm")(), u_BSHD.dtype)[None, None, None, :]
                return w_new, u_BSHD

            gated_BSD, w_new, attn_BHSN = token_scope(x_BSD, wq_DHDh, keys_HNDh, wv_DHDh, wo_HDhD, wout_DD,
                                                      mcfg.top_k, delta)
            if self.is_mutable_collection("attention"):
                self.sow("attention", "read", jnp.mean(attn_BHSN, axis=1))
            return gated_BSD, w_new

        if kv is None:
            bank = norm(mem_BND)
            kv = bank_kv(bank, wk_DHDh, wv_DHDh, x_BSD.dtype) if wk_DHDh is not None else \
                slot_kv(bank, keys_HNDh, wv_DHDh, x_BSD.dtype)
        gated_BSD, e_mem_BSD, attn_BHSN = read(x_BSD, kv, wq_DHDh, wo_HDhD, wout_DD, mcfg.top_k)
        if self.is_mutable_collection("attention"):  # only the memory heatmaps (`lm2_jax.eval memory`) ask
            self.sow("attention", "read", jnp.mean(attn_BHSN, axis=1))
        if not write:
            return gated_BSD, w_prev_BND

        if mcfg.write_rule == "delta":
            w_new, beta_BS, v_BSD = self._delta_write(attn_BHSN, valid_BS, x_BSD, w_prev_BND, gate)
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

    def _delta_write(self, attn_BHSN, valid_BS, x_BSD, w_prev_BND, gate, read_eps: float | None = None):
        """`delta_write` with this block's candidate, write strength and bias."""
        D, f32 = self.cfg.d_model, dtype_of(self.cfg.param_dtype)
        boxed = nn.with_logical_partitioning
        wc = gate("cand")
        wb = self.param("write_strength", boxed(nn.initializers.zeros, ("embed",)), (D,), f32)
        bb = self.param("write_bias", boxed(nn.initializers.constant(self.cfg.memory.forget_bias_init), (None,)),
                        (1,), f32)
        return delta_write(attn_BHSN, valid_BS, x_BSD, wc, wb, bb, w_prev_BND, read_eps)

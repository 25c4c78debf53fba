"""Llama-3 building blocks: RMSNorm, RoPE with Llama-3 frequency scaling, GQA attention, SwiGLU.

Every parameter carries logical axis names (mapped to mesh axes by the rules table in
`lm2_jax.parallel`), so the same module shards on any mesh. Norms and softmax run in float32
whatever the compute dtype, as in Hugging Face's Llama, which is the parity oracle.

Dimension legend, for the shape suffixes of names (`x_BSD`) throughout `lm2_jax`; one meaning per
letter:

    B   batch rows                          H   query heads (in the memory read: `memory.heads`)
    T   sequence (a whole row)              K   key/value heads
    S   segment (the tokens one call sees)  G   query heads per KV head, H / K
    D   model width                         Dh  head dim, D / H (`dh` in code)
    N   memory slots                        F   FFN width
    V   vocabulary                          P   loss positions kept per row (`train.loss_positions`)

einsum strings use the same letters in lower case, with `x` for Dh and `u` for the second segment
axis of attention scores (the keys; `s` is the queries). The letters are not cosmetic: jnp.einsum
contracts several dimensions in alphabetical order of their letters, so `x` after `h` keeps the
output projections summing heads before head dims, as they always have.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm2_jax.model import kernels

Array = jax.Array
NEG_INF = float(np.finfo(np.float32).min)


# `model.dtype` / `model.param_dtype`, the one list of their choices (config validation reads it).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    return DTYPES[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(x: Array, w: Array, n: int = 1, w_last: bool = False, narrow_out: bool = False) -> Array:
    """x's last `n` axes contracted with w's first `n` (`w_last`: its last `n`, as the tied embedding
    (V, D) projects to the vocabulary); the other axes of x, then of w, in order. Values as
    `jnp.tensordot`.

    Its backward pass writes the weight gradient as one dot whose output is already in w's layout.
    Differentiating the tensordot instead gives XLA a dot whose output needs a transpose, which the
    CPU compiler moves onto the (batch x sequence)-sized operand as a transpose-copy fusion: 26% of
    the bench step's op time (README, performance notes).

    XLA CPU still copies that dot's first operand into (features x batch-like) order. `narrow_out`
    makes the first operand the output's cotangent instead of x, and transposes the (small) weight
    gradient after: for a projection whose input rows are wider than its output rows and feed no
    other projection (the MLP's down projection: 1536 against 512), that copies a third as much.
    """
    return jnp.tensordot(x, w, (_last(x, n), _first(n) if not w_last else _last(w, n)))


def _first(n):
    return tuple(range(n))


def _last(a, n):
    return tuple(range(a.ndim - n, a.ndim))


def _dense_fwd(x, w, n, w_last, narrow_out):
    return dense(x, w, n, w_last, narrow_out), (x, w)


def _dense_bwd(n, w_last, narrow_out, res, g):
    x, w = res
    m = w.ndim - n  # w's output axes
    lead = tuple(range(x.ndim - n))  # x's batch-like axes, shared with g
    g_out = _last(g, m)
    # dx: g's output axes against w's output axes; dw: the batch-like axes of x and g contracted,
    # the result ordered as w is.
    dx = jnp.tensordot(g, w, (g_out, _last(w, m) if not w_last else _first(m)))
    if narrow_out:
        dw = jnp.tensordot(g, x, (lead, lead))  # (M..., K...)
        m_axes, k_axes = tuple(range(m)), tuple(range(m, m + n))
    else:
        dw = jnp.tensordot(x, g, (lead, lead))  # (K..., M...)
        k_axes, m_axes = tuple(range(n)), tuple(range(n, n + m))
    # Transposing the small result (w's size), never a (batch x sequence)-sized operand: for the
    # tied embedding that would be the logits' gradient.
    order = m_axes + k_axes if w_last else k_axes + m_axes
    if order != tuple(range(dw.ndim)):
        dw = jnp.transpose(dw, order)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dense_init(cfg: ml_collections.ConfigDict):
    return nn.initializers.normal(stddev=cfg.init_std)


def param(module: nn.Module, name: str, init, shape, axes, cfg) -> Array:
    """A parameter with logical axis names, cast to the compute dtype."""
    p = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype_of(cfg.param_dtype))
    return jnp.asarray(p, dtype_of(cfg.dtype))


class RMSNorm(nn.Module):
    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), dtype_of(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return jax.lax.broadcast_to_rank(jnp.asarray(scale, x.dtype), x.ndim) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Inverse RoPE frequencies (Dh/2,), with Llama-3's long-context rescaling if configured.

    Llama-3 scaling leaves high frequencies alone, divides low ones by `factor`, and interpolates
    smoothly in between (Llama 3.1 report, "RoPE scaling").
    """
    dh = cfg.d_model // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    rs = cfg.rope_scaling
    if rs.type == "llama3":
        low_wavelen = rs.original_max_len / rs.low_freq_factor
        high_wavelen = rs.original_max_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        mid = (1 - smooth) * inv / rs.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / rs.factor, np.where(wavelen < high_wavelen, inv, mid))
    return inv.astype(np.float32)


def rope_tables(cfg: ml_collections.ConfigDict, positions_BS: Array) -> tuple[Array, Array]:
    """cos/sin tables (B, S, Dh/2) in float32 for absolute token positions."""
    inv_freq = jax.lax.broadcast_to_rank(jnp.asarray(rope_inv_freq(cfg)), positions_BS.ndim + 1)
    angles = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BSHDh: Array, cos: Array, sin: Array) -> Array:
    """Rotate pairs (i, i + Dh/2) of each head: the half-split layout of Hugging Face Llama.

    `x_BSHDh` holds query heads (H) or key heads (K) alike; `cos`, `sin` are (B, S, Dh/2) tables."""
    half = x_BSHDh.shape[-1] // 2
    x1, x2 = x_BSHDh[..., :half].astype(jnp.float32), x_BSHDh[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSHDh.dtype)


def attention_mask(doc_ids_BS: Array, lo: int = 0, hi: int | None = None, k_hi: int | None = None,
                   shared: bool = False) -> Array:
    """(B, hi - lo, k_hi) boolean for queries [lo, hi) and keys [0, k_hi): causal, same document
    (packing), and never a padded key (doc id 0). Defaults: the whole (B, S, S) mask.

    `shared` (RMT): a negative doc id marks a memory token, which sees and is seen by every
    document of the row (still causally)."""
    S = doc_ids_BS.shape[1]
    hi = S if hi is None else hi
    k_hi = S if k_hi is None else k_hi
    causal = jnp.arange(lo, hi)[:, None] >= jnp.arange(k_hi)[None, :]
    dq, dk = doc_ids_BS[:, lo:hi, None], doc_ids_BS[:, None, :k_hi]
    same = dq == dk
    if shared:
        same = same | (dq < 0) | (dk < 0)
    return causal[None] & same & (dk != 0)


def _einsum_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared=False):
    mask_BSS = attention_mask(doc_ids_BS, shared=shared)
    scores_BKGSS = jnp.einsum("bskgx,bukx->bkgsu", q_BSKGDh, k_BSKDh, preferred_element_type=jnp.float32)
    scores_BKGSS = scores_BKGSS / math.sqrt(q_BSKGDh.shape[-1])
    scores_BKGSS = jnp.where(mask_BSS[:, None, None], scores_BKGSS, NEG_INF)
    probs_BKGSS = jax.nn.softmax(scores_BKGSS, axis=-1).astype(v_BSKDh.dtype)
    return jnp.einsum("bkgsu,bukx->bskgx", probs_BKGSS, v_BSKDh)


# Causal attention cost is dominated on CPU by the elementwise softmax passes over the score
# matrix, not by its matmuls, so the blocked kernel below works on query blocks of this many rows
# against only the keys at or before the block: half the score matrix is never built. Blocks
# grow past it for long segments so the unrolled program stays at most MAX_QUERY_BLOCKS blocks.
QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16


def row_blocks(S: int, block: int, max_blocks: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering S positions: `block` long, longer if that would make more than
    `max_blocks` (a Python loop over them is unrolled into the program)."""
    b = max(block, -(-S // max_blocks))
    return [(lo, min(lo + b, S)) for lo in range(0, S, b)]


def query_blocks(S: int) -> list[tuple[int, int]]:
    """[lo, hi) query ranges of the blocked attention for a segment of S tokens."""
    return row_blocks(S, QUERY_BLOCK, MAX_QUERY_BLOCKS)


def _blocked_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared=False):
    """Exact causal attention by query blocks, skipping every key after a block's last query.

    Heads-major layout so each block's two matmuls are plain batched GEMMs, and the softmax
    normalisation is applied to the (block x Dh) output instead of the (block x keys)
    probabilities: one fewer pass over the scores. A fully masked row (a padded query) averages the
    values of keys [0, end of its block), where the einsum path averages all S; such rows never
    reach a valid output, the memory routing or the loss.

    The backward is written by hand (`_blocked_bwd`) so that no (block x keys) array is ever
    transposed: autodiff's key gradient contracted the score gradient over its query axis, and
    XLA CPU copied that array into key-major order for the dot (a tenth of the vanilla bench
    step's op time, 2026-12-02). Here the key and value gradients are produced transposed,
    (Dh x keys), from dots whose only transposed operand is a (block x Dh) slice.

    The forward saves each block's row max and row sum, not its (block x keys) exponentials: the
    backward recomputes them with one more score dot. Saved, they were a layer's largest residual
    (150 MB at the bench config), copied into and out of the layer scan's stacked buffers; without
    them the vanilla bench step ran about a fifth faster (2026-12-04, README).
    """
    return _blocked(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared):
    return _blocked_fwd(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared)[0]


def _blocked_fwd(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared):
    dh = q_BSKGDh.shape[-1]
    # The score scale is folded into q (an S x Dh pass instead of one over the scores).
    q_BKGSDh = jnp.transpose(q_BSKGDh * jnp.asarray(1.0 / math.sqrt(dh), q_BSKGDh.dtype), (0, 2, 3, 1, 4))
    k_BKSDh = jnp.transpose(k_BSKDh, (0, 2, 1, 3))
    v_BKSDh = jnp.transpose(v_BSKDh, (0, 2, 1, 3))
    outs, maxs, sums = [], [], []
    for lo, hi in query_blocks(q_BSKGDh.shape[1]):
        s = _block_scores(q_BKGSDh, k_BKSDh, attention_mask(doc_ids_BS, lo, hi, hi, shared), lo, hi)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        z = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bkgsu,bkux->bkgsx", e.astype(v_BSKDh.dtype), v_BKSDh[:, :, :hi],
                       preferred_element_type=jnp.float32)
        outs.append((o / z).astype(v_BSKDh.dtype))
        maxs.append(m)
        sums.append(z)
    out_BKGSDh = jnp.concatenate(outs, axis=3)
    res = (q_BKGSDh, k_BKSDh, v_BKSDh, doc_ids_BS, out_BKGSDh, maxs, sums)
    return jnp.transpose(out_BKGSDh, (0, 3, 1, 2, 4)), res


def _block_scores(q_BKGSDh, k_BKSDh, mask_BQK, lo, hi):
    """float32 scores of queries [lo, hi) against keys [0, hi), NEG_INF where `mask_BQK` is False:
    the forward's, and the backward's to recompute the same exponentials from the saved row max."""
    s = jnp.einsum("bkgsx,bkux->bkgsu", q_BKGSDh[:, :, :, lo:hi], k_BKSDh[:, :, :hi],
                   preferred_element_type=jnp.float32)
    return jnp.where(mask_BQK[:, None, None], s, NEG_INF)


def _blocked_bwd(shared, res, g_BSKGDh):
    # Per block, with P = e / z the probabilities (the exponentials, recomputed, over their row sums) and
    # dO the output's cotangent:
    #   dP = dO · vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),  dq = dS · k,  dkᵀ += qᵀ · dS,  dvᵀ += (dO / z)ᵀ · e
    q_BKGSDh, k_BKSDh, v_BKSDh, doc_ids_BS, out_BKGSDh, maxs, sums = res
    B, K, G, S, dh = q_BKGSDh.shape
    g_BKGSDh = jnp.transpose(g_BSKGDh, (0, 2, 3, 1, 4))
    dq_blocks = []
    dk_BKDhS = jnp.zeros((B, K, dh, S), jnp.float32)
    dv_BKDhS = jnp.zeros((B, K, dh, S), jnp.float32)
    for (lo, hi), m, z in zip(query_blocks(S), maxs, sums):
        mask = attention_mask(doc_ids_BS, lo, hi, hi, shared)
        e = jnp.exp(_block_scores(q_BKGSDh, k_BKSDh, mask, lo, hi) - m)
        do = g_BKGSDh[:, :, :, lo:hi]
        delta = jnp.sum(do.astype(jnp.float32) * out_BKGSDh[:, :, :, lo:hi].astype(jnp.float32), -1, keepdims=True)
        dp = jnp.einsum("bkgsx,bkux->bkgsu", do, v_BKSDh[:, :, :hi], preferred_element_type=jnp.float32)
        ds = jnp.where(mask[:, None, None], (e / z) * (dp - delta), 0.0).astype(q_BKGSDh.dtype)
        dq_blocks.append(jnp.einsum("bkgsu,bkux->bkgsx", ds, k_BKSDh[:, :, :hi], preferred_element_type=jnp.float32))
        dk_BKDhS = dk_BKDhS.at[:, :, :, :hi].add(
            jnp.einsum("bkgsx,bkgsu->bkxu", q_BKGSDh[:, :, :, lo:hi], ds, preferred_element_type=jnp.float32))
        do_l = (do.astype(jnp.float32) / z).astype(v_BKSDh.dtype)
        dv_BKDhS = dv_BKDhS.at[:, :, :, :hi].add(
            jnp.einsum("bkgsx,bkgsu->bkxu", do_l, e.astype(v_BKSDh.dtype), preferred_element_type=jnp.float32))
    dq_BKGSDh = jnp.concatenate(dq_blocks, axis=3) * (1.0 / math.sqrt(dh))
    dq = jnp.transpose(dq_BKGSDh, (0, 3, 1, 2, 4)).astype(q_BKGSDh.dtype)
    dk = jnp.transpose(dk_BKDhS, (0, 3, 1, 2)).astype(k_BKSDh.dtype)
    dv = jnp.transpose(dv_BKDhS, (0, 3, 1, 2)).astype(v_BKSDh.dtype)
    return dq, dk, dv, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# `model.attention`, the one list of its kernels (config validation reads it; "auto" picks one of
# them by the mesh's platform, lm2_jax/model/kernels.py).
ATTENTION_FNS = {"blocked": _blocked_attention, "einsum": _einsum_attention,
                 "splash": kernels.splash_attention, "cudnn": kernels.sdpa_attention}


def attention_kernel(cfg: ml_collections.ConfigDict, seg_len: int, platform: str | None) -> str:
    """The kernel's name `cfg.attention` resolves to for segments of `seg_len` on `platform`."""
    return kernels.choose(cfg.attention, platform=platform, kind=cfg.kind, seg_len=seg_len,
                          head_dim=cfg.d_model // cfg.n_heads, dtype=dtype_of(cfg.dtype))


def attention_fn(cfg: ml_collections.ConfigDict, seg_len: int):
    """The kernel `cfg.attention` means for a segment of `seg_len` tokens, under the current mesh."""
    return ATTENTION_FNS[attention_kernel(cfg, seg_len, kernels.mesh_platform())]


def cached_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, cache):
    """Attention of S new tokens against the current segment's KV cache, the new keys written in.

    `cache` = (k_BCKDh, v_BCKDh, doc_BC, index_B): C cache positions (the segment length), the doc
    ids of the cache *after* this call's tokens are written (0 = empty), and where row b's new tokens
    start. The new keys land at positions index_B + [0, S) (a one-hot product: exact in float32).
    Returns the attention output and the updated (k_BCKDh, v_BCKDh).
    """
    k_BCKDh, v_BCKDh, doc_BC, index_B = cache
    B, S, K, G, dh = q_BSKGDh.shape
    C = k_BCKDh.shape[1]
    pos_BS = index_B[:, None] + jnp.arange(S)[None, :]
    onehot_BSC = pos_BS[:, :, None] == jnp.arange(C)[None, None, :]
    written_BC = jnp.any(onehot_BSC, axis=1)[:, :, None, None]
    put = lambda new_BSKDh, old_BCKDh: jnp.where(
        written_BC, jnp.einsum("bsc,bskx->bckx", onehot_BSC.astype(new_BSKDh.dtype), new_BSKDh), old_BCKDh)
    k_BCKDh, v_BCKDh = put(k_BSKDh, k_BCKDh), put(v_BSKDh, v_BCKDh)
    mask_BSC = ((jnp.arange(C)[None, None, :] <= pos_BS[:, :, None]) & (doc_BC[:, None, :] == doc_ids_BS[:, :, None])
                & (doc_BC[:, None, :] != 0))
    scores_BKGSC = jnp.einsum("bskgx,bckx->bkgsc", q_BSKGDh, k_BCKDh, preferred_element_type=jnp.float32)
    scores_BKGSC = scores_BKGSC / math.sqrt(dh)
    scores_BKGSC = jnp.where(mask_BSC[:, None, None], scores_BKGSC, NEG_INF)
    probs_BKGSC = jax.nn.softmax(scores_BKGSC, axis=-1).astype(v_BCKDh.dtype)
    return jnp.einsum("bkgsc,bckx->bskgx", probs_BKGSC, v_BCKDh), (k_BCKDh, v_BCKDh)


class Attention(nn.Module):
    """Grouped-query self-attention inside one segment (causal, document-masked).

    With `cache` (generation, see `cached_attention`) it returns (output, updated keys and values)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BSD, cos, sin, doc_ids_BS, cache=None):
        cfg = self.cfg
        D, H, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        dh = D // H
        init = dense_init(cfg)
        wq_DHDh = param(self, "q", init, (D, H, dh), ("embed", "heads", "head_dim"), cfg)
        wk_DKDh = param(self, "k", init, (D, K, dh), ("embed", "kv_heads", "head_dim"), cfg)
        wv_DKDh = param(self, "v", init, (D, K, dh), ("embed", "kv_heads", "head_dim"), cfg)
        wo_HDhD = param(self, "o", init, (H, dh, D), ("heads", "head_dim", "embed"), cfg)
        q_BSHDh = apply_rope(dense(x_BSD, wq_DHDh), cos, sin)
        k_BSKDh = apply_rope(dense(x_BSD, wk_DKDh), cos, sin)
        v_BSKDh = dense(x_BSD, wv_DKDh)
        B, S = x_BSD.shape[:2]
        q_BSKGDh = q_BSHDh.reshape(B, S, K, H // K, dh)  # query heads grouped under their shared KV head
        project = lambda out_BSKGDh: dense(out_BSKGDh.reshape(B, S, H, dh), wo_HDhD, 2)
        if cache is not None and S == cache[0].shape[1]:
            # A whole segment from its start (generation's prefill): the cache is exactly this
            # segment's keys and values, and the output is the training kernel's (which never builds
            # the full S x S scores the cached path would).
            return project(attention_fn(cfg, S)(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS)), (k_BSKDh, v_BSKDh)
        if cache is not None:
            out_BSKGDh, kv = cached_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, cache)
            return project(out_BSKGDh), kv
        return project(attention_fn(cfg, S)(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, cfg.kind == "rmt"))


def _conv_taps(x_BSD: Array, doc_ids_BS: Array, pos_BS: Array, w_KD: Array, hist) -> Array:
    """sum_j w_j * x_{t-j} over the taps j < K whose token is in the same document, for the tokens
    at positions `pos_BS` of a segment whose (normed inputs, doc ids) so far are `hist`."""
    x_BCD, doc_BC = hist
    out = jnp.zeros(x_BSD.shape, jnp.float32)
    for j in range(w_KD.shape[0]):
        src_BS = pos_BS - j
        ok_BS = (src_BS >= 0) & (jnp.take_along_axis(doc_BC, jnp.maximum(src_BS, 0), axis=1) == doc_ids_BS)
        x_j = jnp.take_along_axis(x_BCD, jnp.maximum(src_BS, 0)[..., None], axis=1).astype(jnp.float32)
        out = out + jnp.where(ok_BS[..., None], x_j * w_KD[j].astype(jnp.float32)[None, None, :], 0.0)
    return out.astype(x_BSD.dtype)


class SegmentConv(nn.Module):
    """Causal depthwise convolution of the normed block input over the last `conv_width` tokens of
    the same document *within the segment* (so only the memory crosses segments). Taps start equal
    (1/K): from the first step every token carries a bag of its neighbourhood ("Mary went to the
    kitchen" at "kitchen"), which self-attention and the memory write can key on directly; without it
    a tiny model must first grow a previous-token head, the long plateau of docs/memory.md.

    With `cache` = (x_BCD, doc_BC, index_B) (generation: the segment's normed inputs so far) it
    returns (output, updated x_BCD)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BSD, doc_ids_BS, cache=None):
        K, D = self.cfg.conv_width, x_BSD.shape[-1]
        w_KD = self.param("taps", nn.with_logical_partitioning(nn.initializers.constant(1.0 / K), (None, "embed")),
                          (K, D), dtype_of(self.cfg.param_dtype))
        B, S = doc_ids_BS.shape
        if cache is None:  # the whole segment: shifted copies (no gathers in the backward pass)
            out = jnp.zeros(x_BSD.shape, jnp.float32)
            for j in range(K):
                x_j = jnp.pad(x_BSD, ((0, 0), (j, 0), (0, 0)))[:, :S].astype(jnp.float32)
                same_BS = jnp.pad(doc_ids_BS, ((0, 0), (j, 0)), constant_values=-1)[:, :S] == doc_ids_BS
                out = out + jnp.where(same_BS[..., None], x_j * w_KD[j].astype(jnp.float32)[None, None, :], 0.0)
            return out.astype(x_BSD.dtype)
        x_BCD, doc_BC, index_B = cache
        C = x_BCD.shape[1]
        pos_BS = index_B[:, None] + jnp.arange(S)[None, :]
        onehot_BSC = pos_BS[:, :, None] == jnp.arange(C)[None, None, :]
        written_BC1 = jnp.any(onehot_BSC, axis=1)[..., None]
        x_BCD = jnp.where(written_BC1, jnp.einsum("bsc,bsd->bcd", onehot_BSC.astype(x_BSD.dtype), x_BSD), x_BCD)
        return _conv_taps(x_BSD, doc_ids_BS, pos_BS, w_KD, (x_BCD, doc_BC)), x_BCD


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BSD):
        cfg = self.cfg
        init = dense_init(cfg)
        wg_DF = param(self, "gate", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
        wu_DF = param(self, "up", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
        wd_FD = param(self, "down", init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg)
        h_BSF = nn.silu(dense(x_BSD, wg_DF)) * dense(x_BSD, wu_DF)
        return dense(h_BSF, wd_FD, narrow_out=True)

"""An independent, naive NumPy reference of LM2 (docs/design.md §2), checked against the JAX model.

The reference is written from the equations, not from the package's code: float64 NumPy, explicit
Python loops over rows, segments, blocks and tokens (and heads), with only the matmuls inside one
token vectorised. It reads the package's parameter tree (layout only) and calls
`decoder.forward` as the model under test; nothing else from `lm2_jax.model` is used.

Tolerance: logits and final memory must match to 1e-5 absolute (rtol=0), model in float32.
Logits at padded positions (doc id 0) are not compared: a padded query has no keys, so its output
is unspecified by the contract.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import config as cfglib
from lm2_jax.model import decoder
from tests.conftest import tiny_model

ATOL = 1e-5
ROUTE_EPS = 1e-6  # ε of docs/design.md §2 in R = Āᵀ / (column sums of Ā + ε)
B, T, SEG = 2, 13, 5  # 3 segments, the last one partial (3 tokens + 2 of padding)


# ----------------------------------------------------------------------------- configs and params


def make_cfg(L_m, *, n_layers=3, top_k=0, candidate="memory", tie=True, rope="none", segment_len=SEG,
             placement="parallel", normalize_bank=False, routing="normalized", conv_width=0, write_rule="gated",
             address="content", read_scope="segment"):
    m = tiny_model(97, n_layers, layers=L_m, top_k=top_k, write_candidate=candidate, segment_len=segment_len,
                   placement=placement, normalize_bank=normalize_bank, routing=routing, write_rule=write_rule,
                   address=address, read_scope=read_scope)
    m.tie_embeddings = tie
    m.conv_width = conv_width
    m.rope_theta = 10000.0
    if rope == "llama3":
        # dh = 8: inv_freq = 1, .1, .01, .001, wavelengths 6.3, 63, 628, 6283. With these settings
        # the first is kept, the second is interpolated, the last two are divided by `factor`.
        m.rope_scaling.update(dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_len=64))
    cfglib.validate_model(m)
    return m


def _leaf_name(path):
    return str(getattr(path[-1], "key", path[-1]))


def random_params(cfg, seed):
    """The model's own parameter tree, every leaf replaced by non-trivial random values (float32)."""
    # Only the tree layout and shapes are needed, so trace the init without running it.
    params = jax.eval_shape(lambda: flax.linen.meta.unbox(decoder.init_params(cfg, jax.random.key(0))))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name, shape = _leaf_name(path), leaf.shape
        if name == "scale":  # RMSNorm scales
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "in_bias":
            value = 0.5 * rng.standard_normal(shape)
        elif name == "forget_bias":
            value = 1.0 + 0.5 * rng.standard_normal(shape)
        elif name in ("embed", "lm_head"):  # keeps the logits O(1): max |logit| about 2-3
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = 0.2 * rng.standard_normal(shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


def to_numpy64(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def block_params(params, cfg, layer):
    """Parameters of decoder block `layer` (0-based): memory blocks first, then the plain ones."""
    L_m = cfg.memory.layers
    stack, idx = (params["mem_blocks"], layer) if layer < L_m else (params["blocks"], layer - L_m)
    return jax.tree_util.tree_map(lambda a: a[idx], stack)


# ----------------------------------------------------------------------------- the naive reference


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def rms_norm(v, scale, eps):
    """One token's RMSNorm."""
    return v / math.sqrt(float(np.mean(v * v)) + eps) * scale


def ref_inv_freq(cfg):
    dh = cfg.d_model // cfg.n_heads
    inv = [1.0 / cfg.rope_theta ** (2 * i / dh) for i in range(dh // 2)]
    rs = cfg.rope_scaling
    if rs.type == "llama3":
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < rs.original_max_len / rs.high_freq_factor:
                out.append(f)
            elif wavelen > rs.original_max_len / rs.low_freq_factor:
                out.append(f / rs.factor)
            else:
                smooth = ((rs.original_max_len / wavelen - rs.low_freq_factor)
                          / (rs.high_freq_factor - rs.low_freq_factor))
                out.append((1 - smooth) * f / rs.factor + smooth * f)
        inv = out
    return np.array(inv, np.float64)


def rope(vec, pos, inv_freq):
    """Rotate one head vector: pair (i, i + dh/2) by angle pos * inv_freq[i]."""
    half = vec.shape[0] // 2
    out = np.empty_like(vec)
    for i in range(half):
        c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
        a, b = vec[i], vec[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def softmax_topk(scores, top_k):
    keep = np.ones(scores.shape, bool)
    if top_k:
        keep[:] = False
        keep[np.argsort(-scores)[:top_k]] = True
    e = np.where(keep, np.exp(scores - scores[keep].max()), 0.0)
    return e / e.sum()


def self_attention(cfg, p, x, pos, doc, inv_freq, shared=None):
    """Causal GQA self-attention over the tokens of one segment (x: list of normed token vectors).
    `shared[j]` (RMT's memory tokens): token j sees, and is seen by, every document."""
    H, KV = cfg.n_heads, cfg.n_kv_heads
    dh = cfg.d_model // H
    group = H // KV
    n = len(x)
    q = [[rope(x[t] @ p["q"][:, h, :], pos[t], inv_freq) for h in range(H)] for t in range(n)]
    k = [[rope(x[t] @ p["k"][:, g, :], pos[t], inv_freq) for g in range(KV)] for t in range(n)]
    v = [[x[t] @ p["v"][:, g, :] for g in range(KV)] for t in range(n)]
    out = []
    for t in range(n):
        keys = [j for j in range(t + 1)
                if doc[j] != 0 and (doc[j] == doc[t] or (shared is not None and (shared[j] or shared[t])))]
        o = np.zeros(cfg.d_model)
        for h in range(H):
            if not keys:  # a padded query: nothing to attend to (its output is never compared)
                continue
            g = h // group
            scores = np.array([q[t][h] @ k[j][g] for j in keys]) / math.sqrt(dh)
            a = np.exp(scores - scores.max())
            a /= a.sum()
            head = sum(a[i] * v[j][g] for i, j in enumerate(keys))
            o = o + head @ p["o"][h]
        out.append(o)
    return out


def ffn(cfg, bp, v):
    """One token's residual MLP step: v + down(silu(gate(x)) * up(x)), x = RMSNorm(v)."""
    x2 = rms_norm(v, bp["mlp_norm"]["scale"], cfg.norm_eps)
    z = x2 @ bp["mlp"]["gate"]
    return v + ((z * sigmoid(z)) * (x2 @ bp["mlp"]["up"])) @ bp["mlp"]["down"]


def memory_read(cfg, mp, x, M):
    """Per token: E_mem (D,), attention over slots per memory head (H_m, N), and g_out ⊙ E_mem."""
    Hm = cfg.memory.heads
    dh = cfg.d_model // Hm
    if cfg.memory.normalize_bank:  # keys and values from the RMS-normalised slots
        M = np.stack([rms_norm(row, mp["bank_norm"]["scale"], cfg.norm_eps) for row in M])
    # N x dh per head: projections of the slots, or (address="slots") the slots' own learned keys
    K = [mp["slot_keys"][h] if cfg.memory.address == "slots" else M @ mp["k"][:, h, :] for h in range(Hm)]
    V = [M @ mp["v"][:, h, :] for h in range(Hm)]
    E, A, gated = [], [], []
    for t in range(len(x)):
        e = np.zeros(cfg.d_model)
        attn = np.zeros((Hm, M.shape[0]))
        for h in range(Hm):
            scores = K[h] @ (x[t] @ mp["q"][:, h, :]) / math.sqrt(dh)
            attn[h] = softmax_topk(scores, cfg.memory.top_k)
            e = e + (attn[h] @ V[h]) @ mp["o"][h]
        E.append(e)
        A.append(attn)
        gated.append(sigmoid(e @ mp["out_gate"]) * e)
    return E, A, gated


def memory_token_scope(cfg, mp, x, valid, W_prev):
    """`read_scope="token"`: token after token, read the memory as it stands (the earlier tokens'
    writes, this segment's included), then write into it. Returns (g_out ⊙ E_mem per token, W_ℓ)."""
    W, gated = W_prev.copy(), []
    for t in range(len(x)):
        _, A, g = memory_read(cfg, mp, x[t:t + 1], W)
        gated.append(g[0])
        W = memory_write(cfg, mp, x[t:t + 1], None, A, valid[t:t + 1], W)
    return gated, W


def memory_block(cfg, mp, x, M, valid, W_prev):
    """One memory block on a segment: (g_out ⊙ E_mem per token, W_ℓ); reads the snapshot M, or with
    `read_scope="token"` the memory as it stands at each token."""
    if cfg.memory.read_scope == "token":
        return memory_token_scope(cfg, mp, x, valid, W_prev)
    E, A, gated = memory_read(cfg, mp, x, M)
    return gated, memory_write(cfg, mp, x, E, A, valid, W_prev)


def memory_write(cfg, mp, x, E, A, valid, W_prev):
    """W_ℓ = g_in ⊙ candidate + g_f ⊙ W_{ℓ-1} with the segment routed to the slots by P; with
    `write_rule="delta"`, token after token, each slot s moved by β a_s (v − Σ_r a_r W_r)."""
    n, N = len(x), W_prev.shape[0]
    if cfg.memory.write_rule == "delta":
        W = W_prev.copy()
        for t in range(n):
            if not valid[t]:
                continue
            a = A[t].mean(axis=0)  # the token's read address, averaged over memory heads
            v = np.tanh(x[t] @ mp["cand"])
            beta = sigmoid(x[t] @ mp["write_strength"] + mp["write_bias"][0])
            read = sum(a[r] * W[r] for r in range(N))
            W = np.stack([W[r] + beta * a[r] * (v - read) for r in range(N)])
        return W
    Abar = np.zeros((n, N))
    for t in range(n):
        if valid[t]:
            Abar[t] = A[t].mean(axis=0)
    colsum = Abar.sum(axis=0)
    W = np.empty_like(W_prev)
    for s in range(N):
        if cfg.memory.routing == "mass":  # in proportion to the attention paid, per valid token
            P_s = Abar[:, s] / max(sum(valid), 1)
        else:  # each slot a weighted average of the segment
            P_s = Abar[:, s] / (colsum[s] + ROUTE_EPS)
        xbar = sum(P_s[t] * x[t] for t in range(n))
        ebar = sum(P_s[t] * E[t] for t in range(n))
        g_in = sigmoid(xbar @ mp["in_gate"] + mp["in_bias"])
        g_f = sigmoid(ebar @ mp["forget_gate"] + mp["forget_bias"])
        cand = np.tanh(ebar) if cfg.memory.write_candidate == "memory" else np.tanh(xbar @ mp["cand"])
        W[s] = g_in * cand + g_f * W_prev[s]
    return W


def ref_forward(cfg, params, tokens, positions=None, doc_ids=None, mem=None):
    """Naive LM2 over (B, T) tokens; returns logits (B, T, V) and the final memory (B, N, D)."""
    P = to_numpy64(params)
    tokens = np.asarray(tokens)
    nb, nt = tokens.shape
    positions = np.broadcast_to(np.arange(nt), (nb, nt)) if positions is None else np.asarray(positions)
    doc_ids = np.ones((nb, nt), int) if doc_ids is None else np.asarray(doc_ids)
    L, L_m, eps = cfg.n_layers, cfg.memory.layers, cfg.norm_eps
    N = cfg.memory.slots if L_m else 0
    S = cfg.memory.segment_len or nt
    inv_freq = ref_inv_freq(cfg)
    blocks = [block_params(P, cfg, layer) for layer in range(L)]
    head = P["embed"].T if cfg.tie_embeddings else P["lm_head"]

    logits = np.zeros((nb, nt, cfg.vocab_size))
    mem_out = np.zeros((nb, N, cfg.d_model))
    for b in range(nb):
        M = np.eye(N, cfg.d_model) if mem is None else np.asarray(mem[b], np.float64)
        for start in range(0, nt, S):
            idx = list(range(start, min(start + S, nt)))  # a partial last segment: its real tokens only
            pos = [int(positions[b, t]) for t in idx]
            doc = [int(doc_ids[b, t]) for t in idx]
            valid = [d != 0 for d in doc]
            h = [P["embed"][tokens[b, t]].copy() for t in idx]
            W = M  # the write chain starts from the snapshot; every block reads the snapshot M
            for layer, bp in enumerate(blocks):
                x = [rms_norm(v, bp["attn_norm"]["scale"], eps) for v in h]
                if cfg.conv_width:  # taps over the same document's earlier tokens of this segment only
                    w = bp["conv"]["taps"]
                    x = [sum(w[j] * x[i - j] for j in range(cfg.conv_width) if i - j >= 0 and doc[i - j] == doc[i])
                         for i in range(len(idx))]
                attn = self_attention(cfg, bp["attn"], x, pos, doc, inv_freq)
                if layer < L_m and cfg.memory.placement == "parallel":  # beside self-attention, from x
                    gated, W = memory_block(cfg, bp["memory"], x, M, valid, W)
                    h = [h[i] + attn[i] + gated[i] for i in range(len(idx))]
                elif layer < L_m:  # after self-attention, from the normed residual
                    h = [h[i] + attn[i] for i in range(len(idx))]
                    xm = [rms_norm(v, bp["memory_norm"]["scale"], eps) for v in h]
                    gated, W = memory_block(cfg, bp["memory"], xm, M, valid, W)
                    h = [h[i] + gated[i] for i in range(len(idx))]
                else:
                    h = [h[i] + attn[i] for i in range(len(idx))]
                h = [ffn(cfg, bp, v) for v in h]
            if any(valid):
                M = W
            for i, t in enumerate(idx):
                logits[b, t] = rms_norm(h[i], P["final_norm"]["scale"], eps) @ head
        mem_out[b] = M
    return logits, mem_out


# ----------------------------------------------------------------------------- model under test


def model_forward(cfg, params, tokens, positions=None, doc_ids=None, mem=None):
    fn = jax.jit(lambda p, tok, pos, doc, m: decoder.forward(cfg, p, tok, positions_BT=pos, doc_ids_BT=doc, mem_BND=m))
    as_jnp = lambda a, dt: None if a is None else jnp.asarray(a, dt)
    logits, mem_out = fn(params, jnp.asarray(tokens, jnp.int32), as_jnp(positions, jnp.int32),
                         as_jnp(doc_ids, jnp.int32), as_jnp(mem, jnp.float32))
    return np.asarray(logits, np.float64), np.asarray(mem_out, np.float64)


def assert_close(name, got, want, mask=None):
    if mask is not None:
        got, want = got[mask], want[mask]
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= ATOL, f"{name}: max |model - reference| = {err:.3e} > {ATOL:g}"


def check(cfg, seed, positions=None, doc_ids=None, mem=None):
    params = random_params(cfg, seed)
    tokens = np.random.default_rng(seed + 1).integers(1, cfg.vocab_size, (B, T))
    got_logits, got_mem = model_forward(cfg, params, tokens, positions, doc_ids, mem)
    ref_logits, ref_mem = ref_forward(cfg, params, tokens, positions, doc_ids, mem)
    valid = np.ones((B, T), bool) if doc_ids is None else np.asarray(doc_ids) != 0
    assert got_logits.shape == (B, T, cfg.vocab_size)
    assert_close("logits", got_logits, ref_logits, valid)
    assert got_mem.shape == ref_mem.shape
    assert_close("memory", got_mem, ref_mem)
    return params, tokens, ref_logits, ref_mem


# ----------------------------------------------------------------------------- tests

CASES = {
    # name: (L_m, top_k, write_candidate, tie_embeddings, rope_scaling[, placement, normalize_bank, routing,
    #        write_rule, address, read_scope])
    "vanilla": (0, 0, "memory", True, "none"),
    "Lm1-full-memory": (1, 0, "memory", True, "none"),
    "Lm1-topk-tokens-untied": (1, 3, "tokens", False, "none"),
    "Lm3-full-tokens": (3, 0, "tokens", True, "none"),
    "Lm3-topk-memory": (3, 3, "memory", False, "none"),
    "Lm3-topk-tokens-llama3rope": (3, 2, "tokens", True, "llama3"),
    "Lm1-after-attention-normbank-tokens": (1, 0, "tokens", True, "none", "after_attention", True),
    "Lm2-after-attention-topk-memory": (2, 3, "memory", True, "none", "after_attention", False),
    "Lm3-normbank-topk-memory": (3, 2, "memory", False, "none", "parallel", True),
    "Lm2-mass-routing-after-attention-normbank-tokens": (2, 0, "tokens", True, "none", "after_attention", True, "mass"),
    "Lm3-mass-routing-topk-memory": (3, 3, "memory", True, "none", "parallel", False, "mass"),
    "Lm2-delta-write-normbank": (2, 0, "tokens", True, "none", "parallel", True, "normalized", "delta"),
    "Lm1-delta-write-topk-after-attention": (1, 2, "tokens", False, "none", "after_attention", False, "normalized",
                                             "delta"),
    "Lm2-slot-keys-gated-normbank": (2, 0, "memory", True, "none", "parallel", True, "normalized", "gated", "slots"),
    "Lm1-slot-keys-delta-token-scope-normbank": (1, 0, "tokens", True, "none", "parallel", True, "normalized", "delta",
                                                 "slots", "token"),
    "Lm1-token-scope-topk-after-attention": (1, 2, "tokens", False, "none", "after_attention", False, "normalized",
                                             "delta", "slots", "token"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    L_m, top_k, cand, tie, rope_type, *where = CASES[name]
    defaults = ["parallel", False, "normalized", "gated", "content", "segment"]
    placement, normalize_bank, routing, rule, address, scope = list(where) + defaults[len(where):]
    cfg = make_cfg(L_m, top_k=top_k, candidate=cand, tie=tie, rope=rope_type, placement=placement,
                   normalize_bank=normalize_bank, routing=routing, write_rule=rule, address=address, read_scope=scope)
    _, _, _, ref_mem = check(cfg, seed=len(name))
    if L_m:  # the memory really evolved, so the comparison is not vacuous
        assert np.max(np.abs(ref_mem - np.eye(8, 32))) > 0.1


def test_llama3_rope_exercises_every_branch():
    """Guard for the llama3 case above: its inv_freq has a kept, an interpolated and a divided entry."""
    cfg = make_cfg(3, rope="llama3")
    base = ref_inv_freq(make_cfg(3))
    scaled = ref_inv_freq(cfg)
    assert scaled[0] == base[0]
    assert np.allclose(scaled[2:], base[2:] / 8.0)
    assert base[1] / 8.0 < scaled[1] < base[1]


def test_whole_sequence_one_segment():
    check(make_cfg(3, top_k=0, candidate="memory", segment_len=0), seed=11)


def test_given_initial_memory():
    """A carried-in memory (not M_0) is read and written like any other."""
    cfg = make_cfg(2, top_k=0, candidate="memory")
    mem = 0.5 * np.random.default_rng(5).standard_normal((B, 8, 32))
    check(cfg, seed=12, mem=mem)


def test_padding():
    """Row 0: the last 4 tokens are padding (inside the partial segment and the one before).
    Row 1: only the first segment is real; the last whole segment (and the partial one) are all
    padding, so they leave the memory as the first segment wrote it."""
    cfg = make_cfg(3, top_k=3, candidate="memory")
    doc = np.ones((B, T), int)
    doc[0, 9:] = 0
    doc[1, SEG:] = 0
    params, tokens, _, ref_mem = check(cfg, seed=13, doc_ids=doc)
    # Row 1's final memory is the memory after its first segment alone, and that did change M_0.
    _, mem_first = ref_forward(cfg, params, tokens[1:, :SEG])
    np.testing.assert_allclose(ref_mem[1], mem_first[0], rtol=0, atol=1e-12)
    assert np.max(np.abs(mem_first[0] - np.eye(8, 32))) > 0.1
    _, got_first = model_forward(cfg, params, tokens[1:, :SEG])
    assert_close("memory after segment 0", got_first[0], ref_mem[1])


@pytest.mark.parametrize("L_m", [0, 2])
def test_segment_convolution(L_m):
    """`model.conv_width`: the convolution never reaches into the previous segment or another document
    (row 0 packs two documents; row 1 has a padded tail), and it feeds attention and the memory."""
    cfg = make_cfg(L_m, candidate="tokens", conv_width=3)
    doc = np.array([[1] * 7 + [2] * 6, [3] * 11 + [0] * 2])
    pos = np.array([list(range(7)) + list(range(6)), list(range(11)) + [0, 0]])
    check(cfg, seed=15 + L_m, positions=pos, doc_ids=doc)


def test_packing():
    """Row 0 packs two documents (positions restart at 0, attention stays within a document, memory
    follows the row); row 1 is one document with a padded tail."""
    cfg = make_cfg(2, top_k=0, candidate="tokens")
    doc = np.array([[1] * 7 + [2] * 6, [3] * 11 + [0] * 2])
    pos = np.array([list(range(7)) + list(range(6)), list(range(11)) + [0, 0]])
    check(cfg, seed=14, positions=pos, doc_ids=doc)

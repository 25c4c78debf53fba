"""RMT (`model.kind="rmt"`) against an independent NumPy loop, and its contract: causal, gradients
reach the first segment's memory tokens, m = 0 with one segment is vanilla Llama, generation equals
teacher forcing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import config as cfglib, generate as gen
from lm2_jax.model import decoder
from tests.conftest import tiny_model
from tests.test_reference import (
    assert_close,
    block_params,
    ffn,
    random_params,
    ref_inv_freq,
    rms_norm,
    self_attention,
    to_numpy64,
)

B, T, SEG, M = 2, 13, 5, 3  # 3 segments, the last partial


def rmt_cfg(m=M, segment_len=SEG, init="learned", conv_width=0, n_layers=2):
    c = tiny_model(97, n_layers, layers=0, segment_len=segment_len, init=init)
    c.kind, c.memory.slots, c.conv_width = "rmt", m, conv_width
    cfglib.validate_model(c)
    return c


def ref_rmt(cfg, params, tokens, positions=None, doc_ids=None):
    """Per row and segment: [M_s, the segment's tokens, M_s] through the blocks; the segment's
    logits from its tokens, M_{s+1} = the final-norm states of the last m places."""
    P = to_numpy64(params)
    tokens = np.asarray(tokens)
    nb, nt = tokens.shape
    positions = np.broadcast_to(np.arange(nt), (nb, nt)) if positions is None else np.asarray(positions)
    doc_ids = np.ones((nb, nt), int) if doc_ids is None else np.asarray(doc_ids)
    m, S, eps = cfg.memory.slots, cfg.memory.segment_len or nt, cfg.norm_eps
    inv_freq = ref_inv_freq(cfg)
    blocks = [block_params(P, cfg, layer) for layer in range(cfg.n_layers)]
    logits = np.zeros((nb, nt, cfg.vocab_size))
    mem_out = np.zeros((nb, m, cfg.d_model))
    for b in range(nb):
        Mem = P["memory_init"].copy() if cfg.memory.init == "learned" else np.eye(m, cfg.d_model)
        for start in range(0, nt, S):
            idx = list(range(start, min(start + S, nt)))
            pad = S - len(idx)  # a partial last segment is padded to S, so the write tokens follow the padding
            doc = [-1] * m + [int(doc_ids[b, t]) for t in idx] + [0] * pad + [-2] * m
            p0 = int(positions[b, idx[0]])
            real = [int(positions[b, t]) for t in idx if doc_ids[b, t] != 0]
            last = max(real) if real else p0
            pos = [p0 - m + j for j in range(m)] + [int(positions[b, t]) for t in idx] + [0] * pad \
                + [last + 1 + j for j in range(m)]
            mem = [d < 0 for d in doc]
            h = list(Mem) + [P["embed"][tokens[b, t]].copy() for t in idx] + [np.zeros(cfg.d_model)] * pad + list(Mem)
            for bp in blocks:
                x = [rms_norm(v, bp["attn_norm"]["scale"], eps) for v in h]
                if cfg.conv_width:
                    w = bp["conv"]["taps"]
                    x = [sum(w[j] * x[i - j] for j in range(cfg.conv_width) if i - j >= 0 and doc[i - j] == doc[i])
                         for i in range(len(h))]
                attn = self_attention(cfg, bp["attn"], x, pos, doc, inv_freq, shared=mem)
                h = [ffn(cfg, bp, h[i] + attn[i]) for i in range(len(h))]
            out = [rms_norm(v, P["final_norm"]["scale"], eps) for v in h]
            for i, t in enumerate(idx):
                logits[b, t] = out[m + i] @ P["embed"].T
            if real:
                Mem = np.stack(out[len(out) - m:])
        mem_out[b] = Mem
    return logits, mem_out


def _forward(cfg, params, tokens, positions=None, doc_ids=None):
    j = lambda a: None if a is None else jnp.asarray(a, jnp.int32)
    logits, mem = jax.jit(lambda p, t, pos, d: decoder.forward(cfg, p, t, positions_BT=pos, doc_ids_BT=d))(
        params, jnp.asarray(tokens, jnp.int32), j(positions), j(doc_ids))
    return np.asarray(logits, np.float64), np.asarray(mem, np.float64)


@pytest.mark.parametrize("case", ["plain", "packed-padded-conv", "identity-init"])
def test_matches_numpy_loop(case):
    cfg = rmt_cfg(conv_width=2 if case == "packed-padded-conv" else 0,
                  init="identity" if case == "identity-init" else "learned")
    params = random_params(cfg, seed=3)
    tokens = np.random.default_rng(4).integers(1, cfg.vocab_size, (B, T))
    pos = doc = None
    if case == "packed-padded-conv":  # row 0 packs two documents; row 1 ends in padding
        doc = np.array([[1] * 7 + [2] * 6, [3] * 9 + [0] * 4])
        pos = np.array([list(range(7)) + list(range(6)), list(range(9)) + [0] * 4])
    got, got_mem = _forward(cfg, params, tokens, pos, doc)
    want, want_mem = ref_rmt(cfg, params, tokens, pos, doc)
    valid = np.ones((B, T), bool) if doc is None else doc != 0
    assert_close("logits", got, want, valid)
    assert_close("memory", got_mem, want_mem)
    assert np.max(np.abs(want_mem - np.asarray(params["memory_init"] if "memory_init" in params
                                               else np.eye(M, 32)))) > 0.1  # the memory was written


def test_causal_and_the_memory_crosses_segments():
    cfg = rmt_cfg()
    params = random_params(cfg, seed=5)
    tokens = np.random.default_rng(6).integers(1, cfg.vocab_size, (1, T))
    base, _ = _forward(cfg, params, tokens)
    for t in (2, 7):
        moved = tokens.copy()
        moved[0, t] = (moved[0, t] + 1) % cfg.vocab_size or 1
        diff = np.abs(_forward(cfg, params, moved)[0] - base).max(axis=(0, 2))
        assert diff[:t].max() == 0.0, f"changing token {t} moved an earlier logit"
        assert diff[(t // SEG + 1) * SEG:].max() > 1e-4, f"token {t} never reached a later segment"


def test_gradient_reaches_the_first_segments_memory_tokens():
    """The loss on the last segment's tokens alone, through two segment boundaries (full BPTT)."""
    cfg = rmt_cfg()
    params = random_params(cfg, seed=7)
    tokens = jnp.asarray(np.random.default_rng(8).integers(1, cfg.vocab_size, (B, T)), jnp.int32)

    def last_segment_loss(mem0):
        logits, _ = decoder.forward(cfg, dict(params, memory_init=mem0), tokens)
        return jnp.sum(logits[:, 2 * SEG:] ** 2)

    g = jax.grad(last_segment_loss)(params["memory_init"])
    assert float(jnp.abs(g).max()) > 1e-6
    truncated = rmt_cfg()
    truncated.memory.bptt_segments = 1  # stop the gradient at every segment boundary
    g_cut = jax.grad(lambda m0: jnp.sum(decoder.forward(truncated, dict(params, memory_init=m0), tokens)[0]
                                        [:, 2 * SEG:] ** 2))(params["memory_init"])
    assert float(jnp.abs(g_cut).max()) == 0.0


def test_no_memory_tokens_and_one_segment_is_vanilla():
    cfg = rmt_cfg(m=0, segment_len=0, init="identity")
    vanilla = tiny_model(97, 2, layers=0, segment_len=0)
    params = random_params(vanilla, seed=9)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(cfg, seed=9))
    tokens = np.random.default_rng(10).integers(1, 97, (B, T))
    np.testing.assert_array_equal(_forward(cfg, params, tokens)[0], _forward(vanilla, params, tokens)[0])


def test_generation_equals_teacher_forcing():
    cfg = rmt_cfg(m=2, conv_width=2)
    params = nn.meta.unbox(decoder.init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 97, n).astype(np.int32) for n in (3, 7, 10)]
    out = gen.generate(cfg, params, prompts, 9, return_logits=True)
    for b, prompt in enumerate(prompts):
        full = np.concatenate([prompt, out.tokens[b][:-1]])
        logits, _ = decoder.forward(cfg, params, jnp.asarray(full[None], jnp.int32))
        want = np.asarray(logits[0, len(prompt) - 1:])
        np.testing.assert_allclose(out.logits[b], want, rtol=0, atol=1e-4)


def test_config_errors_name_the_field():
    c = rmt_cfg()
    c.memory.layers = 1
    with pytest.raises(cfglib.ConfigError, match="model.memory.layers"):
        cfglib.validate_model(c)
    assert cfglib.describe_model(rmt_cfg()) == "RMT, 3 memory tokens, 2 blocks, segments of 5"

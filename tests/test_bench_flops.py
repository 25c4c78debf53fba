"""The analytic FLOP counter behind the benchmark's MFU, against a hand count and the jaxpr."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lm2_jax.bench import flops
from lm2_jax.model import decoder


def test_tiny_config_matches_a_hand_count():
    """configs/tiny.py's model (D=128, 2 layers, 4 heads (dh 32), 2 KV heads, FFN 384, vocab 8192, memory
    in layer 1 with 16 slots, the paper's write candidate) with segments of 40 tokens, sequences of 80.
    Each line is one matmul, 2 x rows x inner x cols, divided by the tokens it serves."""
    m = tiny.get_config().model
    m.memory.layers, m.memory.segment_len, m.memory.write_candidate = 1, 40, "memory"  # the paper's candidate
    m.memory.write_rule, m.memory.address, m.memory.read_scope = "gated", "content", "segment"  # the paper's
    q, k, v, o = 2 * 128 * 128, 2 * 128 * 64, 2 * 128 * 64, 2 * 128 * 128
    scores = 2 * (2 * 32 * 4) * (40 * 41 / 2) / 40  # q.k and p.v over 1..40 keys, averaged over a segment
    gate, up, down = 2 * 128 * 384, 2 * 128 * 384, 2 * 384 * 128
    logits = 2 * 128 * 8192
    mem_q, mem_o, out_gate = 2 * 128 * 128, 2 * 128 * 128, 2 * 128 * 128
    slot_scores, slot_values = 2 * 128 * 16, 2 * 16 * 128
    slot_k, slot_v = 2 * 16 * 128 * 128 / 40, 2 * 16 * 128 * 128 / 40  # once per 40-token segment
    xbar, ebar = 2 * 16 * 128, 2 * 16 * 128
    in_gate, forget_gate = 2 * 16 * 128 * 128 / 40, 2 * 16 * 128 * 128 / 40
    hand = (2 * (q + k + v + o + scores + gate + up + down) + logits
            + mem_q + mem_o + out_gate + slot_scores + slot_values + slot_k + slot_v
            + xbar + ebar + in_gate + forget_gate)
    got = flops.forward_flops_per_token(m, 80)
    assert got["total"] == pytest.approx(hand, rel=1e-12)
    assert flops.train_flops_per_token(m, 80) == pytest.approx(3 * hand, rel=1e-12)


def _dot_flops(jaxpr) -> float:
    """2 x output elements x contracted size for every dot_general, through scans and calls."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += mult * _dot_flops(inner)
    return total


@pytest.mark.parametrize("layers,top,rmt", [(1, "memory", 0), (2, "tokens", 0), (1, "delta", 0), (1, "token_scope", 0),
                                            (0, "memory", 0), (0, "memory", 4)])
def test_counter_equals_the_matmuls_in_the_traced_forward(layers, top, rmt):
    """Every dot_general XLA is handed, counted from the jaxpr. The einsum kernel builds the full
    S x S scores, so the trace holds exactly the masked half (S(S-1)/2 keys per segment) more; RMT
    (`rmt` memory tokens) runs S + 2m places per segment."""
    cfg = tiny.get_config().model
    cfg.attention = "einsum"
    B, T, S = 2, 80, 40
    cfg.memory.layers, cfg.memory.segment_len = layers, S
    # `top`: the write candidate, or "delta" for the delta-rule write (which writes the token candidate),
    # or "token_scope" for the delta write read token by token at learned slot keys
    cfg.memory.write_candidate, cfg.memory.write_rule = ("tokens", "delta") if top in ("delta", "token_scope") \
        else (top, "gated")
    cfg.memory.address, cfg.memory.read_scope = ("slots", "token") if top == "token_scope" else ("content", "segment")
    if rmt:
        cfg.kind, cfg.memory.slots = "rmt", rmt
    params = nn.meta.unbox(decoder.init_params(cfg, jax.random.key(0), T))
    tokens = jnp.zeros((B, T), jnp.int32)
    traced = _dot_flops(jax.make_jaxpr(lambda p, t: decoder.forward(cfg, p, t))(params, tokens).jaxpr)
    H, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    n = S + 2 * rmt
    masked_half = cfg.n_layers * 2 * 2 * H * dh * (n * (n - 1) / 2) * (T // S) * B
    assert traced == pytest.approx(flops.forward_flops_per_token(cfg, T)["total"] * B * T + masked_half, rel=1e-9)

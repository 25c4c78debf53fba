"""Analytic model FLOPs per token: what MFU is measured against.

Counts the multiply-adds of every matmul the model needs (2 FLOPs each), per token, for one
forward pass; a train step is 3x that (backward = 2x forward). Not counted: norms, softmax,
RoPE, gates' nonlinearities (elementwise, O(D) per token) and any recomputation (remat), so MFU
is the standard "model FLOPs utilisation". Causal attention counts only the keys a query may see
(positions 1..p of its segment), not the masked half a naive kernel would also compute.
"""

from __future__ import annotations

import ml_collections


def _segments(T: int, S: int) -> list[int]:
    return [min(S, T - lo) for lo in range(0, T, S)]


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
    """{component: forward FLOPs per token} for sequences of `seq_len` tokens, plus 'total'."""
    D, L, H, K, F, V = (model.d_model, model.n_layers, model.n_heads, model.n_kv_heads, model.d_ff,
                        model.vocab_size)
    dh = D // H
    mem = model.memory
    L_m, N = mem.layers, mem.slots
    S = seq_len if mem.segment_len == 0 or mem.segment_len >= seq_len else mem.segment_len
    segs = _segments(seq_len, S)
    n_seg_per_token = len(segs) / seq_len
    # RMT runs every segment with m read and m write tokens around it: more positions through the
    # blocks per text token, and longer attention rows (the output logits stay at the text tokens).
    m = mem.slots if model.kind == "rmt" else 0
    blocks_per_token = 1 + 2 * m * n_seg_per_token
    # Sum over the sequence of the keys each query attends to (its own position included).
    keys_per_token = sum((n + 2 * m) * (n + 2 * m + 1) / 2 for n in segs) / seq_len

    out = {
        "attn_proj": blocks_per_token * (L * 2 * D * (H + 2 * K) * dh + L * 2 * H * dh * D),
        "attn_scores": L * 2 * 2 * H * dh * keys_per_token,  # q.k and p.v
        "mlp": blocks_per_token * L * 3 * 2 * D * F,
        "logits": 2 * D * V,
    }
    if L_m:
        gates = 3 if mem.write_candidate == "tokens" else 2  # in, forget (and the token candidate)
        projected = 1 if mem.address == "slots" else 2  # the bank's values (and keys, unless learned per slot)
        if mem.read_scope == "token":  # per token and head, the weighted sum of the D-wide slots, then one value map
            out["memory_read"] = L_m * (3 * 2 * D * D + 2 * N * D + 2 * mem.heads * N * D + 2 * D * D)
        else:
            out["memory_read"] = L_m * (
                3 * 2 * D * D  # query, output projection and the output gate
                + 2 * 2 * N * D  # token-slot scores and the weighted sum of slot values
                + n_seg_per_token * projected * 2 * N * D * D  # slot keys and values, once per segment
            )
        if mem.write_rule == "delta":  # per token: its candidate, its strength, what its address reads
            out["memory_write"] = L_m * (2 * D * D + 2 * D + 2 * N * D)
        else:
            out["memory_write"] = L_m * (
                2 * 2 * N * D  # routing tokens and E_mem into slots (X̄, Ē)
                + n_seg_per_token * gates * 2 * N * D * D  # gate matmuls on the N routed rows
            )
    out["total"] = sum(out.values())
    return out


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(model, seq_len)["total"]

"""What the memory reads on one sample, segment by segment (the paper's Fig. 6).

The sample runs through the decoder one segment at a time, exactly as `decoder.forward` does,
keeping for every segment the token x slot read attention of each memory block (mean over heads,
sown into the "attention" collection), the memory after the segment, and the memory module's
summary (gates, sizes). For one segment boundary it also reads the same tokens against the memory
*after* that segment's write: the "before / after the update" pair of the paper's figure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.errors import UsageError
from lm2_jax.model import decoder


def _apply(cfg, params, tok_1S, pos_1S, mem_1ND):
    out, sown = decoder.LM2(cfg, hidden=True).apply(
        {"params": params}, tok_1S, pos_1S, jnp.ones_like(tok_1S), mem_1ND, mutable=["attention", "intermediates"])
    _, new_mem = out
    read_LSN = sown["attention"]["mem_blocks"]["memory"]["read"][0][:, 0]  # (memory layers, S, N)
    # the gates' summary exists for the once-per-segment read only (`memory.read_scope="segment"`)
    sown_summary = sown.get("intermediates", {}).get("mem_blocks", {}).get("memory", {}).get("summary")
    summary = {k: v[:, 0] for k, v in sown_summary[0].items()} if sown_summary else {}
    return read_LSN, new_mem, summary


def trace(cfg, params, tokens: np.ndarray, boundary: int = -1) -> dict:
    """Per-segment read attention and memory statistics of one row of `tokens`.

    Returns {"reads": [(L_m, S_i, N) per segment], "before"/"after": (L_m, S, N) of segment
    `boundary` against M_s and M_{s+1}, "segment": its index, "starts": segment start offsets,
    "stats": {name: (segments, L_m)}}.
    """
    if not cfg.memory.layers:
        raise UsageError("the model has no LM2 memory blocks (model.memory.layers=0"
                         + (", an RMT" if cfg.kind == "rmt" else "") + "): nothing to draw")
    T = len(tokens)
    S = decoder.segment_len(cfg, T)
    starts = list(range(0, T, S))
    seg = boundary % len(starts)
    run = jax.jit(lambda p, t, pos, m: _apply(cfg, p, t, pos, m))
    mem = decoder.initial_memory(cfg, params, 1)
    reads, stats, mems = [], {}, [np.asarray(mem[0])]
    after = None
    for i, start in enumerate(starts):
        tok = jnp.asarray(tokens[None, start:start + S], jnp.int32)
        pos = jnp.arange(start, start + tok.shape[1], dtype=jnp.int32)[None]
        read, new_mem, summary = run(params, tok, pos, mem)
        reads.append(np.asarray(read))
        for k, v in summary.items():
            stats.setdefault(k, []).append(np.asarray(v))
        if i == seg:
            after = np.asarray(run(params, tok, pos, new_mem)[0])
        mem = new_mem
        mems.append(np.asarray(mem[0]))
    slot_norms = np.stack([np.linalg.norm(m, axis=-1) for m in mems[1:]])  # (segments, N)
    out_stats = {k: np.stack(v) for k, v in stats.items()}
    out_stats["slot_norm_max"] = slot_norms.max(-1)
    out_stats["slot_norm_mean"] = slot_norms.mean(-1)
    return {"reads": reads, "before": reads[seg], "after": after, "segment": seg, "starts": starts,
            "stats": out_stats}

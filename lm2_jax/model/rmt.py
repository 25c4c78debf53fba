"""The Recurrent Memory Transformer's segment layout (Bulatov et al. 2022, the decoder version used
by BABILong), on the same Llama backbone as LM2 (`model.kind="rmt"`, docs/design.md §3).

Each segment is run as [m read tokens | the S segment tokens | m write tokens]: the read tokens
are the memory M_s (the m embeddings written by the previous segment; M_0 is `memory.init`), the
write tokens start as the same M_s, and causal attention lets the segment's tokens see the read
tokens but never the write tokens, while the write tokens see everything. The write tokens'
final-norm hidden states are M_{s+1}. The gradient runs through the whole chain (full BPTT over
segments; `memory.bptt_segments` truncates it, `memory.remat_segments` checkpoints each segment),
because `decoder.forward` carries M_s exactly as it carries LM2's bank.

Memory tokens carry negative doc ids (read -1, write -2): the attention mask (`shared`) makes them
visible to, and let them see, every document of a packed row; the segment convolution never mixes
them with text (it only joins equal doc ids). Their RoPE positions continue the segment's: the
read tokens sit just before its first token, the write tokens just after its last real one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

READ_DOC, WRITE_DOC = -1, -2


def wrap(mem_BMD: Array, h_BSD: Array, positions_BS: Array, doc_ids_BS: Array):
    """The (B, m + S + m) inputs of one RMT segment: embeddings, positions, doc ids."""
    B, m = mem_BMD.shape[:2]
    mem = mem_BMD.astype(h_BSD.dtype)
    offsets = jnp.arange(m, dtype=positions_BS.dtype)[None, :]
    last_B1 = jnp.max(jnp.where(doc_ids_BS != 0, positions_BS, positions_BS[:, :1]), axis=1, keepdims=True)
    positions = jnp.concatenate([positions_BS[:, :1] - m + offsets, positions_BS, last_B1 + 1 + offsets], axis=1)
    docs = jnp.concatenate([jnp.full((B, m), READ_DOC, doc_ids_BS.dtype), doc_ids_BS,
                            jnp.full((B, m), WRITE_DOC, doc_ids_BS.dtype)], axis=1)
    return jnp.concatenate([mem, h_BSD, mem], axis=1), positions, docs


def unwrap(h_BLD: Array, m: int) -> tuple[Array, Array]:
    """(the segment tokens' outputs (B, S, D), the written memory (B, m, D) float32)."""
    return h_BLD[:, m:h_BLD.shape[1] - m], h_BLD[:, h_BLD.shape[1] - m:].astype(jnp.float32)

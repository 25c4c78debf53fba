"""The LM2 decoder: blocks stacked with `nn.scan`, the sequence processed in segments by `lax.scan`.

`LM2` is a Linen module for ONE segment: (tokens, positions, doc ids, memory M_s) -> (logits,
M_{s+1}); with `model.kind="rmt"` the same module is the Recurrent Memory Transformer, whose
memory is m token embeddings around the segment (`rmt.py`). `forward` runs the recurrence over
segments with `jax.lax.scan`, carrying the memory explicitly, so the module stays a pure function
of (params, inputs) and the memory can be reset per row, streamed across train steps, sharded and
checkpointed by whoever holds it.

Two layer scans: the first L_m blocks carry memory parameters, the rest do not, so their
parameter trees differ. Each scan's compile cost does not grow with its length.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm2_jax.model import memory as memlib, rmt as rmtlib
from lm2_jax.model.layers import MLP, Attention, RMSNorm, SegmentConv, dense, dense_init, dtype_of, rope_tables
from lm2_jax.parallel import constrain

Array = jax.Array

ACT_BSD = ("batch", "length", "act_embed")
MEM_BND = ("batch", "mem_slots", "act_embed")  # the memory bank follows its rows over the batch axes

NO_REMAT = object()  # `model.remat="none"`: the blocks are not rematerialised
# `model.remat`, the one list of its choices (config validation reads it): each block of the layer
# scan is rematerialised under this jax.checkpoint policy (what the forward pass saves for the
# backward pass), or not at all.
REMAT_POLICIES = {
    "none": NO_REMAT,
    "full": None,  # save nothing; recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """One Llama block; with `has_memory`, also LM2's memory read (into the residual) and write.

    `kv` is this layer's slice of the generation cache (None in training) and `where` its shared
    part (the cache's doc ids and write index): with them the block attends to the cache, reads the
    memory without writing it, and returns its updated keys and values as the scan output.
    """

    cfg: ml_collections.ConfigDict
    has_memory: bool

    @nn.compact
    def __call__(self, carry, kv, mem_BND, cos, sin, doc_ids_BS, valid_BS, where):
        h_BSD, w_BND = carry
        x = RMSNorm(self.cfg, name="attn_norm")(h_BSD)
        write = where is None
        own = cache_entries(self.cfg)  # this layer's own cache: (k, v[, the conv's normed inputs])
        bank = None  # generation: the bank's keys and values, computed once per segment
        if write:
            if self.cfg.conv_width:
                x = SegmentConv(self.cfg, name="conv")(x, doc_ids_BS)
            update = Attention(self.cfg, name="attn")(x, cos, sin, doc_ids_BS)
        else:
            conv_kv = ()
            if self.cfg.conv_width:
                x, x_BCD = SegmentConv(self.cfg, name="conv")(x, doc_ids_BS, cache=(kv[2], *where))
                conv_kv = (x_BCD,)
            update, self_kv = Attention(self.cfg, name="attn")(x, cos, sin, doc_ids_BS, cache=(*kv[:2], *where))
            kv, bank = (*self_kv, *conv_kv, *kv[own:]), (kv[own:] or None)
        if self.has_memory and self.cfg.memory.placement == "parallel":
            # The paper's block: the memory reads (and writes) from the block input x, beside
            # self-attention, and both outputs join the residual stream together.
            gated, w_BND = memlib.MemoryModule(self.cfg, name="memory")(x, mem_BND, w_BND, valid_BS, write, bank)
            update = update + gated
        h_BSD = h_BSD + update
        if self.has_memory and self.cfg.memory.placement == "after_attention":
            # The memory sees each token after this block's self-attention has mixed in its
            # segment context, so even the first block can write bindings ("Mary" with
            # "bathroom"), not a bag of its segment's token embeddings.
            xm = RMSNorm(self.cfg, name="memory_norm")(h_BSD)
            gated, w_BND = memlib.MemoryModule(self.cfg, name="memory")(xm, mem_BND, w_BND, valid_BS, write, bank)
            h_BSD = h_BSD + gated
        h_BSD = h_BSD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(h_BSD))
        h_BSD = constrain(h_BSD, ACT_BSD)
        return (h_BSD, w_BND), (None if write else kv)


def cache_entries(cfg: ml_collections.ConfigDict) -> int:
    """Arrays of a layer's own generation cache: its keys and values, and with `conv_width` the
    segment's normed block inputs (what the convolution reads); the bank's keys and values follow."""
    return 3 if cfg.conv_width else 2


def _stack(cfg: ml_collections.ConfigDict, has_memory: bool, length: int, name: str):
    block, policy = Block, REMAT_POLICIES[cfg.remat]
    if policy is not NO_REMAT:
        block = nn.remat(Block, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0, "attention": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * 6,  # the cache slice is per layer; the rest is shared
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, has_memory, name=name)


class LM2(nn.Module):
    """LM2 over one segment. `cfg` is the `model` config section.

    `hidden=True` returns the final-norm hidden states (B, S, D) instead of the logits, for callers
    that project only some positions (`project`).

    `cache` (generation, `lm2_jax.generate`): {"mem_blocks"/"blocks": (k, v[, conv inputs]) stacked
    over the stack's layers (for "mem_blocks", optionally followed by the bank's keys and values,
    `memory.bank_kv`), "doc": (B, C) doc ids, "index": (B,)}. The tokens then attend to the cache, the
    memory is only read (it is written when the segment is complete), and the call returns
    (outputs, mem_BND unchanged, updated {"mem_blocks"/"blocks": (k, v)}).
    """

    cfg: ml_collections.ConfigDict
    hidden: bool = False

    @nn.compact
    def __call__(self, tokens_BS, positions_BS, doc_ids_BS, mem_BND=None, cache=None):
        cfg = self.cfg
        B = tokens_BS.shape[0]
        own = {}
        m = memory_slots(cfg)
        if cfg.memory.init == "learned" and m:
            # Declared here so `init` creates it; `forward` reads it once, before the segment scan.
            own["memory_init"] = self.param("memory_init", nn.with_logical_partitioning(
                lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype), ("mem_slots", "embed")),
                (cfg.memory.slots, cfg.d_model), jnp.float32)
        if mem_BND is None:
            mem_BND = initial_memory(cfg, own, B)
        embed = self.param("embed", nn.with_logical_partitioning(dense_init(cfg), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), dtype_of(cfg.param_dtype))
        h = jnp.take(embed, tokens_BS, axis=0).astype(dtype_of(cfg.dtype))
        h = constrain(h, ACT_BSD)
        valid_BS = doc_ids_BS != 0
        rmt_tokens = m if cfg.kind == "rmt" else 0
        if rmt_tokens:
            if cache is not None:
                raise ValueError("RMT has no KV-cache path: generation re-runs the segment (lm2_jax.generate)")
            h, positions_BS, doc_ids_BS = rmtlib.wrap(mem_BND, h, positions_BS, doc_ids_BS)
        cos, sin = rope_tables(cfg, positions_BS)

        L_m = cfg.memory.layers
        w_BND = mem_BND
        where = None if cache is None else (cache["doc"], cache["index"])
        kv = lambda stack: None if cache is None else cache[stack]
        new_kv = {}
        if L_m:
            stack = _stack(cfg, True, L_m, "mem_blocks")
            (h, w_BND), new_kv["mem_blocks"] = stack((h, w_BND), kv("mem_blocks"), mem_BND, cos, sin, doc_ids_BS,
                                                     valid_BS, where)
        if cfg.n_layers > L_m:
            plain = _stack(cfg, False, cfg.n_layers - L_m, "blocks")
            (h, _), new_kv["blocks"] = plain((h, None), kv("blocks"), None, cos, sin, doc_ids_BS, valid_BS, where)
        h = RMSNorm(cfg, name="final_norm")(h)
        if rmt_tokens:
            h, w_BND = rmtlib.unwrap(h, rmt_tokens)
        # A segment without a single valid token must not touch the memory (docs/design.md §2).
        new_mem = jnp.where(jnp.any(valid_BS, axis=1)[:, None, None], w_BND, mem_BND)
        head = None if cfg.tie_embeddings else self.param(
            "lm_head", nn.with_logical_partitioning(dense_init(cfg), ("embed", "vocab")),
            (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))
        out = h if self.hidden else _vocab_projection(h, embed, head)
        if cache is not None:
            return out, mem_BND, new_kv
        return out, new_mem


def _vocab_projection(h_BSD: Array, embed_VD: Array, head_DV: Array | None) -> Array:
    """float32 logits: the tied embedding's transpose, or the separate `lm_head`."""
    if head_DV is None:
        return dense(h_BSD, embed_VD.astype(h_BSD.dtype), 1, w_last=True).astype(jnp.float32)
    return dense(h_BSD, head_DV.astype(h_BSD.dtype)).astype(jnp.float32)


def project(cfg: ml_collections.ConfigDict, params: dict, h_BPD: Array) -> Array:
    """Logits (B, P, V) of final-norm hidden states taken from `forward(..., hidden=True)`."""
    params = nn.meta.unbox(params)
    return _vocab_projection(h_BPD, params["embed"], None if cfg.tie_embeddings else params["lm_head"])


def head_weight(cfg: ml_collections.ConfigDict, params: dict) -> Array:
    """The vocabulary projection's weight: the tied embedding (V, D), or the `lm_head` (D, V)."""
    params = nn.meta.unbox(params)
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def memory_slots(cfg: ml_collections.ConfigDict) -> int:
    """N, the rows of the memory the segment recurrence carries: LM2's slots (0 for vanilla, which
    has no memory blocks) or RMT's memory tokens."""
    return cfg.memory.slots if cfg.memory.layers or cfg.kind == "rmt" else 0


def initial_memory(cfg: ml_collections.ConfigDict, params: dict, batch: int) -> Array:
    """M_0 (batch, N, D) float32: eye(N, D) for every row as in the paper, or the learned
    `memory_init` parameter; vanilla (no memory layers): an empty (batch, 0, D) bank."""
    n = memory_slots(cfg)
    if n and cfg.memory.init == "learned":
        m0_ND = jnp.asarray(nn.meta.unbox(params["memory_init"]), jnp.float32)
    else:
        m0_ND = jnp.eye(n, cfg.d_model, dtype=jnp.float32)
    return jnp.broadcast_to(m0_ND, (batch, n, cfg.d_model))


def segment_len(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
    S = cfg.memory.segment_len
    return seq_len if S == 0 or S >= seq_len else S


def init_params(cfg: ml_collections.ConfigDict, rng: Array, seq_len: int = 8) -> dict:
    """Boxed params (with logical-axis metadata); `nn.meta.unbox` gives plain arrays."""
    S = segment_len(cfg, seq_len)
    tok = jnp.zeros((1, S), jnp.int32)
    # The params do not depend on the attention kernel; the blocked one traces any length (splash
    # needs multiples of 128, and shard_map a batch that divides the mesh).
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), "attention": "blocked"})
    return LM2(cfg).init(rng, tok, jnp.zeros_like(tok), jnp.ones_like(tok))["params"]


def forward(
    cfg: ml_collections.ConfigDict,
    params: dict,
    tokens_BT: Array,
    positions_BT: Array | None = None,
    doc_ids_BT: Array | None = None,
    mem_BND: Array | None = None,
    segment_fn: Callable | None = None,
    hidden: bool = False,
    sow: bool = False,
):
    """Run LM2 over a whole sequence in segments; returns (outputs, final memory).

    `mem_BND=None` starts every row from M_0 (carry="sequence"). Without `segment_fn` the outputs are
    the (B, T, V) float32 logits (`hidden=True`: the (B, T, D) final-norm hidden states); with it,
    `segment_fn(out_BS., index)` is applied inside the scan to each segment's output (e.g. to
    reduce logits to a loss without materialising B x T x V) and its outputs are stacked over
    segments. `sow=True` also returns what the memory blocks sowed (`memory.summary`: read entropy,
    slot use, gates, sizes), stacked (segments, memory layers, ...), as a third value: for
    `lm2_jax.experiments.memory_stats`, never for training.
    """
    model = LM2(cfg, hidden=hidden)
    B, T = tokens_BT.shape
    S = segment_len(cfg, T)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if doc_ids_BT is None:
        doc_ids_BT = jnp.ones((B, T), jnp.int32)
    pad = (-T) % S
    if pad:  # a partial last segment is padded with doc id 0: it attends to nothing and writes nothing
        tokens_BT, positions_BT, doc_ids_BT = (
            jnp.pad(a, ((0, 0), (0, pad))) for a in (tokens_BT, positions_BT, doc_ids_BT))
    n_seg = (T + pad) // S
    as_segments = lambda a: jnp.swapaxes(a.reshape(B, n_seg, S), 0, 1)
    xs = (jnp.arange(n_seg), as_segments(tokens_BT), as_segments(positions_BT), as_segments(doc_ids_BT))
    if mem_BND is None:
        mem_BND = initial_memory(cfg, params, B)

    k = cfg.memory.bptt_segments

    def step(mem, seg):
        i, tok, pos, doc = seg
        mem = constrain(mem, MEM_BND)
        if k:
            mem = jnp.where(i % k == 0, jax.lax.stop_gradient(mem), mem)
        if sow:
            (logits, mem), sown = model.apply({"params": params}, tok, pos, doc, mem, mutable=["intermediates"])
        else:
            logits, mem = model.apply({"params": params}, tok, pos, doc, mem)
        mem = constrain(mem, MEM_BND)
        out = logits if segment_fn is None else segment_fn(logits, i)
        return mem, ((out, sown.get("intermediates", {})) if sow else out)

    if cfg.memory.remat_segments and n_seg > 1:
        step = jax.checkpoint(step, prevent_cse=False)
    # A scan that is differentiated copies every activation a segment saves into (n_seg, ...)
    # buffers and back out for the backward; unrolled, each segment's saved arrays stay where
    # they were computed (the LM2 bench step, two segments: 9.8 -> 7.9 s on CPU, 2026-12-04).
    # With remat_segments a segment saves only its inputs, so only then is the scan kept.
    unroll = n_seg if not cfg.memory.remat_segments and n_seg <= cfg.memory.unroll_segments else 1
    mem_BND, outs = jax.lax.scan(step, constrain(mem_BND, MEM_BND), xs, unroll=unroll)
    mem_BND = constrain(mem_BND, MEM_BND)
    extra = ()
    if sow:
        outs, sown = outs
        extra = (sown,)
    if segment_fn is None:
        outs = jnp.swapaxes(outs, 0, 1).reshape(B, n_seg * S, -1)[:, :T]
    return (outs, mem_BND, *extra)

"""Platform attention kernels and `model.attention="auto"`, which picks one by the mesh's devices.

Every kernel has the signature of `layers._blocked_attention`: (q_BSKGDh, k_BSKDh, v_BSKDh,
doc_ids_BS, shared) -> out_BSKGDh, causal inside the segment, no attention across documents. The
padded positions (doc id 0) attend only to each other, so every valid output equals the blocked
kernel's; padded outputs never reach the loss, the memory routing or a valid token.

- "splash": Pallas' TPU splash attention (block-sparse flash attention; the causal blocks above the
  diagonal are skipped, documents by segment ids). A Mosaic kernel cannot be partitioned by XLA, so
  under a mesh it runs inside `shard_map` over the batch and KV-head shardings the rules give.
  Segments must be a multiple of 128 tokens. On a platform other than TPU it runs in Pallas'
  interpreter (slow; how the tests check its numbers on a CPU).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention
  (bfloat16/float16, head_dim a multiple of 8 up to 128). Documents are a boolean mask, which cuDNN
  takes as a bias. Untested on GPU hardware in this project (no GPU was available); on CPU the
  tests run the same call with implementation="xla".
- "auto": splash on TPU, cudnn on GPU where their limits allow, otherwise the blocked kernel. The
  platform is that of the mesh the step is traced under (`parallel.activation_sharding`), so an
  ahead-of-time compile for a TPU topology on a CPU host picks splash; with no mesh (the generate
  and eval CLIs' single-device calls) it is the blocked kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm2_jax import parallel

SPLASH_MULTIPLE = 128  # the splash kernel's smallest block (TPU lanes)
SPLASH_MAX_BLOCK = 512


def splash_block(S: int) -> int:
    """The splash block size for a segment of S tokens (a multiple of 128 that divides S)."""
    for block in range(min(SPLASH_MAX_BLOCK, S) // SPLASH_MULTIPLE * SPLASH_MULTIPLE, 0, -SPLASH_MULTIPLE):
        if S % block == 0:
            return block
    raise ValueError(f"splash attention needs a segment length that is a multiple of {SPLASH_MULTIPLE}, got {S}")


def supports(kernel: str, *, platform: str, kind: str, seg_len: int, head_dim: int, dtype) -> str:
    """'' when `kernel` can run this model on `platform`, else why not."""
    if kernel == "splash":
        if kind == "rmt":
            return "RMT's memory tokens attend across documents, which segment ids cannot express"
        if seg_len % SPLASH_MULTIPLE:
            return f"the segment length {seg_len} is not a multiple of {SPLASH_MULTIPLE}"
        return ""
    if kernel == "cudnn":
        if platform != "gpu":
            return f"cuDNN needs a GPU, the mesh's devices are {platform}"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention needs bfloat16 or float16, the model computes in {jnp.dtype(dtype)}"
        if head_dim % 8 or head_dim > 128:
            return f"cuDNN flash attention needs head_dim a multiple of 8 up to 128, got {head_dim}"
        return ""
    return ""


def mesh_platform() -> str | None:
    """The platform of the mesh the current trace runs under, or None outside one."""
    mesh = parallel.current_mesh()
    return None if mesh is None else mesh.devices.flat[0].platform


def choose(attention: str, *, platform: str | None, kind: str, seg_len: int, head_dim: int, dtype) -> str:
    """The concrete kernel `model.attention` names on this platform (resolving "auto")."""
    if attention != "auto":
        return attention
    want = {"tpu": "splash", "gpu": "cudnn"}.get(platform or "")
    ok = want and not supports(want, platform=platform, kind=kind, seg_len=seg_len, head_dim=head_dim, dtype=dtype)
    return want if ok else "blocked"


def _doc_mask(doc_ids_BS, shared):
    """(B, 1, S, S) same-document mask; padding (id 0) is its own document, RMT's memory tokens
    (negative ids) are seen by and see every document."""
    dq, dk = doc_ids_BS[:, :, None], doc_ids_BS[:, None, :]
    same = dq == dk
    if shared:
        same = same | (dq < 0) | (dk < 0)
    return same[:, None]


def sdpa_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared=False, implementation="cudnn"):
    """`jax.nn.dot_product_attention` (cuDNN by default; "xla" for the CPU tests)."""
    B, S, K, G, dh = q_BSKGDh.shape
    out_BSHDh = jax.nn.dot_product_attention(
        q_BSKGDh.reshape(B, S, K * G, dh), k_BSKDh, v_BSKDh, mask=_doc_mask(doc_ids_BS, shared),
        scale=1.0 / math.sqrt(dh), is_causal=True, implementation=implementation)
    return out_BSHDh.reshape(B, S, K, G, dh)


def _splash_local(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, interpret):
    """Splash attention of arrays local to one device (or of the whole arrays without a mesh)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
        splash_attention_mask as sm,
    )

    B, S, K, G, dh = q_BSKGDh.shape
    H, b = K * G, splash_block(S)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Query head h = k * G + g reads KV head h // G: the kernel's grouped-query convention.
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((S, S))] * H), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    q_BHSDh = jnp.transpose(q_BSKGDh / math.sqrt(dh), (0, 2, 3, 1, 4)).reshape(B, H, S, dh)
    k_BKSDh, v_BKSDh = jnp.transpose(k_BSKDh, (0, 2, 1, 3)), jnp.transpose(v_BSKDh, (0, 2, 1, 3))
    doc = doc_ids_BS.astype(jnp.int32)
    out_BHSDh = jax.vmap(kernel)(q_BHSDh, k_BKSDh, v_BKSDh, sk.SegmentIds(q=doc, kv=doc))
    return jnp.transpose(out_BHSDh.reshape(B, K, G, S, dh), (0, 3, 1, 2, 4))


def splash_attention(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS, shared=False):
    if shared:
        raise ValueError("splash attention cannot run RMT (memory tokens attend across documents)")
    mesh = parallel.current_mesh()
    platform = mesh_platform() or jax.devices()[0].platform
    local = functools.partial(_splash_local, interpret=platform != "tpu")
    if mesh is None:
        return local(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS)
    spec = lambda logical, x: parallel.resolve(logical, x.shape, mesh, parallel.current_rules())
    q_spec = spec(("batch", None, "kv_heads", None, None), q_BSKGDh)
    kv_spec = spec(("batch", None, "kv_heads", None), k_BSKDh)
    doc_spec = spec(("batch", None), doc_ids_BS)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, doc_spec), out_specs=q_spec,
                         check_vma=False)(q_BSKGDh, k_BSKDh, v_BSKDh, doc_ids_BS)

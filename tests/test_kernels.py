"""Platform attention kernels (lm2_jax/model/kernels.py) against the blocked kernel, and what
`model.attention="auto"` picks. The splash kernel runs in Pallas' interpreter here (the same kernel
code the TPU compiles; tests/test_aot.py compiles it for a v5e); the cuDNN call runs with
implementation="xla", which checks its layout and mask but not cuDNN itself (no GPU in CI)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import config as cfglib
from lm2_jax.errors import ConfigError
from lm2_jax.model import kernels, layers

B, S, K, G, DH = 2, 256, 2, 2, 32  # two splash blocks of 128 per segment


@pytest.fixture(scope="module")
def qkv():
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(B, S, K, G, DH)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(B, S, K, DH)), jnp.float32) for _ in range(2))
    doc = np.ones((B, S), np.int32)
    doc[0, 100:] = 2  # two packed documents, the second starting inside the first block
    doc[1, 200:] = 0  # padding
    return q, k, v, jnp.asarray(doc)


def _valid_loss(fn, doc):
    valid = (doc != 0)[:, :, None, None, None]
    w = jnp.sin(jnp.arange(DH, dtype=jnp.float32))[None, None, None, None, :]
    return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v, doc), 0.0) * w)


@pytest.mark.parametrize("name", ["splash", "sdpa"])
def test_kernel_matches_blocked_values_and_gradients(name, qkv):
    q, k, v, doc = qkv
    fn = kernels.splash_attention if name == "splash" else (
        lambda *a: kernels.sdpa_attention(*a, implementation="xla"))
    valid = np.asarray(doc != 0)
    ours, ref = np.asarray(fn(q, k, v, doc)), np.asarray(layers._blocked_attention(q, k, v, doc))
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=0)
    g_ours = jax.grad(_valid_loss(fn, doc), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_valid_loss(layers._blocked_attention, doc), argnums=(0, 1, 2))(q, k, v)
    for a, b, what in zip(g_ours, g_ref, "qkv"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0, err_msg=f"d{what}")


def test_sdpa_kernel_keeps_rmt_memory_tokens_visible_across_documents(qkv):
    q, k, v, doc = qkv
    doc = doc.at[:, :4].set(-1)  # RMT's read memory tokens: seen by every document
    ours = kernels.sdpa_attention(q, k, v, doc, shared=True, implementation="xla")
    ref = layers._blocked_attention(q, k, v, doc, shared=True)
    valid = np.asarray(doc != 0)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("platform,kind,seg,dtype,want", [
    ("tpu", "lm2", 1024, "bfloat16", "splash"),
    ("tpu", "lm2", 80, "float32", "blocked"),  # not a multiple of 128
    ("tpu", "rmt", 1024, "bfloat16", "blocked"),  # memory tokens cross documents
    ("gpu", "lm2", 1000, "bfloat16", "cudnn"),
    ("gpu", "lm2", 1024, "float32", "blocked"),  # cuDNN flash attention is 16-bit only
    ("cpu", "lm2", 1024, "bfloat16", "blocked"),
    (None, "lm2", 1024, "bfloat16", "blocked"),  # no mesh: the generate / eval CLIs' calls
])
def test_auto_picks_by_the_mesh_platform(platform, kind, seg, dtype, want):
    got = kernels.choose("auto", platform=platform, kind=kind, seg_len=seg, head_dim=64, dtype=jnp.dtype(dtype))
    assert got == want
    assert kernels.choose("einsum", platform="tpu", kind=kind, seg_len=seg, head_dim=64, dtype=dtype) == "einsum"


def test_auto_on_cpu_traces_the_blocked_kernel_under_a_mesh():
    from lm2_jax import parallel

    mesh = parallel.make_mesh(cfglib.defaults().mesh, jax.devices()[:1])
    with parallel.activation_sharding(mesh, parallel.DEFAULT_RULES):
        fn = layers.attention_fn(cfglib.model_defaults(), 256)
    assert fn is layers.ATTENTION_FNS["blocked"]


def test_splash_block_divides_the_segment():
    assert kernels.splash_block(128) == 128 and kernels.splash_block(1024) == 512 and kernels.splash_block(384) == 384
    with pytest.raises(ValueError, match="multiple of 128, got 200"):
        kernels.splash_block(200)


@pytest.mark.parametrize("change,message", [
    (dict(segment_len=16), "the segment length 16 is not a multiple of 128"),
    (dict(kind="rmt"), "RMT's memory tokens attend across documents"),
])
def test_explicit_splash_that_cannot_run_is_a_config_error(change, message):
    config = cfglib.defaults()
    config.model.attention = "splash"
    config.model.memory.segment_len = change.get("segment_len", 128)
    if "kind" in change:
        config.model.kind, config.model.memory.layers = "rmt", 0
    with pytest.raises(ConfigError, match="model.attention") as err:
        cfglib.validate(config)
    assert message in str(err.value)

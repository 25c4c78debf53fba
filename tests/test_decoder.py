"""The segment recurrence: causality, memory flow, padding, gradients, truncated BPTT, scan size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lm2_jax.model import decoder
from tests.conftest import tiny_model

T = 16


def _cfg(segment_len=0, layers=2, depth=2, **memory):
    return tiny_model(61, depth, layers=layers, segment_len=segment_len, **memory)


@functools.cache
def _model(segment_len, layers=2, depth=2, **memory):
    m = _cfg(segment_len, layers, depth, **memory)
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(0)))
    # Larger weights than the 0.02 init so that gates and memory reads are far from trivial.
    params = jax.tree.map(lambda p: p * 10 if p.ndim >= 2 else p, params)
    fwd = jax.jit(lambda p, tok, doc: decoder.forward(m, p, tok, doc_ids_BT=doc))
    return m, params, fwd


def _tokens(seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, 61, (batch, T)).astype(np.int32)


@pytest.mark.parametrize("segment_len", [1, 7, T])
def test_changing_token_t_changes_no_earlier_logit(segment_len):
    m, params, fwd = _model(segment_len)
    tokens = _tokens()
    doc = np.ones_like(tokens)
    base, _ = fwd(params, tokens, doc)
    # Every position, so segment starts/ends (t = 7, 14 for S=7) and in-segment positions are covered.
    for t in range(T):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % m.vocab_size
        out, _ = fwd(params, changed, doc)
        np.testing.assert_allclose(np.asarray(out[:, :t]), np.asarray(base[:, :t]), atol=1e-6, rtol=0)
        assert np.abs(np.asarray(out[:, t:] - base[:, t:])).max() > 1e-4


@pytest.mark.parametrize("segment_len", [1, 7])
def test_memory_carries_information_across_segments(segment_len):
    """With S=1 self-attention sees only the token itself: a later logit can depend on an earlier
    token only through the memory."""
    _, params, fwd = _model(segment_len)
    tokens = _tokens(1)
    doc = np.ones_like(tokens)
    base, mem = fwd(params, tokens, doc)
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 5) % 61
    out, mem2 = fwd(params, changed, doc)
    assert np.abs(np.asarray(out[:, -1] - base[:, -1])).max() > 1e-4
    assert np.abs(np.asarray(mem2 - mem)).max() > 1e-4


def test_vanilla_has_no_cross_segment_path():
    m, params, fwd = _model(7, layers=0)
    tokens = _tokens(2)
    doc = np.ones_like(tokens)
    base, mem = fwd(params, tokens, doc)
    assert mem.shape == (2, 0, m.d_model)
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 5) % 61
    out, _ = fwd(params, changed, doc)
    np.testing.assert_array_equal(np.asarray(out[:, 7:]), np.asarray(base[:, 7:]))


@pytest.mark.parametrize("layers", [0, 2], ids=["vanilla", "memory-in-all"])
def test_convolution_is_causal_and_stays_inside_its_segment(layers):
    """`model.conv_width`: changing token t moves no earlier logit; without memory it moves no logit
    outside t's own segment either (the taps never reach into the previous segment)."""
    m = _cfg(7, layers)
    m.conv_width = 4
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(1)))
    params = jax.tree.map(lambda p: p * 10 if p.ndim >= 2 else p, params)
    fwd = jax.jit(lambda p, tok: decoder.forward(m, p, tok)[0])
    tokens = _tokens(3)
    base = np.asarray(fwd(params, tokens))
    for t in range(T):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % m.vocab_size
        diff = np.abs(np.asarray(fwd(params, changed)) - base).max(axis=(0, 2))
        assert diff[:t].max(initial=0.0) <= 1e-6
        end = (t // 7 + 1) * 7
        assert diff[t:min(end, T)].max() > 1e-4
        if not layers:
            assert diff[end:].max(initial=0.0) == 0.0


def test_padding_segment_leaves_memory_unchanged():
    """Row 0 is padded from t=7 on: its memory after the whole sequence equals its memory after the
    first (only valid) segment, and the padded positions change no memory of row 1."""
    m, params, fwd = _model(7)
    tokens = _tokens(3)
    doc = np.ones_like(tokens)
    doc[0, 7:] = 0
    tokens[0, 7:] = 0
    _, mem_full = fwd(params, tokens, doc)
    fwd7 = jax.jit(lambda p, tok, d: decoder.forward(m, p, tok, doc_ids_BT=d))
    _, mem_first = fwd7(params, tokens[:, :7], doc[:, :7])
    np.testing.assert_array_equal(np.asarray(mem_full[0]), np.asarray(mem_first[0]))
    assert np.abs(np.asarray(mem_full[1] - mem_first[1])).max() > 1e-4
    # The padded tail changes nothing in row 0 whatever the padded token ids are.
    tokens2 = tokens.copy()
    tokens2[0, 7:] = 13
    logits2, mem2 = fwd(params, tokens2, doc)
    np.testing.assert_array_equal(np.asarray(mem2), np.asarray(mem_full))


def _loss(m, params, tokens, **kw):
    logits, _ = decoder.forward(m, params, tokens[:, :-1], **kw)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize("candidate,init", [("memory", "identity"), ("tokens", "learned")])
def test_gradients_finite_and_nonzero_through_three_segments(candidate, init):
    m = _cfg(5, layers=1, depth=2, write_candidate=candidate, init=init)
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(1)))
    tokens = jnp.asarray(_tokens(4))  # 15 inputs in segments of 5: three segments
    grads = jax.jit(jax.grad(lambda p: _loss(m, p, tokens)))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert any("memory" in jax.tree_util.keystr(path) for path, _ in flat)
    for path, g in flat:
        g = np.asarray(g)
        name = jax.tree_util.keystr(path)
        assert np.isfinite(g).all(), name
        # Stacked layers: every layer's slice must get gradient, not just the stack as a whole.
        per_layer = g.reshape(g.shape[0], -1) if "blocks" in name else g.reshape(1, -1)
        assert (np.abs(per_layer).max(axis=1) > 0).all(), name


def test_truncated_bptt_stops_gradient_at_segment_boundaries():
    """Loss on the last segment only: the write gates act only through later segments' reads, so
    with truncation every segment (k = 1) they get no gradient, and with full BPTT they do."""
    tokens = jnp.asarray(_tokens(5))

    def last_segment_loss(m, p):
        logits, _ = decoder.forward(m, p, tokens)
        return jnp.mean(logits[:, -4:] ** 2)

    grads = {}
    for k in (0, 1):
        m = _cfg(4, layers=1, depth=1, bptt_segments=k)
        params = nn.meta.unbox(decoder.init_params(m, jax.random.key(2)))
        grads[k] = jax.jit(jax.grad(functools.partial(last_segment_loss, m)))(params)["mem_blocks"]["memory"]
    assert np.abs(np.asarray(grads[0]["in_gate"])).max() > 0
    assert np.abs(np.asarray(grads[1]["in_gate"])).max() == 0
    assert np.abs(np.asarray(grads[1]["q"])).max() > 0  # the read itself still learns


def _lowered_size(depth: int, layers: int) -> int:
    m = _cfg(4, layers=layers, depth=depth)
    params = jax.eval_shape(lambda: nn.meta.unbox(decoder.init_params(m, jax.random.key(0))))
    tokens = jax.ShapeDtypeStruct((2, 13), jnp.int32)
    lowered = jax.jit(jax.value_and_grad(lambda p, t: _loss(m, p, t))).lower(params, tokens)
    return len(lowered.as_text().splitlines())


@pytest.mark.parametrize("all_memory", [True, False])
def test_layer_scan_keeps_program_size_flat(all_memory):
    small = _lowered_size(2, 2 if all_memory else 1)
    big = _lowered_size(16, 16 if all_memory else 1)
    assert big <= 1.2 * small, (small, big)


def test_stream_carry_equals_one_long_sequence():
    """Feeding the final memory of the first half back in (carry="stream") reproduces the second half
    of a single pass, when the halves are whole segments and positions continue."""
    m, params, fwd = _model(4)
    tokens = _tokens(6)
    full, mem_full = fwd(params, tokens, np.ones_like(tokens))
    first, mem_half = decoder.forward(m, params, tokens[:, :8])
    pos = np.broadcast_to(np.arange(8, 16), (2, 8))
    second, mem_end = decoder.forward(m, params, tokens[:, 8:], positions_BT=pos, mem_BND=mem_half)
    np.testing.assert_allclose(np.asarray(second), np.asarray(full[:, 8:]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(mem_end), np.asarray(mem_full), atol=1e-6, rtol=0)


def _segment_scan_unrolls(m, params, tokens, n_seg=3):
    """The `unroll` of every scan over the n_seg segments (forward and backward) in the step's jaxpr."""
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda p: _loss(m, p, tokens)))(params)
    return {e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == n_seg}


def test_unrolled_segments_equal_the_scan_in_loss_and_gradients():
    """`memory.unroll_segments` (with remat_segments=False) only changes how the segment loop is
    compiled: loss and gradients over three segments equal the scan's; past the limit, or with
    remat_segments, the segments stay a scan."""
    tokens = _tokens(3)[:, :16]  # 15 inputs: three segments of 5
    m_scan = _cfg(5, layers=2, remat_segments=False)
    params = nn.meta.unbox(decoder.init_params(m_scan, jax.random.key(0)))
    params = jax.tree.map(lambda p: p * 10 if p.ndim >= 2 else p, params)
    m_unroll = _cfg(5, layers=2, remat_segments=False, unroll_segments=3)
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(lambda p, m=m: _loss(m, p, tokens)))(params)
                          for m in (m_scan, m_unroll))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert _segment_scan_unrolls(m_unroll, params, tokens) == {3}
    assert _segment_scan_unrolls(m_scan, params, tokens) == {1}
    assert _segment_scan_unrolls(_cfg(5, layers=2, remat_segments=False, unroll_segments=2), params, tokens) == {1}
    assert _segment_scan_unrolls(_cfg(5, layers=2, remat_segments=True, unroll_segments=3), params, tokens) == {1}

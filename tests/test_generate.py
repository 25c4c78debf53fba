"""Generation with the KV cache and test-time memory equals teacher forcing; sampling is reproducible."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import generate as gen
from lm2_jax.errors import UsageError
from lm2_jax.model import decoder
from tests.conftest import tiny_model

VOCAB = 61
SEGMENT = 5
PROMPT_LENGTHS = (3, 7, 10)  # one row inside its first segment, two past a boundary
NEW = 9  # every row crosses at least two more segment boundaries while generating


def _params(m, seed=0):
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(seed)))
    # Weights far larger than the 0.02 init so gates, memory reads and logits are far from trivial.
    return jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).astype(np.int32) for n in PROMPT_LENGTHS]


# memory-in-1 is the inner loop's case; the other variants compile their own programs (slow).
@pytest.mark.parametrize("memory", [
    pytest.param(dict(layers=0), marks=pytest.mark.slow), dict(layers=1),
    pytest.param(dict(layers=2), marks=pytest.mark.slow),
    pytest.param(dict(layers=1, normalize_bank=True, placement="after_attention", top_k=3, write_candidate="tokens",
                      init="learned", routing="mass"), marks=pytest.mark.slow),
    pytest.param(dict(layers=1, write_rule="delta", write_candidate="tokens", normalize_bank=True),
                 marks=pytest.mark.slow),
    pytest.param(dict(layers=1, write_rule="delta", write_candidate="tokens", normalize_bank=True, address="slots",
                      read_scope="token"), marks=pytest.mark.slow),
], ids=["vanilla", "memory-in-1", "memory-in-all", "memory-options", "delta-write", "token-scope"])
def test_generated_logits_equal_teacher_forced_forward(memory):
    _check_parity(tiny_model(VOCAB, 2, segment_len=SEGMENT, **memory))


@pytest.mark.parametrize("layers", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["memory-in-1", "vanilla"])
def test_generation_parity_with_the_segment_convolution(layers):
    """`model.conv_width`: the cache keeps the segment's convolution inputs; a width (4) near the
    segment length (5) makes every decoded token's window reach back to the segment's start."""
    m = tiny_model(VOCAB, 2, layers=layers, segment_len=SEGMENT)
    m.conv_width = 4
    _check_parity(m)


@pytest.mark.slow
@pytest.mark.parametrize("segment_len", [1, 0], ids=["one-token-segments", "one-segment"])
def test_generation_parity_at_the_extreme_segment_lengths(segment_len):
    _check_parity(tiny_model(VOCAB, 2, layers=1, segment_len=segment_len))


def _check_parity(m):
    params = _params(m)
    prompts = _prompts()
    out = gen.generate(m, params, prompts, NEW, return_logits=True)
    for b, prompt in enumerate(prompts):
        tokens = out.tokens[b]
        assert len(tokens) == NEW
        full = np.concatenate([prompt, tokens])
        logits, _ = decoder.forward(m, params, jnp.asarray(full[None]))  # this row alone, unpadded
        ref = np.asarray(logits[0, len(prompt) - 1:len(full) - 1])
        np.testing.assert_allclose(out.logits[b], ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.argmax(ref, -1), tokens)  # greedy: the same tokens


def test_generation_memory_differs_from_no_memory():
    """Not vacuous: with memory, what an earlier segment held changes the generated logits."""
    m = tiny_model(VOCAB, 2, layers=1, segment_len=SEGMENT)
    params = _params(m)
    a, b = np.arange(1, 13, dtype=np.int32), np.arange(1, 13, dtype=np.int32)
    b[0] = 40  # differs only in the first segment, which the last tokens see only through the memory
    la = gen.generate(m, params, [a], 2, return_logits=True).logits
    lb = gen.generate(m, params, [b], 2, return_logits=True).logits
    assert np.abs(la - lb).max() > 1e-3


def test_eos_stops_a_row():
    m = tiny_model(VOCAB, 2, layers=1, segment_len=SEGMENT)
    params = _params(m)
    prompts = _prompts()
    free = gen.generate(m, params, prompts, NEW)
    eos = int(free.tokens[0][2])  # the third token row 0 generates becomes its <eos>
    out = gen.generate(m, params, prompts, NEW, eos_id=eos)
    first = np.flatnonzero(free.tokens[0] == eos)[0]
    np.testing.assert_array_equal(out.tokens[0], free.tokens[0][:first + 1])
    for row_free, row in zip(free.tokens, out.tokens):
        stop = np.flatnonzero(row_free == eos)
        np.testing.assert_array_equal(row, row_free[:stop[0] + 1] if len(stop) else row_free)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    m = tiny_model(VOCAB, 2, layers=1, segment_len=SEGMENT)
    params = _params(m)
    prompts = _prompts(1)
    greedy = gen.generate(m, params, prompts, NEW).tokens
    key = jax.random.key(3)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, key=key)
    first = gen.generate(m, params, prompts, NEW, **kw).tokens
    again = gen.generate(m, params, prompts, NEW, **kw).tokens
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    hot = gen.generate(m, params, prompts, NEW, temperature=5.0, key=key).tokens
    assert any((x != g).any() for x, g in zip(hot, greedy))  # sampling really samples
    top1 = gen.generate(m, params, prompts, NEW, temperature=1.0, top_k=1, key=jax.random.key(9)).tokens
    for x, g in zip(top1, greedy):
        np.testing.assert_array_equal(x, g)


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {int(gen.sample(logits, jax.random.key(i), temperature=1.0, **kw)[0]) for i in range(200)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert draws(top_p=0.4) == {0}  # the best token alone
    assert draws() == {0, 1, 2, 3}
    assert int(gen.sample(logits, jax.random.key(0))[0]) == 0  # temperature 0: greedy


@pytest.mark.parametrize("kw,needle", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=0.5), "explicit PRNG key"),
    (dict(top_p=0.0, key=jax.random.key(0), temperature=1.0), "top_p=0.0"),
])
def test_bad_arguments_are_named(kw, needle):
    m = tiny_model(VOCAB, 2, layers=1, segment_len=SEGMENT)
    kw = dict(dict(max_new_tokens=2), **kw)
    with pytest.raises(UsageError, match=needle):
        gen.generate(m, {}, _prompts(), kw.pop("max_new_tokens"), **kw)


def test_prompt_longer_than_the_model_can_consume():
    m = tiny_model(VOCAB, 2, layers=0, segment_len=0)
    params = _params(m)
    long = [np.arange(1, 31, dtype=np.int32)]
    with pytest.raises(UsageError, match=r"prompt 0 has 30 tokens; with max_new_tokens=4 the model can consume at "
                                         r"most 20 \(max_len=24"):
        gen.generate(m, params, long, 4, max_len=24)
    kept = gen.generate(m, params, long, 4, max_len=24, truncate="left", return_logits=True)
    short = np.concatenate([long[0][:1], long[0][-19:]])  # the first token and the newest 19
    np.testing.assert_array_equal(kept.tokens[0], gen.generate(m, params, [short], 4).tokens[0])

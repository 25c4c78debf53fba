"""Vanilla (L_m = 0) parity with Hugging Face `LlamaForCausalLM` (PyTorch, CPU, float32).

Weights are made by transformers, moved across with the package's own mapping
(`lm2_jax.export.hf`), and both models run the same tokens; logits must agree to 1e-4.
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from lm2_jax import config as cfglib
from lm2_jax.export import hf
from lm2_jax.model import decoder


def _cfg(tied: bool, llama3: bool):
    m = cfglib.model_defaults()
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 97, 64, 3, 4, 2, 96
    m.tie_embeddings = tied
    m.rope_theta = 10000.0
    if llama3:  # a short original context so the scaling changes most of the tiny model's frequencies
        m.rope_scaling.update(dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_len=64))
    cfglib.validate_model(m)
    return m


def _hf_model(m, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf.hf_config(m), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1: perturb them so the scales are really tested
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied,llama3", [(True, True), (False, True), (True, False), (False, False)])
def test_vanilla_logits_match_transformers(tied, llama3):
    m = _cfg(tied, llama3)
    model = _hf_model(m, seed=int(tied) * 2 + int(llama3))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    like = jax.eval_shape(lambda: nn.meta.unbox(decoder.init_params(m, jax.random.key(0))))
    params = jax.tree.map(np.asarray, hf.hf_to_params(m, state, like))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, like)

    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    ours, _ = jax.jit(lambda p, t: decoder.forward(m, p, t))(params, tokens)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


def test_llama3_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lm2_jax.model.layers import rope_inv_freq

    m = _cfg(True, True)
    config = transformers.LlamaConfig(**hf.hf_config(m))
    inv_ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(rope_inv_freq(m), inv_ref.numpy(), rtol=1e-6)
    assert not np.allclose(rope_inv_freq(m), rope_inv_freq(_cfg(True, False)))


@pytest.mark.parametrize("candidate,init,variant", [
    ("memory", "identity", {}), ("tokens", "learned", {}),
    ("tokens", "identity", dict(placement="after_attention", normalize_bank=True, routing="mass")),
    ("tokens", "identity", dict(conv_width=4)),
    ("tokens", "identity", dict(write_rule="delta", normalize_bank=True)),
    ("memory", "identity", dict(address="slots")),
])
def test_mapping_round_trips_with_memory(candidate, init, variant):
    m = _cfg(False, False)
    variant = dict(variant)
    m.conv_width = variant.pop("conv_width", 0)
    m.memory.update(dict(layers=2, slots=8, heads=2, write_candidate=candidate, init=init, **variant))
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(3)))
    state = hf.params_to_hf(m, params)
    assert set(state) == set(hf.expected_names(m))
    back = hf.hf_to_params(m, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)


def test_missing_tensor_is_named():
    m = _cfg(True, False)
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(0)))
    state = hf.params_to_hf(m, params)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.hf_to_params(m, state, params)

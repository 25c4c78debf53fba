"""The JAX <-> Hugging Face Llama parameter mapping (both directions) and the matching config.json.

The backbone uses `LlamaForCausalLM`'s names and torch `nn.Linear` layout (out, in), so a vanilla
(L_m = 0) model loads into `transformers` unchanged. Memory blocks add `model.layers.{i}.memory.*`
(and `model.memory_init` when learned) in the same layout; `transformers` does not know them, the
project's PyTorch LM2 does.
"""

from __future__ import annotations

import numpy as np
from flax import linen as nn

from lm2_jax.config import head_dim
from lm2_jax.model import decoder

# (path inside a block's params, HF suffix inside `model.layers.{i}.`, kind)
# kinds: "in" = our (D, H, dh) q/k/v; "out" = our (H, dh, D) output projection;
#        "mat" = our (in, out) matrix; "vec" = a vector kept as is.
_BLOCK = [
    (("attn_norm", "scale"), "input_layernorm.weight", "vec"),
    (("attn", "q"), "self_attn.q_proj.weight", "in"),
    (("attn", "k"), "self_attn.k_proj.weight", "in"),
    (("attn", "v"), "self_attn.v_proj.weight", "in"),
    (("attn", "o"), "self_attn.o_proj.weight", "out"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vec"),
    (("mlp", "gate"), "mlp.gate_proj.weight", "mat"),
    (("mlp", "up"), "mlp.up_proj.weight", "mat"),
    (("mlp", "down"), "mlp.down_proj.weight", "mat"),
]
_MEMORY = [
    (("memory", "q"), "memory.q_proj.weight", "in"),
    (("memory", "k"), "memory.k_proj.weight", "in"),
    (("memory", "v"), "memory.v_proj.weight", "in"),
    (("memory", "o"), "memory.o_proj.weight", "out"),
    (("memory", "out_gate"), "memory.out_gate.weight", "mat"),
    (("memory", "in_gate"), "memory.in_gate.weight", "mat"),
    (("memory", "in_bias"), "memory.in_gate.bias", "vec"),
    (("memory", "forget_gate"), "memory.forget_gate.weight", "mat"),
    (("memory", "forget_bias"), "memory.forget_gate.bias", "vec"),
]
_CANDIDATE = [(("memory", "cand"), "memory.candidate.weight", "mat")]
_BANK_NORM = [(("memory", "bank_norm", "scale"), "memory.bank_norm.weight", "vec")]  # memory.normalize_bank
_MEMORY_NORM = [(("memory_norm", "scale"), "memory_layernorm.weight", "vec")]  # placement="after_attention"
_CONV = [(("conv", "taps"), "segment_conv.weight", "vec")]  # model.conv_width: (K, D), tap j reads token t - j


def _to_hf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "in":  # (D, H, dh) -> (H*dh, D)
        return a.reshape(a.shape[0], -1).T
    if kind == "out":  # (H, dh, D) -> (D, H*dh)
        return a.reshape(-1, a.shape[-1]).T
    return a.T if kind == "mat" else a


def _from_hf(a: np.ndarray, kind: str, like_shape) -> np.ndarray:
    if kind in ("in", "out"):
        return a.T.reshape(like_shape)
    return a.T if kind == "mat" else a


def _block_table(model_cfg, has_memory: bool):
    table = list(_BLOCK) + (_CONV if model_cfg.conv_width else [])
    if has_memory:
        mem = model_cfg.memory
        table += _MEMORY + (_CANDIDATE if mem.write_candidate == "tokens" else [])
        table += _BANK_NORM if mem.normalize_bank else []
        table += _MEMORY_NORM if mem.placement == "after_attention" else []
    return table


def _layers(model_cfg):
    """(layer index, params key of its stack, index inside the stack, has memory) per block."""
    L_m = model_cfg.memory.layers
    return [(i, "mem_blocks", i, True) if i < L_m else (i, "blocks", i - L_m, False) for i in range(model_cfg.n_layers)]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def params_to_hf(model_cfg, params) -> dict[str, np.ndarray]:
    """Our parameter tree -> a flat HF state dict of float32 numpy arrays."""
    params = nn.meta.unbox(params)
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    if "memory_init" in params:
        out["model.memory_init"] = np.asarray(params["memory_init"])
    for i, stack, j, has_mem in _layers(model_cfg):
        for path, name, kind in _block_table(model_cfg, has_mem):
            out[f"model.layers.{i}.{name}"] = _to_hf(np.asarray(_get(params[stack], path)[j]), kind)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_to_params(model_cfg, state: dict, like: dict) -> dict:
    """A HF state dict (numpy or torch tensors) -> our parameter tree, shaped like `like`.

    `like` is a parameter tree (arrays or ShapeDtypeStructs) of the target config; every name the
    mapping expects must be in `state`, and a missing one raises a KeyError naming it.
    """
    like = nn.meta.unbox(like)
    get = lambda name: np.asarray(state[name].float().numpy() if hasattr(state[name], "float") else state[name],
                                  np.float32)
    missing = [n for n in expected_names(model_cfg) if n not in state]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": {"scale": get("model.norm.weight")}}
    if not model_cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    if "memory_init" in like:
        params["memory_init"] = get("model.memory_init")
    for stack in ("mem_blocks", "blocks"):
        if stack not in like:
            continue
        flat = {}
        for i, s, _, has_mem in _layers(model_cfg):
            if s != stack:
                continue
            for path, name, kind in _block_table(model_cfg, has_mem):
                flat.setdefault(path, []).append(_from_hf(get(f"model.layers.{i}.{name}"), kind,
                                                          _get(like[stack], path).shape[1:]))
        tree: dict = {}
        for path, arrays in flat.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = np.stack(arrays)
        params[stack] = tree
    return params


def expected_names(model_cfg) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not model_cfg.tie_embeddings:
        names.append("lm_head.weight")
    if decoder.memory_slots(model_cfg) and model_cfg.memory.init == "learned":
        names.append("model.memory_init")
    for i, _, _, has_mem in _layers(model_cfg):
        names += [f"model.layers.{i}.{name}" for _, name, _ in _block_table(model_cfg, has_mem)]
    return names


def hf_config(model_cfg) -> dict:
    """`LlamaConfig` keyword arguments (the config.json of an export) for the backbone."""
    rs = model_cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)}
    if rs.type == "llama3":
        rope.update(rope_type="llama3", factor=float(rs.factor), low_freq_factor=float(rs.low_freq_factor),
                    high_freq_factor=float(rs.high_freq_factor),
                    original_max_position_embeddings=int(rs.original_max_len))
    return dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model,
        intermediate_size=model_cfg.d_ff,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.n_kv_heads,
        head_dim=head_dim(model_cfg),
        rms_norm_eps=float(model_cfg.norm_eps),
        rope_parameters=rope,
        tie_word_embeddings=bool(model_cfg.tie_embeddings),
        max_position_embeddings=max(8192, int(rs.original_max_len * (rs.factor if rs.type == "llama3" else 1))),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )

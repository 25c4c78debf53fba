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
    (("memory", "v"), "memory.v_proj.weight", "in"),
    (("memory", "o"), "memory.o_proj.weight", "out"),
    (("memory", "out_gate"), "memory.out_gate.weight", "mat"),
]
_CONTENT_KEYS = [(("memory", "k"), "memory.k_proj.weight", "in")]  # memory.address="content"
_SLOT_KEYS = [(("memory", "slot_keys"), "memory.slot_keys", "vec")]  # memory.address="slots": (H, N, dh)
_GATED_WRITE = [  # memory.write_rule="gated"
    (("memory", "in_gate"), "memory.in_gate.weight", "mat"),
    (("memory", "in_bias"), "memory.in_gate.bias", "vec"),
    (("memory", "forget_gate"), "memory.forget_gate.weight", "mat"),
    (("memory", "forget_bias"), "memory.forget_gate.bias", "vec"),
]
_CANDIDATE = [(("memory", "cand"), "memory.candidate.weight", "mat")]
_DELTA_WRITE = _CANDIDATE + [  # memory.write_rule="delta"
    (("memory", "write_strength"), "memory.write_strength", "vec"),
    (("memory", "write_bias"), "memory.write_bias", "vec"),
]
_BANK_NORM = [(("memory", "bank_norm", "scale"), "memory.bank_norm.weight", "vec")]  # memory.normalize_bank
_MEMORY_NORM = [(("memory_norm", "scale"), "memory_layernorm.weight", "vec")]  # placement="after_attention"
_CONV = [(("conv", "taps"), "segment_conv.weight", "vec")]  # model.conv_width: (K, D), tap j reads token t - j


def _to_hf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "in":  # (D, H, dh) -> (H*dh, D)
        return a.reshape(a.shape[0], -1).T
    if kind == "out":  # (H, dh, D) -> (D, H*dh)
        return a.reshape(-1, a.shape[-1]).T
    return a.T if kind == "mat" else a


def hf_shape(kind: str, shape) -> tuple[int, ...]:
    """The shape `_to_hf` gives an array of ours of `shape`, without an array."""
    if kind == "in":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "out":
        return (shape[-1], int(np.prod(shape[:-1])))
    return tuple(shape[::-1]) if kind == "mat" else tuple(shape)


def _from_hf(a: np.ndarray, kind: str, like_shape) -> np.ndarray:
    if kind in ("in", "out"):
        return a.T.reshape(like_shape)
    return a.T if kind == "mat" else a


def _block_table(model_cfg, has_memory: bool):
    table = list(_BLOCK) + (_CONV if model_cfg.conv_width else [])
    if has_memory:
        mem = model_cfg.memory
        table += _SLOT_KEYS if mem.address == "slots" else _CONTENT_KEYS
        if mem.write_rule == "delta":
            table += _MEMORY + _DELTA_WRITE
        else:
            table += _MEMORY + _GATED_WRITE + (_CANDIDATE if mem.write_candidate == "tokens" else [])
        table += _BANK_NORM if mem.normalize_bank else []
        table += _MEMORY_NORM if mem.placement == "after_attention" else []
    return table


def _layers(model_cfg):
    """(layer index, params key of its stack, index inside the stack, has memory) per block."""
    L_m = model_cfg.memory.layers
    return [(i, "mem_blocks", i, True) if i < L_m else (i, "blocks", i - L_m, False) for i in range(model_cfg.n_layers)]


def leaf_at(tree, path):
    """The leaf of a nested dict at a `leaf_table` path."""
    for key in path:
        tree = tree[key]
    return tree


def put_leaf(tree: dict, path, value) -> dict:
    """`tree` with `value` set at `path` (intermediate dicts created); returns `tree`."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return tree


def leaf_table(model_cfg) -> list[tuple[tuple, list[tuple[str, str, int | None]]]]:
    """[(path of a leaf in our parameter tree, [(HF name, kind, index in the leaf's layer stack or
    None)])]: which HF tensors each of our arrays becomes. One leaf is one restore of an export."""
    table = [(("embed",), [("model.embed_tokens.weight", "vec", None)]),
             (("final_norm", "scale"), [("model.norm.weight", "vec", None)])]
    if not model_cfg.tie_embeddings:
        table.append((("lm_head",), [("lm_head.weight", "mat", None)]))
    if decoder.memory_slots(model_cfg) and model_cfg.memory.init == "learned":
        table.append((("memory_init",), [("model.memory_init", "vec", None)]))
    by_leaf: dict[tuple, list] = {}
    for i, stack, j, has_mem in _layers(model_cfg):
        for path, name, kind in _block_table(model_cfg, has_mem):
            by_leaf.setdefault((stack, *path), []).append((f"model.layers.{i}.{name}", kind, j))
    return table + list(by_leaf.items())


def leaf_to_hf(entries, leaf: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The HF tensors (float32, contiguous) of one of our leaves, per `leaf_table`."""
    leaf = np.asarray(leaf)
    return [(name, np.ascontiguousarray(_to_hf(leaf if j is None else leaf[j], kind), dtype=np.float32))
            for name, kind, j in entries]


def params_to_hf(model_cfg, params) -> dict[str, np.ndarray]:
    """Our parameter tree -> a flat HF state dict of float32 numpy arrays."""
    params = nn.meta.unbox(params)
    return dict(pair for path, entries in leaf_table(model_cfg) for pair in leaf_to_hf(entries, leaf_at(params, path)))


def _numpy(t) -> np.ndarray:
    return np.asarray(t.float().numpy() if hasattr(t, "float") else t, np.float32)


def hf_to_leaf(entries, state, like_shape) -> np.ndarray:
    """One of our leaves (float32) from HF tensors (numpy or torch; `state[name]` may load lazily)."""
    inner = like_shape if entries[0][2] is None else like_shape[1:]
    arrays = [_from_hf(_numpy(state[name]), kind, inner) for name, kind, _ in entries]
    return arrays[0] if entries[0][2] is None else np.stack(arrays)


def hf_to_params(model_cfg, state, like: dict) -> dict:
    """A HF state dict (numpy or torch tensors) -> our parameter tree, shaped like `like`.

    `like` is a parameter tree (arrays or ShapeDtypeStructs) of the target config; every name the
    mapping expects must be in `state`, and a missing one raises a KeyError naming it.
    """
    like = nn.meta.unbox(like)
    missing = [n for n in expected_names(model_cfg) if n not in state]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    params: dict = {}
    for path, entries in leaf_table(model_cfg):
        put_leaf(params, path, hf_to_leaf(entries, state, leaf_at(like, path).shape))
    return params


def expected_names(model_cfg) -> list[str]:
    return [name for _, entries in leaf_table(model_cfg) for name, _, _ in entries]


def hf_config(model_cfg) -> dict:
    """`LlamaConfig` keyword arguments for the backbone (the config.json of a vanilla export)."""
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


def plain_llama(model_cfg) -> bool:
    """Whether the model is exactly a Hugging Face Llama: no memory (L_m = 0, not RMT), no
    convolution, and one segment (a segmented vanilla model attends inside its segments only,
    which `LlamaForCausalLM` cannot express)."""
    return (model_cfg.kind == "lm2" and not model_cfg.memory.layers and not model_cfg.conv_width
            and not model_cfg.memory.segment_len)


def lm2_config(model_cfg) -> dict:
    """`LM2Config` keyword arguments (`configuration_lm2.py`): the backbone's Llama keys and the
    memory, segment and convolution settings `modeling_lm2.py` needs."""
    mem = model_cfg.memory
    return dict(
        hf_config(model_cfg),
        lm2_kind=model_cfg.kind,
        memory_layers=int(mem.layers),
        memory_slots=int(mem.slots),
        memory_heads=int(mem.heads),
        memory_top_k=int(mem.top_k),
        memory_init=mem.init,
        memory_write_candidate=mem.write_candidate,
        memory_placement=mem.placement,
        memory_normalize_bank=bool(mem.normalize_bank),
        memory_routing=mem.routing,
        memory_write_rule=mem.write_rule,
        memory_address=mem.address,
        memory_read_scope=mem.read_scope,
        segment_len=int(mem.segment_len),
        conv_width=int(model_cfg.conv_width),
    )

"""A Hugging Face Llama folder -> a training workdir at step 0 (`python -m lm2_jax.export --from_hf`).

The backbone (embeddings, every block's attention, MLP and norms, the final norm, an untied
`lm_head`) is read from the folder's safetensors, sharded or not, bfloat16 or float32, one tensor
at a time; everything LM2 adds (memory blocks, the convolution, a learned M_0) keeps the fresh
initialisation of `train.seed`, as does the optimizer. The result is an ordinary workdir
holding the params alone (`config.json`, an Orbax checkpoint at step 0, `imported.json`):
`python -m lm2_jax.train --config.train.init_from=<it>` starts a new run from its params with a
fresh optimizer, and `eval`, `generate` and `export` read it like any other workdir.

Before anything is read, the folder's `config.json` must describe the same backbone as `--config`
(a shape check cannot see, e.g., how q_proj splits into heads); then every tensor is checked by
name and shape, and a mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from lm2_jax.errors import DataError, UsageError
from lm2_jax.export import files, hf
from lm2_jax.model import decoder
from lm2_jax.train import checkpoint

# config.json keys that must equal our model section's (key, our field name, our value getter)
_SAME = [("vocab_size", "model.vocab_size"), ("hidden_size", "model.d_model"), ("intermediate_size", "model.d_ff"),
         ("num_hidden_layers", "model.n_layers"), ("num_attention_heads", "model.n_heads"),
         ("num_key_value_heads", "model.n_kv_heads"), ("head_dim", "model.n_heads")]
_IGNORED = ("rotary_emb.inv_freq",)  # buffers older exports carry; computed, never learned


def _backbone(name: str) -> bool:
    return not any(part in name for part in (".memory.", "segment_conv", "memory_layernorm", "memory_init"))


def _rope(hf_cfg: dict) -> dict:
    """RoPE settings of a config.json in either spelling (transformers 5's `rope_parameters`, or
    the older `rope_theta` + `rope_scaling`)."""
    rp = dict(hf_cfg.get("rope_scaling") or {})
    rp.update(hf_cfg.get("rope_parameters") or {})
    rp.setdefault("rope_theta", hf_cfg.get("rope_theta"))
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def check_model_type(hf_cfg: dict, where: str) -> None:
    mt = hf_cfg.get("model_type")
    if mt != "llama":
        raise DataError(f"{where}: config.json has model_type={mt!r}; --from_hf reads Llama folders "
                        f"(model_type 'llama', LlamaForCausalLM)")


def check_config(hf_cfg: dict, model_cfg, where: str) -> None:
    """One error naming the first config.json key that disagrees with the model section."""
    check_model_type(hf_cfg, where)
    ours = hf.hf_config(model_cfg)
    for key, field in _SAME:
        if key in hf_cfg and hf_cfg[key] is not None and hf_cfg[key] != ours[key]:
            raise DataError(f"{where}: config.json {key}={hf_cfg[key]} but --config has {field} giving {ours[key]}")
    theirs, mine = _rope(hf_cfg), ours["rope_parameters"]
    for key in ("rope_theta", "rope_type", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
        if theirs.get(key) is not None and key in mine and theirs[key] != mine[key]:
            raise DataError(f"{where}: config.json RoPE {key}={theirs[key]!r} but --config's model.rope_theta / "
                            f"model.rope_scaling give {mine[key]!r}")
    eps = hf_cfg.get("rms_norm_eps")
    if eps is not None and float(eps) != ours["rms_norm_eps"]:
        raise DataError(f"{where}: config.json rms_norm_eps={eps} but --config has model.norm_eps={model_cfg.norm_eps}")


def _rows(model_cfg):
    return [(path, entries) for path, entries in hf.leaf_table(model_cfg) if _backbone(entries[0][0])]


def _source(folder, model_cfg, name: str) -> str:
    """The folder's tensor for one of our names: a tied folder's embedding is an untied lm_head."""
    tied_source = not model_cfg.tie_embeddings and "lm_head.weight" not in folder
    return "model.embed_tokens.weight" if tied_source and name == "lm_head.weight" else name


def check_tensors(folder: files.HFFolder, model_cfg, like: dict) -> None:
    """Every backbone tensor present with the shape `--config` expects (headers only, nothing
    loaded), and no tensor without a place; one error names the tensor and both shapes."""
    where = folder.directory
    if model_cfg.tie_embeddings and "lm_head.weight" in folder:
        raise DataError(f"{where}: has lm_head.weight (untied embeddings) but --config has model.tie_embeddings=True")
    rows = _rows(model_cfg)
    wanted = {name for _, entries in rows for name, _, _ in entries}
    for path, entries in rows:
        shape = hf.leaf_at(like, path).shape
        inner = shape if entries[0][2] is None else shape[1:]
        for name, kind, _ in entries:
            want = hf.hf_shape(kind, inner)
            source = _source(folder, model_cfg, name)  # a tied folder's (V, D) embedding is HF's lm_head layout
            if source not in folder:
                raise DataError(f"{where}: missing tensor {source} (--config expects shape {want})")
            got = folder.shape(source)
            if got != want:
                raise DataError(f"{where}: tensor {source} has shape {got}, --config expects {want}")
    extra = sorted(n for n in folder.keys() if n not in wanted and not n.endswith(_IGNORED))
    if extra:
        raise DataError(f"{where}: tensor {extra[0]} (shape {folder.shape(extra[0])}) has no place in --config's "
                        f"model ({len(extra)} unexpected tensors; model.n_layers={model_cfg.n_layers})")


def read_leaf(folder: files.HFFolder, model_cfg, entries, shape) -> np.ndarray:
    """One backbone leaf (float32) from the folder's tensors (after `check_tensors`)."""
    state = {name: folder[_source(folder, model_cfg, name)] for name, _, _ in entries}
    return hf.hf_to_leaf(entries, state, shape)


def import_hf(hf_dir: str, config, workdir: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the workdir; returns {"workdir", "checkpoint", "from_hf": tensors read, "fresh": leaves kept}."""
    if config.model.kind != "lm2":
        raise UsageError(f"--config has model.kind={config.model.kind!r}; --from_hf starts LM2 or vanilla models")
    folder = files.HFFolder(hf_dir)
    check_model_type(folder.config, hf_dir)
    like = checkpoint.abstract_params(config)
    check_tensors(folder, config.model, like)  # names and shapes first: they name the tensor
    check_config(folder.config, config.model, hf_dir)  # what shapes cannot show (heads, RoPE, eps)
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        if not overwrite:
            raise UsageError(f"--workdir={workdir} already has checkpoints; pass --overwrite to replace them")
        import shutil

        shutil.rmtree(os.path.join(workdir, "checkpoints"))
    rows = dict(_rows(config.model))
    # Only the params (no optimizer state: a 1.7B model's would triple the memory), created on one
    # device exactly as `state.init_state` creates them, so the fresh parts equal a fresh run's;
    # then each backbone leaf is read and swapped in, one at a time.
    params = jax.jit(lambda: nn.meta.unbox(decoder.init_params(config.model, jax.random.key(config.train.seed))))()
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    del params
    leaves = [leaf for _, leaf in paths_leaves]
    for i, (path, _) in enumerate(tqdm(paths_leaves, desc="import", disable=not progress, dynamic_ncols=True)):
        key = tuple(getattr(k, "key", k) for k in path)
        if key in rows:  # the fresh leaf is dropped before the next is read: one leaf in flight
            leaves[i] = jnp.asarray(read_leaf(folder, config.model, rows[key], leaves[i].shape), leaves[i].dtype)
    del paths_leaves
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    written = checkpoint.write_params(workdir, params, config, {"from_hf": os.path.abspath(hf_dir),
                                                                "arrays_read": len(rows), "seed": config.train.seed})
    return {"workdir": workdir, "checkpoint": written, "from_hf": len(rows),
            "fresh": len(jax.tree.leaves(params)) - len(rows)}

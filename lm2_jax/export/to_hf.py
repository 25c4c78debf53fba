"""A training workdir's checkpoint -> a Hugging Face model folder (`python -m lm2_jax.export`).

The params are restored one leaf at a time (an Orbax partial restore, on one host, from a
checkpoint written on any mesh by any number of processes), converted to the HF layout
(`hf.leaf_table`) and added to the current safetensors shard, so at most one shard and one leaf
are in memory. The folder is built beside `--out` and renamed into place when complete: an
interrupted export leaves no half-written folder.

What the folder holds: `config.json`, the weights, `generation_config.json`, the tokenizer
(`tokenizer.json`, `tokenizer_config.json`) and, unless the model is exactly a Llama
(`hf.plain_llama`), `configuration_lm2.py` + `modeling_lm2.py`, which `config.json`'s `auto_map`
names for `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
from tqdm import tqdm

from lm2_jax import config as cfglib
from lm2_jax.data import tokenizer as toklib
from lm2_jax.errors import UsageError
from lm2_jax.export import files, hf
from lm2_jax.train import checkpoint

REMOTE_CODE = ("configuration_lm2.py", "modeling_lm2.py")
AUTO_MAP = {"AutoConfig": "configuration_lm2.LM2Config", "AutoModelForCausalLM": "modeling_lm2.LM2ForCausalLM"}


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out={out} is a file")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f"--out={out} exists and is not empty; pass --overwrite to replace it")


def _special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def config_json(model_cfg, tok, dtype: str) -> dict:
    """config.json: a plain `LlamaConfig` for an exact Llama, else an `LM2Config` with `auto_map`."""
    if hf.plain_llama(model_cfg):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf.hf_config(model_cfg),
                **_special_ids(tok), "dtype": dtype}
    return {"architectures": ["LM2ForCausalLM"], "model_type": "lm2", "auto_map": AUTO_MAP,
            **hf.lm2_config(model_cfg), **_special_ids(tok), "dtype": dtype, "use_cache": False}


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32", max_shard_size: str = "5GB",
           overwrite: bool = False, progress: bool = True) -> dict:
    """Write the folder; returns {"out", "step", "files", "bytes" (of the weights), "remote_code"}."""
    if dtype not in files.DTYPES:
        raise UsageError(f"--dtype={dtype}: must be one of {', '.join(files.DTYPES)}")
    max_bytes = files.parse_size(max_shard_size)
    check_out(out, overwrite)
    config = checkpoint.read_config(workdir)
    directory, step = checkpoint.find_step(workdir, step)
    model_cfg = config.model
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    like = checkpoint.abstract_params(config)

    out = os.path.abspath(out)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        writer = files.ShardWriter(tmp, max_bytes, dtype)
        table = hf.leaf_table(model_cfg)
        for path, entries in tqdm(table, desc="export", disable=not progress, dynamic_ncols=True):
            leaf = hf.leaf_at(like, path)
            part = hf.put_leaf({}, path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            restored = checkpoint.restore_params(directory, step, part, as_numpy=True)
            for name, array in hf.leaf_to_hf(entries, hf.leaf_at(restored, path)):
                writer.add(name, array)
            del restored
        written = writer.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json(model_cfg, tok, dtype), f, indent=2)
        gen = {**_special_ids(tok), "do_sample": False}
        if not hf.plain_llama(model_cfg):
            gen["use_cache"] = False
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        written += ["config.json", "generation_config.json", *tok.save_hf(tmp)]
        remote = not hf.plain_llama(model_cfg)
        if remote:
            here = os.path.dirname(os.path.abspath(__file__))
            for name in REMOTE_CODE:
                shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
            written += list(REMOTE_CODE)
        with open(os.path.join(tmp, "lm2_jax_export.json"), "w") as f:
            # no paths: the same weights export to the same bytes from any workdir
            json.dump({"step": step, "model": cfglib.describe_model(model_cfg), "dtype": dtype}, f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "step": step, "files": sorted(written), "bytes": writer.total_bytes, "remote_code": remote}

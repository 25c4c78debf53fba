"""What the memory does on a batch: read attention, slot usage, gates, sizes, gradients.

`memory_report(config, params, batch)` runs the model once with the memory blocks' diagnostics
sown (`lm2_jax.model.memory.summary`) and once under `jax.grad` of the training loss, and returns
plain floats:

- per memory layer and segment (averaged over the rows that have tokens in that segment):
  `read_entropy` (entropy of a token's attention over the N slots / log N: 1 = uniform),
  `read_max` (its largest weight), `slots_used` (effective number of slots the segment's routing
  mass lands on), `g_in` / `g_f` (mean input / forget gate), `candidate_rms`, `memory_rms`,
  `memory_change_rms` (how much this block's write moved the memory), `read_over_input_rms`
  (size of the gated read added to the residual stream, relative to the block's normed input);
- `grad_norm`: the loss gradient's norm per parameter group (`memory/<leaf>`, `attn`, `mlp`, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm2_jax.errors import ConfigError
from lm2_jax.model import decoder
from lm2_jax.train import step as steplib


def _group(path) -> str:
    keys = [str(getattr(k, "key", k)) for k in path]
    if "memory" in keys:
        return "memory/" + keys[-1]
    return keys[1] if keys[0] in ("mem_blocks", "blocks") else keys[0]


def memory_report(config: ml_collections.ConfigDict, params, batch: dict) -> dict:
    cfg = config.model
    if not cfg.memory.layers:
        raise ConfigError("model.memory.layers", 0, "no LM2 memory blocks to inspect (vanilla, or an RMT, whose "
                          "memory is tokens)")
    if cfg.memory.read_scope == "token":
        raise ConfigError("model.memory.read_scope", "token", "these statistics describe the once-per-segment "
                          "read, which this model does not have; `python -m lm2_jax.eval errors` scores any model")
    arrays = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "doc_ids")}
    _, _, sown = jax.jit(lambda p, b: decoder.forward(cfg, p, b["tokens"], b["positions"], b["doc_ids"],
                                                      sow=True))(params, arrays)
    stats = jax.tree.map(np.asarray, sown["mem_blocks"]["memory"]["summary"][0])  # each (segments, L_m, B)
    rows = stats.pop("valid_tokens") > 0
    per_layer = {}
    for layer in range(cfg.memory.layers):
        per_layer[f"layer{layer}"] = {
            name: [float(v[s, layer][rows[s, layer]].mean()) if rows[s, layer].any() else None
                   for s in range(v.shape[0])]
            for name, v in stats.items()}

    def loss(p):
        sums = steplib.loss_sums(cfg, p, batch, loss_positions=config.train.loss_positions)
        return sums.ce_sum / jnp.maximum(sums.n_targets, 1.0)

    grads = jax.jit(jax.grad(loss))(params)
    sq: dict[str, float] = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        sq[_group(path)] = sq.get(_group(path), 0.0) + float(jnp.sum(jnp.square(g)))
    return {"per_layer": per_layer, "grad_norm": {k: v ** 0.5 for k, v in sorted(sq.items())}}

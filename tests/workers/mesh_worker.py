"""Runs in its own process with 8 emulated CPU devices (set by the caller); prints one JSON object.

    python -m tests.workers.mesh_worker equivalence|splash|golden|memory
    python -m tests.workers.mesh_worker export OUT_DIR
"""

import json
import os
import runpy
import sys

import jax
import ml_collections
import numpy as np

from lm2_jax import config as cfglib, parallel
from lm2_jax.train import loop, optimizer as optlib, state as statelib

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(memory_layers: int, carry: str = "sequence"):
    config = cfglib.defaults()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 256, 64, 2, 4, 2, 128
    m.memory.update(dict(layers=memory_layers, slots=8, heads=4, segment_len=8, carry=carry))
    config.data.batch_size, config.data.seq_len = 8, 24
    config.train.update(dict(lr=1e-3, warmup_steps=0, steps=3))
    return cfglib.validate(config)


def batches(n, B=8, T=24):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, 256, (B, T)).astype(np.int32)
        mask = (rng.random((B, T)) < 0.5).astype(np.int32)
        mask[:, -1] = 0
        doc = np.ones((B, T), np.int32)
        doc[1, 20:] = 0
        out.append({"tokens": tokens, "loss_mask": mask, "doc_ids": doc,
                    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()})
    return out


def run(config, shape, devices=None, data=None):
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.shape = shape
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = config.mesh.rules
    tx = optlib.make_optimizer(config.train)
    train_step, _, _ = loop.compile_steps(config, mesh, rules, tx)
    state = statelib.init_state(config, mesh, rules, tx)
    losses = []
    for b in (data or batches(1)) * 3:  # one batch thrice, so the loss must fall
        state, metrics = train_step(state, parallel.global_batch(b, mesh, rules))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


def equivalence():
    out = {}
    rmt = small_config(0)
    rmt.model.kind, rmt.model.memory.slots, rmt.model.memory.init = "rmt", 4, "learned"
    for name, config in (("L_m=1", small_config(1)), ("L_m=0", small_config(0)), ("rmt", cfglib.validate(rmt))):
        ref_losses, ref_params = run(config, (1, 1, 1), jax.devices()[:1])
        for shape in MESHES[1:]:  # against the single-device reference, MESHES[0]
            losses, params = run(config, shape)
            rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
            # Relative distance of the whole parameter vector. (Single leaves can differ more: Adam's
            # g / sqrt(v) turns float noise in a near-zero gradient element into a visible step.)
            pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
            diff = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
            norm = sum(float(np.sum(b ** 2)) for b in jax.tree.leaves(ref_params))
            prel = (diff / norm) ** 0.5
            out[f"{name} mesh={shape}"] = {"losses": losses, "loss_rel": max(rel), "param_rel": prel}
    return out


def splash():
    """Three train steps with the TPU splash kernel (Pallas' interpreter on CPU) inside shard_map on
    the (2, 2, 2) mesh (rows over data x fsdp, the two KV heads over tensor) against the blocked
    kernel on one device. Rows of 128 tokens (one splash block) hold two packed documents and padding."""
    config = small_config(1)
    config.data.seq_len = config.model.memory.segment_len = 128
    out = {}
    b = batches(1, T=128)[0]
    b["doc_ids"][:, 70:] = 2
    b["doc_ids"][3, 100:] = 0
    b["loss_mask"] *= (b["doc_ids"] != 0)
    results = {}
    for kernel, shape in (("blocked", (1, 1, 1)), ("splash", (2, 2, 2))):
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.attention = kernel
        results[kernel] = run(cfglib.validate(c), shape, jax.devices()[:1] if shape == (1, 1, 1) else None, [b])
    (ref_losses, ref_params), (losses, params) = results["blocked"], results["splash"]
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
    diff = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
    norm = sum(float(np.sum(b ** 2)) for b in jax.tree.leaves(ref_params))
    out["losses"], out["ref_losses"], out["param_rel"] = losses, ref_losses, (diff / norm) ** 0.5
    return out


def golden():
    config = runpy.run_path(f"{ROOT}/configs/tiny.py")["get_config"]()
    config.mesh.shape = (2, 2, 2)
    mesh = parallel.make_mesh(config.mesh)
    state = statelib.init_state(config, mesh, config.mesh.rules)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): [str(leaf.sharding.spec), list(leaf.shape),
                                     list(leaf.sharding.mesh.shape.values())] for p, leaf in flat}


def memory():
    config = small_config(1, carry="stream")
    config.mesh.shape = (2, 2, 2)
    mesh = parallel.make_mesh(config.mesh)
    tx = optlib.make_optimizer(config.train)
    state = statelib.init_state(config, mesh, config.mesh.rules, tx)
    state_sh = statelib.state_shardings(config, tx, mesh, config.mesh.rules)
    batch_sh = parallel.batch_sharding(mesh, config.mesh.rules)
    import functools

    from lm2_jax.train import step as steplib

    jitted = jax.jit(functools.partial(steplib.train_step, config), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)
    batch = parallel.global_batch(batches(1)[0], mesh, config.mesh.rules)
    with parallel.activation_sharding(mesh, config.mesh.rules):
        compiled = jitted.lower(state, batch).compile()
    mem_in = compiled.input_shardings[0][0].mem
    mem_out = compiled.output_shardings[0].mem
    hlo = compiled.as_text()
    new_state, _ = compiled(state, batch)
    return {"in": str(mem_in.spec), "out": str(mem_out.spec), "result": str(new_state.mem.sharding.spec),
            "shape": list(new_state.mem.shape),
            "shard_shape": list(new_state.mem.addressable_shards[0].data.shape),
            "hlo_has_batch_sharded_mem": "devices=[4,1,1,2]" in hlo or "devices=[4,1,1]" in hlo}


def export_checkpoints():
    """Two workdirs holding the same params (a tiny LM2 initialised from one seed): one written
    from the (2, 2, 2) mesh, one from a single device; `tests/test_export.py` exports both."""
    from lm2_jax.train import checkpoint

    out = sys.argv[2]
    config = small_config(1)
    config.model.memory.update(dict(write_candidate="tokens", top_k=2))
    config.mesh.shape = (2, 2, 2)
    mesh = parallel.make_mesh(config.mesh)
    sharded = statelib.init_state(config, mesh, config.mesh.rules)
    single = statelib.init_state(config)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), sharded.params, single.params))
    split = sum(len({str(s.index) for s in leaf.addressable_shards}) > 1 for leaf in jax.tree.leaves(sharded.params))
    checkpoint.write_state(os.path.join(out, "mesh"), sharded, config)
    checkpoint.write_state(os.path.join(out, "single"), single, config)
    return {"same_params": same, "leaves_split": split, "leaves": len(jax.tree.leaves(sharded.params))}


if __name__ == "__main__":
    tasks = {"equivalence": equivalence, "splash": splash, "golden": golden, "memory": memory,
             "export": export_checkpoints}
    print("RESULT " + json.dumps(tasks[sys.argv[1]]()))

"""The benchmark's measurements. Each `bench_*` function returns a list of figure records.

A record is {"name", "value", "unit", "config", ...extra}; `__main__` adds device and versions.
Times are the best of a few runs of an AOT-compiled function (compilation is never timed, except
by `bench_compile`), on random tokens, with inputs already on the device.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm2_jax.bench import flops
from lm2_jax.model import decoder
from lm2_jax.train import optimizer as optlib, state as statelib, step as steplib


def vanilla_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The vanilla Llama the bench compares LM2 with: a copy of `config` with no memory
    (`memory.layers=0`) and one segment, i.e. full attention over the sequence
    (`memory.segment_len=0`); every other field, overrides included, as given. The memory fields
    left over (slots, heads, remat_segments) have no effect without memory layers."""
    vanilla = config.copy_and_resolve_references()
    vanilla.model.memory.layers = 0
    vanilla.model.memory.segment_len = 0
    return vanilla


RMT_MEMORY_TOKENS = 16


def rmt_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The RMT the bench compares LM2 with: a copy of `config` with `model.kind="rmt"`, no LM2
    memory blocks and `RMT_MEMORY_TOKENS` learned memory tokens around each of the same segments."""
    rmt = config.copy_and_resolve_references()
    rmt.model.kind = "rmt"
    rmt.model.memory.layers = 0
    rmt.model.memory.slots = RMT_MEMORY_TOKENS
    rmt.model.memory.init = "learned"
    return rmt


def timed(fn: Callable[[], object], reps: int) -> tuple[list[float], object]:
    """(wall seconds of each of `reps` calls, the last call's result)."""
    out, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out, result


def _record(name, value, unit, config=None, **extra) -> dict:
    return {"name": name, "value": value, "unit": unit, "config": config or {}, **extra}


def _model_summary(m: ml_collections.ConfigDict, batch: int, seq_len: int) -> dict:
    return {"d_model": m.d_model, "layers": m.n_layers, "heads": m.n_heads, "kv_heads": m.n_kv_heads,
            "d_ff": m.d_ff, "vocab": m.vocab_size, "batch": batch, "seq_len": seq_len,
            "segment_len": decoder.segment_len(m, seq_len), "kind": m.kind, "memory_layers": m.memory.layers,
            "slots": decoder.memory_slots(m), "dtype": m.dtype, "attention": m.attention}


def _tokens(batch: int, seq_len: int, vocab: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(4, vocab, (batch, seq_len)), jnp.int32)


def bench_peak_matmul(quick: bool) -> list[dict]:
    """The physical limit: the best jit matmul throughput over a few square sizes."""
    out = []
    for dtype in ("float32", "bfloat16"):
        best, by_size = 0.0, {}
        for n in (1024, 2048, 4096):
            a = jnp.asarray(np.random.default_rng(n).standard_normal((n, n)), dtype)
            f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
            f(a, a).block_until_ready()
            s = min(timed(lambda f=f, a=a: f(a, a), 3 if quick else 5)[0])
            by_size[n] = round(2 * n ** 3 / s / 1e9, 1)
            best = max(best, by_size[n])
        out.append(_record(f"peak_matmul/{dtype}", best, "GFLOP/s", {"dtype": dtype, "sizes": list(by_size)},
                           by_size=by_size))
    return out


def compile_train_step(config: ml_collections.ConfigDict, abstract: bool = False):
    """(compiled step, state or None, batch, seconds to lower+compile) for a one-device train step."""
    tx = optlib.make_optimizer(config.train)
    B, T = config.data.batch_size, config.data.seq_len
    batch = {"tokens": _tokens(B, T, config.model.vocab_size), "loss_mask": jnp.ones((B, T), jnp.float32)}
    fn = jax.jit(functools.partial(steplib.train_step, config), donate_argnums=0)
    if abstract:
        state = jax.eval_shape(lambda: statelib.init_state(config, tx=tx))
    else:
        state = statelib.init_state(config, tx=tx)
    t = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    return compiled, (None if abstract else state), batch, time.perf_counter() - t


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def bench_train_step(variant: str, config: ml_collections.ConfigDict, peak_gflops: float, reps: int) -> list[dict]:
    compiled, state, batch, compile_s = compile_train_step(config)
    state, metrics = compiled(state, batch)  # warm-up: first-touch of every buffer
    jax.block_until_ready(metrics)
    holder = [state]

    def run():
        holder[0], m = compiled(holder[0], batch)
        return m

    times, _ = timed(run, reps)
    m, B, T = config.model, config.data.batch_size, config.data.seq_len
    step_s = min(times)
    tok_s = B * T / step_s
    fpt = flops.train_flops_per_token(m, T)
    achieved = fpt * tok_s / 1e9
    cfg = _model_summary(m, B, T)
    pre = f"train_step/{variant}"
    return [
        _record(f"{pre}/step_time", step_s, "s", cfg, times=times, compile_s=compile_s,
                peak_bytes=_peak_bytes(compiled)),
        _record(f"{pre}/tokens_per_s", tok_s, "tokens/s", cfg),
        _record(f"{pre}/flops_per_token", fpt, "FLOP/token", cfg,
                forward_breakdown=flops.forward_flops_per_token(m, T)),
        _record(f"{pre}/achieved", achieved, "GFLOP/s", cfg),
        _record(f"{pre}/mfu", achieved / peak_gflops if peak_gflops else None,
                f"fraction of peak_matmul/{m.dtype}", cfg, peak_gflops=peak_gflops, target=">= 0.6"),
    ]


def _forward_loss(model_cfg):
    """Forward only, logits reduced to a loss inside the segment scan (never B x T x V at once)."""
    def fn(params, tokens, mem):
        sums = steplib.loss_sums(model_cfg, params, {"tokens": tokens,
                                                     "loss_mask": jnp.ones(tokens.shape, jnp.float32)}, mem)
        return sums.ce_sum / sums.n_targets, sums.mem_BND
    return jax.jit(fn)


def _fits(compiled, budget_bytes: int) -> tuple[bool, int | None]:
    need = _peak_bytes(compiled)
    return (need is None or need <= budget_bytes), need


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def bench_context(variant: str, config: ml_collections.ConfigDict, lengths: list[int],
                  segment: int) -> tuple[list[dict], dict]:
    """Per-token forward time (batch 1) vs context length. LM2 runs segments of `segment` tokens;
    vanilla attends over the whole context, at the lengths where XLA's memory estimate fits in
    RAM. Also returns {length: final memory, "params", "model"} for `bench_decode`."""
    out, memories = [], {}
    budget = int(0.6 * _available_bytes())
    m = ml_collections.ConfigDict(config.model.to_dict())
    if variant == "lm2":
        m.memory.segment_len = segment
    params = jax.jit(lambda: nn.meta.unbox(decoder.init_params(m, jax.random.key(0), segment)))()
    forward = _forward_loss(m)
    per_token = {}
    for T in lengths:
        tokens = _tokens(1, T, m.vocab_size, seed=T)
        mem0 = decoder.initial_memory(m, params, 1)
        compiled = forward.lower(params, tokens, mem0).compile()
        ok, need = _fits(compiled, budget)
        cfg = _model_summary(m, 1, T)
        if not ok:
            out.append(_record(f"context_scaling/{variant}/{T}", None, "us/token", cfg,
                               skipped=f"XLA estimates {need / 2**30:.1f} GiB; the budget is {budget / 2**30:.1f} GiB "
                                       "(60% of available RAM)"))
            continue
        reps = 3 if T <= 4096 else 2 if T <= 16384 else 1
        if T <= 16384:  # a warm-up run; the one 64K run is timed cold (after compilation)
            jax.block_until_ready(compiled(params, tokens, mem0))
        times, (_, mem_after) = timed(lambda c=compiled, t=tokens, m0=mem0: c(params, t, m0), reps)
        per_token[T] = min(times) / T * 1e6
        out.append(_record(f"context_scaling/{variant}/{T}", per_token[T], "us/token", cfg,
                           times=times, peak_bytes=need))
        memories[T] = mem_after
        del compiled
    lo, hi = min(per_token, default=0), max(per_token, default=0)
    if hi > lo:
        out.append(_record(f"context_scaling/{variant}/ratio_{hi}_over_{lo}", per_token[hi] / per_token[lo],
                           "x", {"lengths": sorted(per_token)}, target="<= 1.1" if variant == "lm2" else None))
    memories["params"], memories["model"] = params, m
    return out, memories


def bench_decode(memories: dict, segment: int, reps: int) -> list[dict]:
    """Real generation (`lm2_jax.generate.decode_step`: one token at a time against the current
    segment's KV cache, the segment's write when it fills) after the shortest and the longest
    context: the memory those contexts left, the position after them. One whole segment of tokens
    is generated per timing, so its write is included once, as in steady-state decoding. LM2 keeps
    only the N x D memory and one segment's cache, so the rate should not depend on the context."""
    from lm2_jax import generate as gen

    params, m = memories.pop("params"), memories.pop("model")
    step = jax.jit(lambda p, st, tok: gen.decode_step(m, p, st, tok))

    def state_after(T):
        return gen.initial_state(m, params, memories[T], segment, jnp.full((1,), T, jnp.int32))

    def run(T):
        state, token = state_after(T), jnp.ones((1,), jnp.int32)
        for _ in range(segment):
            logits, state = step(params, state, token)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.block_until_ready(state)

    shortest, longest = min(memories), max(memories)
    compiled = step.lower(params, state_after(shortest), jnp.ones((1,), jnp.int32)).compile()
    run(shortest)  # warm-up: both branches of the write's cond have run once
    # The two contexts' runs alternate, so a host whose speed drifts within the minutes this takes
    # (seen: 20-28 s for the identical run) moves both rates alike, not only the ratio.
    times, states = {shortest: [], longest: []}, {}
    for _ in range(reps):
        for T in (shortest, longest):
            t, states[T] = timed(lambda T=T: run(T), 1)
            times[T] += t
    out, rate = [], {}
    for T in (shortest, longest):
        state = states[T]
        rate[T] = segment / min(times[T])
        carried = sum(int(a.size * a.dtype.itemsize) for a in jax.tree.leaves(state))
        out.append(_record(f"decode/lm2/after_{T}", rate[T], "tokens/s", _model_summary(m, 1, segment),
                           context=T, times=times[T], peak_bytes=_peak_bytes(compiled), carried_state_bytes=carried,
                           note=f"greedy KV-cache generation of {segment} tokens (one segment and its write)"))
    out.append(_record(f"decode/lm2/ratio_{shortest}_over_{longest}", rate[shortest] / rate[longest], "x",
                       {"contexts": [shortest, longest]}, target="<= 1.1"))
    return out


def bench_compile(config: ml_collections.ConfigDict, layer_counts=(4, 32)) -> list[dict]:
    """Lower + compile the LM2 train step (abstract state: no weights built) at two depths."""
    secs, cfgs = {}, {}
    for L in layer_counts:
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.n_layers = L
        if c.model.memory.layers:
            c.model.memory.layers = L
        secs[L] = compile_train_step(c, abstract=True)[3]
        cfgs[L] = _model_summary(c.model, c.data.batch_size, c.data.seq_len)
    lo, hi = layer_counts
    cfg = {**cfgs[hi], "layers": list(layer_counts), "memory_layers": list(layer_counts)}
    return [_record(f"compile/lm2/{L}_layers", secs[L], "s", cfgs[L]) for L in layer_counts] + [
        _record(f"compile/lm2/ratio_{hi}_over_{lo}", secs[hi] / secs[lo], "x", cfg, target="<= 1.3")]


def _cli_steps_per_s(metrics_path: str, after: int) -> float:
    """Steps per second of a `python -m lm2_jax.train` run over its logged steps after `after`, from
    the rates its log lines recorded (each over the steps since the line before)."""
    import json

    steps = seconds = 0.0
    prev = None
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    for rec in records:
        if "steps_per_s" not in rec:
            continue
        if prev is not None and prev >= after and rec["steps_per_s"] > 0:
            steps += rec["step"] - prev
            seconds += (rec["step"] - prev) / rec["steps_per_s"]
        prev = rec["step"]
    return steps / seconds if seconds else float("nan")


def bench_train_cli(config_path: str, steps: int, reps: int) -> list[dict]:
    """The real training loop against its own bare step: `python -m lm2_jax.train --config=config_path`
    (data pipeline, logging, checkpoints at the config's cadence; no evaluation) for `steps` steps in
    a subprocess, its steps/s over the last two thirds; then the same jitted step it runs, dispatched
    back to back on one batch already on the device. The ratio is what the host costs the loop."""
    import runpy
    import subprocess
    import sys
    import tempfile

    from lm2_jax import config as cfglib, parallel
    from lm2_jax.data import pipeline, tokenizer as toklib
    from lm2_jax.train import loop

    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run([sys.executable, "-m", "lm2_jax.train", f"--config={config_path}", f"--workdir={workdir}",
                               f"--config.train.steps={steps}", "--config.train.eval_task="],
                              capture_output=True, text=True)
        if proc.returncode:
            return [{"error": f"train_cli: python -m lm2_jax.train exited {proc.returncode}: {proc.stderr[-500:]}"}]
        config = cfglib.validate(runpy.run_path(config_path)["get_config"]())
        cli_rate = _cli_steps_per_s(os.path.join(workdir, "metrics.jsonl"), after=steps // 3)

    mesh = parallel.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    tx = optlib.make_optimizer(config.train)
    step, _, _ = loop.compile_steps(config, mesh, rules, tx)
    state = statelib.init_state(config, mesh, rules, tx)
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    batch = parallel.global_batch(next(pipeline.make_train_iterator(config.data, tok)),
                                  mesh, rules)
    for _ in range(5):  # compile, first touch
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    n = max(steps // 3, 20)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - t)
    bare = n / best
    m = config.model
    cfg = {**_model_summary(m, config.data.batch_size, config.data.seq_len), "config": os.path.basename(config_path),
           "loss_positions": config.train.loss_positions, "cli_steps": steps}
    return [
        _record("train_cli/cli_steps_per_s", cli_rate, "steps/s", cfg),
        _record("train_cli/bare_steps_per_s", bare, "steps/s", cfg, bare_steps=n, reps=reps),
        _record("train_cli/ratio_cli_over_bare", cli_rate / bare, "x", cfg, target=">= 0.95"),
    ]

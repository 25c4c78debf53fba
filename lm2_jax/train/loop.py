"""The training loop: data, jit-compiled step, logging, evaluation, checkpoints, signals.

Nothing is lost on interruption: SIGTERM/SIGINT finish the current step, save a checkpoint of it
and exit 0; a restart with the same command resumes from the newest complete checkpoint, data
iterator included, and reproduces the uninterrupted run's losses bit for bit. A non-finite loss
stops the run before anything is saved, so the newest checkpoint stays the last finite state.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
import zlib

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from lm2_jax import config as cfglib, parallel
from lm2_jax.data import pipeline, tokenizer as toklib
from lm2_jax.train import evaluate, state as statelib, step as steplib
from lm2_jax.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)
# Test hook (environment, so that the resumed run's command line is identical): SIGKILL the process
# at the start of this step, after the pending checkpoint is on disk.
_SIGKILL_AT = int(os.environ.get("LM2_TEST_SIGKILL_AT_STEP", "-1"))


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite; the message names the step."""


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the workdir (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request the loop honours after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def compile_steps(config: ml_collections.ConfigDict, mesh, rules, tx):
    """The jit-compiled train and eval steps with their shardings, and the state shardings.

    Shardings: the train state (params, optimizer moments, streamed memory) is laid out by the
    rules table (`embed` over fsdp, heads/MLP/vocab over tensor, memory rows over data x fsdp), the
    batch is split by rows over data x fsdp, metrics come back replicated. The state is donated so
    it is updated in place. Activations inside the model are pinned by `parallel.constrain`.
    """
    state_sh = statelib.state_shardings(config, tx, mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, rules)
    train = jax.jit(functools.partial(steplib.train_step, config), in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, None), donate_argnums=0)
    evaluate_ = jax.jit(functools.partial(steplib.eval_step, config), in_shardings=(state_sh.params, batch_sh))

    def within(fn):  # trace (first call) with the activation rules in force
        def call(*args):
            with parallel.activation_sharding(mesh, rules):
                return fn(*args)
        return call

    return within(train), within(evaluate_), state_sh


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train to `config.train.steps`; returns the final metrics (incl. exact-match if evaluated)."""
    cfglib.validate(config)
    tcfg = config.train
    lead = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % rows:
        raise cfglib.ConfigError("data.batch_size", config.data.batch_size,
                                 f"must be a multiple of data x fsdp = {rows} (mesh {dict(mesh.shape)})")
    os.makedirs(workdir, exist_ok=True)
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    if tok.vocab_size > config.model.vocab_size:
        raise cfglib.ConfigError("model.vocab_size", config.model.vocab_size,
                                 f"smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    iterator = pipeline.make_train_iterator(config.data, tok)
    tx = statelib.make_optimizer(tcfg)
    train_step, eval_fn, state_sh = compile_steps(config, mesh, rules, tx)
    state = statelib.init_state(config, mesh, rules, tx)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tcfg.keep_checkpoints, tcfg.async_checkpoint)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sh)
    restored, iterator, data_restored = ckpt.restore(abstract, iterator)
    if restored is not None:
        state = restored
        if not data_restored:  # written by another number of processes: replay to the same position
            log.warning("checkpoint data state is for another process count; skipping %d batches",
                        int(state.step))
            for _ in range(int(state.step)):
                next(iterator)
        if lead:
            print(f"resumed from {ckpt.directory}/{int(state.step)}", flush=True)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    eval_rows = -(-tcfg.eval_batch_size // rows) * rows

    def eval_batch(params, b):
        steplib.check_loss_positions(b["loss_mask"], tcfg.loss_positions, f"the {tcfg.eval_task} test set")
        return eval_fn(params, parallel.global_batch_from_full(b, mesh, rules))

    run_eval = lambda p: evaluate.evaluate(eval_batch, p,
        evaluate.qa_batches(tcfg.eval_task, tok, config.data.seq_len, eval_rows, tcfg.eval_samples,
                            config.data.truncate))
    writer = MetricsWriter(workdir, lead)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    step = int(state.step)
    last = {}
    bar = tqdm(total=tcfg.steps, initial=step, disable=not lead, desc="train", dynamic_ncols=True)
    try:
        with _StopFlag() as stop:
            t0, s0 = time.perf_counter(), step
            end = min(tcfg.steps, tcfg.stop_at_step or tcfg.steps)
            while step < end:
                if step + 1 == _SIGKILL_AT:  # test hook: die like a preempted VM, no handler runs
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                batch = next(iterator)
                steplib.check_loss_positions(batch["loss_mask"], tcfg.loss_positions, f"training batch {step + 1}")
                crc = zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())
                if step + 1 == tcfg.nan_at_step:
                    batch = {**batch, "loss_mask": np.full(batch["loss_mask"].shape, np.nan, np.float32)}
                state, metrics = train_step(state, parallel.global_batch(batch, mesh, rules))
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss}) at step {step + 1}; stopped without saving it, the newest "
                        f"checkpoint in {ckpt.directory} is step {ckpt.latest_step()}")
                step += 1
                bar.update(1)
                if step % tcfg.log_every == 0 or step == end:
                    dt = time.perf_counter() - t0
                    rate = (step - s0) / dt if dt > 0 else 0.0
                    last = {"loss": loss, "batch_crc32": crc, "grad_norm": float(metrics["grad_norm"]), "steps_per_s": rate,
                            "tokens_per_s": rate * tokens_per_step, "lr": float(statelib.schedule(tcfg)(step))}
                    bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}", tok_s=f"{rate * tokens_per_step:.0f}")
                    writer.write(step, last)
                    t0, s0 = time.perf_counter(), step
                if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                    writer.write(step, run_eval(state.params))
                if step % tcfg.checkpoint_every == 0 or step == end or stop.signal:
                    ckpt.save(step, state, iterator, force=True)
                if stop.signal:
                    ckpt.wait()
                    bar.close()
                    if lead:
                        print(f"{stop.signal}: saved step {step} to {ckpt.directory}; exiting", flush=True)
                    return {"stopped_by": stop.signal, "step": step, **last}
        bar.close()
        ckpt.wait()
        if step < tcfg.steps:  # stopped at train.stop_at_step: the run is not over, no final eval
            return {"step": step, **last}
        result = {"step": step, **last, **run_eval(state.params)}
        writer.write(step, {k: v for k, v in result.items() if k in ("eval_loss", "exact_match")})
        return result
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()

"""The training loop: data, jit-compiled step, and hooks for logging, evaluation and checkpoints.

Nothing is lost on interruption: SIGTERM/SIGINT finish the current step, save a checkpoint of it
and exit 0; a restart with the same command resumes from the newest complete checkpoint, data
iterator included, and reproduces the uninterrupted run's losses bit for bit. With several
processes (a pod), SIGTERM reaches hosts at different steps, so no host stops on its own: JAX's
preemption service (`multihost_utils.reached_preemption_sync_point`, asked after every step)
agrees on one step at which every host saves and exits. A non-finite loss
stops the run before anything after it is saved, so the newest checkpoint stays the last finite
state. Losses are fetched only when a log line or a hook needs them (one step late for a log line:
the host prepares step N+1 while step N runs), and checked finite before any hook sees the state.

Everything that happens between steps is a `Hook` with a cadence: logging every
`train.log_every` steps, evaluation every `train.eval_every`, checkpoints every
`train.checkpoint_every`; callers (experiments, tests) add their own through `train(hooks=...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from lm2_jax import config as cfglib, parallel
from lm2_jax.data import pipeline, tokenizer as toklib
from lm2_jax.errors import CheckpointError, NonFiniteLossError, UsageError
from lm2_jax.train import curriculum as curlib, evaluate, optimizer as optlib, paths, state as statelib, step as steplib
from lm2_jax.train.checkpoint import IMPORTED, Checkpointer

log = logging.getLogger(__name__)

__all__ = ["Hook", "Run", "NonFiniteLossError", "compile_steps", "train"]


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the workdir (process 0 only).

    An object store cannot append, so in a `gs://` workdir metrics.jsonl is rewritten whole at
    each checkpoint (`sync`) and at the end; a local one is appended line by line."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            root = paths.workdir_path(workdir)
            self.path, self.remote = root / "metrics.jsonl", paths.is_url(workdir)
            self.lines = self.path.read_text().splitlines(keepends=True) if self.remote and self.path.exists() else []
            self.jsonl = None if self.remote else open(self.path, "a")
            self.tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def sync(self) -> None:
        if self.enabled and self.remote:
            self.path.write_text("".join(self.lines))

    def close(self) -> None:
        if self.enabled:
            self.sync()
            if self.jsonl is not None:
                self.jsonl.close()
            self.tb.close()


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request the loop honours after the current step.

    With several processes the signals are left alone: JAX's preemption notifier (installed by
    `jax.distributed.initialize`) must see SIGTERM, and `after_step` asks it for the step at which
    all processes stop together (one host stopping alone would leave the others in a collective)."""

    def __init__(self, multi_process: bool = False):
        self.signal = None
        self.multi = multi_process
        self._old = {}

    def __enter__(self):
        if not self.multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def after_step(self, step: int) -> str | None:
        """The signal that ends the run after `step`, if any (every process the same answer)."""
        if self.multi:
            from jax.experimental import multihost_utils

            return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        return self.signal

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def jit_steps(config: ml_collections.ConfigDict, mesh, rules, tx):
    """The jitted (not yet traced) train and eval steps, the state shardings and the batch sharding.

    Shardings: the train state (params, optimizer moments, streamed memory) is laid out by the
    rules table (`embed` over fsdp, heads/MLP/vocab over tensor, memory rows over data x fsdp), the
    batch is split by rows over data x fsdp, metrics come back replicated. The state is donated so
    it is updated in place. Activations inside the model are pinned by `parallel.constrain`, so
    the steps must be traced under `parallel.activation_sharding` (`compile_steps` does;
    `lm2_jax.aot` lowers the same jits for a TPU topology).
    """
    state_sh = statelib.state_shardings(config, tx, mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, rules)
    train = jax.jit(functools.partial(steplib.train_step, config), in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, None), donate_argnums=0)
    evaluate_ = jax.jit(functools.partial(steplib.eval_step, config), in_shardings=(state_sh.params, batch_sh))
    return train, evaluate_, state_sh, batch_sh


def compile_steps(config: ml_collections.ConfigDict, mesh, rules, tx):
    """`jit_steps`' train and eval steps, traced (on first call) under the activation rules, and the
    state shardings."""
    train, evaluate_, state_sh, _ = jit_steps(config, mesh, rules, tx)

    def within(fn):  # trace (first call) with the activation rules in force
        def call(*args):
            with parallel.activation_sharding(mesh, rules):
                return fn(*args)
        return call

    return within(train), within(evaluate_), state_sh


@dataclasses.dataclass
class Run:
    """What a hook sees after a step: the step just finished, the state after it, and the run's parts."""

    config: ml_collections.ConfigDict
    step: int
    state: Any  # statelib.TrainState
    iterator: Any  # the data iterator (its position is checkpointed)
    ckpt: Checkpointer
    writer: MetricsWriter
    evaluate: Callable[[Any], dict]  # params -> {"eval_loss", "exact_match", "samples"}
    lead: bool  # process 0: the one that prints and writes metrics
    end: int  # the last step of this run (train.steps, or train.stop_at_step)
    loss: float = math.nan  # the step's loss (checked finite before any hook runs)
    step_metrics: dict = dataclasses.field(default_factory=dict)  # the step's other outputs (device values)
    batch_crc32: int = 0  # CRC of the step's tokens (set when hooks run): resume tests compare batches by it
    metrics: dict = dataclasses.field(default_factory=dict)  # the latest logged metrics
    stop_signal: str | None = None  # SIGTERM/SIGINT received: the loop ends after this step's hooks
    stage: int = 0  # the curriculum stage (train.curriculum) whose data the step trained on


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run)` after every `every`-th step (0 = never by cadence) and, if `at_end`, after the run's
    last step or the step a signal stopped it at."""

    every: int
    fn: Callable[[Run], None]
    at_end: bool = False

    def due(self, run: Run) -> bool:
        last = run.step == run.end or run.stop_signal is not None
        return bool(self.every and run.step % self.every == 0) or (self.at_end and last)


class _Logger:
    """The log line of every `train.log_every`-th step (and of the last): loss, grad norm, batch CRC,
    rates. `write` takes the step's own values, so the loop can write it one step late."""

    def __init__(self, tcfg, tokens_per_step: Callable[[Run], int], bar, first_step: int):
        self.tcfg, self.tokens_per_step, self.bar = tcfg, tokens_per_step, bar
        self.clock = (time.perf_counter(), first_step)  # rates are over the steps since the last log
        self.hook = Hook(tcfg.log_every, lambda run: None, at_end=True)  # its cadence only

    def write(self, run: Run, step: int, loss: float, grad_norm: float, crc: int) -> None:
        t0, step0 = self.clock
        dt = time.perf_counter() - t0
        rate = (step - step0) / dt if dt > 0 else 0.0
        tokens = self.tokens_per_step(run)
        run.metrics = {"loss": loss, "batch_crc32": crc, "grad_norm": grad_norm, "steps_per_s": rate,
                       "tokens_per_s": rate * tokens, "lr": float(optlib.schedule(self.tcfg)(step))}
        self.bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}", tok_s=f"{rate * tokens:.0f}")
        run.writer.write(step, run.metrics)
        self.clock = (time.perf_counter(), step)


class _Losses:
    """The device losses of steps not yet fetched. The loop fetches them only when something needs
    a checked state (a log line, a hook, the end), so the host never waits on the step it just
    dispatched; a non-finite one raises before anything after it is saved."""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt, self.pending = ckpt, []  # [(step, loss scalar on device)]

    def add(self, step: int, loss) -> None:
        self.pending.append((step, loss))

    def check(self, upto: int) -> float:
        """The loss of step `upto` after checking every pending one through it (a blocking fetch)."""
        now = [(s, v) for s, v in self.pending if s <= upto]
        self.pending = [(s, v) for s, v in self.pending if s > upto]
        values = [float(v) for v in jax.device_get([v for _, v in now])]
        for (s, _), v in zip(now, values):
            if not math.isfinite(v):
                raise NonFiniteLossError(
                    f"non-finite loss ({v}) at step {s}; stopped without saving it, the newest "
                    f"checkpoint in {self.ckpt.directory} is step {self.ckpt.latest_step()}")
        return values[-1] if values else math.nan


def _crc(batch) -> int:
    """CRC of a batch's tokens: resume tests compare the batches of two runs by it."""
    return zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())


def _eval_hook(tcfg) -> Hook:
    def fn(run: Run) -> None:
        if run.step < tcfg.steps:  # the final evaluation is the run's result, written by train()
            run.writer.write(run.step, run.evaluate(run.state.params))

    return Hook(tcfg.eval_every, fn)


def _checkpoint_hook(tcfg) -> Hook:
    def save(run):
        run.ckpt.save(run.step, run.state, run.iterator, force=True)
        run.writer.sync()

    return Hook(tcfg.checkpoint_every, save, at_end=True)


def _make_workdir(workdir: str) -> None:
    try:
        paths.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"workdir {workdir!r} cannot be created: {err.strerror or err}") from None


def _split_eval(config, tok, eval_rows: int, params, eval_batch) -> dict:
    """Exact match on the test questions by where their facts lie (`evaluate.fact_groups`): wholly
    in earlier segments than the answer (only the memory can carry them), straddling a segment
    boundary, inside the answer's segment; so the final lines show what the memory did."""
    tcfg, S = config.train, config.model.memory.segment_len
    if not S:
        return {}
    out = {}
    for name, select in evaluate.fact_groups(tcfg.eval_task, tok, S, tcfg.eval_samples).items():
        if select:
            batches = evaluate.qa_batches(tcfg.eval_task, tok, config.data.seq_len, eval_rows, tcfg.eval_samples,
                                          config.data.truncate, select)
            got = evaluate.evaluate(eval_batch, params, batches)
            out[f"exact_match_{name}"], out[f"samples_{name}"] = got["exact_match"], got["samples"]
    return out


def init_params_from(config: ml_collections.ConfigDict, workdir: str, like) -> tuple[dict, str]:
    """`train.init_from`: the params of `workdir`'s newest checkpoint, on `like`'s shardings. Its
    model must have exactly this run's parameter shapes; the first leaf that differs is named."""
    from lm2_jax.train import checkpoint

    flat = lambda tree: {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(tree)}
    theirs, ours = flat(checkpoint.abstract_params(checkpoint.read_config(workdir))), flat(like)
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            shape = {n: f"shape {d[key]}" if key in d else "absent" for n, d in (("theirs", theirs), ("ours", ours))}
            raise cfglib.ConfigError("train.init_from", workdir, f"its params{key} is {shape['theirs']}, this "
                                     f"model's is {shape['ours']} (the model sections differ)")
    directory, step = checkpoint.find_step(workdir, flag="--config.train.init_from")
    return checkpoint.restore_params(directory, step, like), f"{directory}/{step}"


def train(config: ml_collections.ConfigDict, workdir: str, hooks: Sequence[Hook] = ()) -> dict:
    """Train to `config.train.steps` (or `train.stop_at_step`); returns the final metrics, with the
    exact-match evaluation when the run reached `train.steps`. `hooks` run after the built-in ones."""
    cfglib.validate(config)
    tcfg = config.train
    lead = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % rows:
        raise cfglib.ConfigError("data.batch_size", config.data.batch_size,
                                 f"must be a multiple of data x fsdp = {rows} (mesh {dict(mesh.shape)})")
    _make_workdir(workdir)
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    if tok.vocab_size > config.model.vocab_size:
        raise cfglib.ConfigError("model.vocab_size", config.model.vocab_size,
                                 f"smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    # Encoded now, so a test set that cannot be used fails before training, not after it.
    eval_rows = -(-tcfg.eval_batch_size // rows) * rows
    eval_batches = list(evaluate.qa_batches(tcfg.eval_task, tok, config.data.seq_len, eval_rows, tcfg.eval_samples,
                                            config.data.truncate)) if tcfg.eval_task else []
    for b in eval_batches:
        steplib.check_loss_positions(b["loss_mask"], tcfg.loss_positions, f"the {tcfg.eval_task} test set")
    heldout = []
    if config.data.eval_paths:
        if tcfg.loss_positions:
            raise cfglib.ConfigError("train.loss_positions", tcfg.loss_positions,
                                     "is for QA rows; held-out perplexity (data.eval_paths) needs every position (0)")
        heldout = list(evaluate.take_batches(pipeline.make_heldout_iterator(config.data, tok),
                                             tcfg.eval_samples or evaluate.HELDOUT_ROWS, eval_rows))
    stages = curlib.parse(tcfg.curriculum)  # checked against the rest of the config by cfglib.validate
    schedule = curlib.Schedule(stages, tcfg.steps, workdir) if stages else None
    if (paths.workdir_path(workdir) / IMPORTED).exists():
        raise UsageError(f"--workdir={workdir} holds imported params (python -m lm2_jax.export --from_hf), not a run: "
                         f"train with --config.train.init_from={workdir} and a new --workdir")
    ckpt = Checkpointer(str(paths.workdir_path(workdir) / "checkpoints"), tcfg.keep_checkpoints,
                        tcfg.async_checkpoint)
    stage = schedule.stage_of(ckpt.latest_step() or 0) if schedule else 0
    stage_data = lambda i, held_out=False: curlib.stage_data(config, stages, i, held_out) if stages else config.data
    iterator = pipeline.make_train_iterator(stage_data(stage), tok)
    tx = optlib.make_optimizer(tcfg)
    train_step, eval_fn, state_sh = compile_steps(config, mesh, rules, tx)
    state = statelib.init_state(config, mesh, rules, tx)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sh)
    restored, iterator, data_restored = ckpt.restore(abstract, iterator)
    if restored is not None:
        state = restored
        if not data_restored and int(state.step):  # written by another process count: replay to its position
            log.warning("checkpoint data state is for another process count; skipping %d batches",
                        int(state.step))
            for _ in range(int(state.step)):
                next(iterator)
        if schedule and schedule.stage_of(int(state.step)) != stage:
            raise CheckpointError(f"{ckpt.directory}: the newest checkpoint was unreadable and step "
                                  f"{int(state.step)} belongs to another curriculum stage; remove the broken one")
        if lead:
            print(f"resumed from {ckpt.directory}/{int(state.step)}", flush=True)
    elif tcfg.init_from:
        params, where = init_params_from(config, tcfg.init_from, abstract.params)
        state = state.replace(params=params)
        if lead:
            print(f"params from {where}", flush=True)
    if lead:
        (paths.workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

    eval_batch = lambda p, b: eval_fn(p, parallel.global_batch_from_full(b, mesh, rules))
    def run_eval(params) -> dict:
        out = evaluate.evaluate(eval_batch, params, eval_batches) if eval_batches else {}
        if heldout:
            got = evaluate.evaluate(eval_batch, params, heldout)
            out.update(heldout_loss=got["eval_loss"], heldout_perplexity=math.exp(min(got["eval_loss"], 50.0)),
                       heldout_rows=got["samples"])
        return out
    step = int(state.step)
    run = Run(config, step, state, iterator, ckpt, MetricsWriter(workdir, lead), run_eval, lead,
              end=min(tcfg.steps, tcfg.stop_at_step or tcfg.steps), stage=stage)
    bar = tqdm(total=tcfg.steps, initial=step, disable=not lead, desc="train", dynamic_ncols=True)
    # rows x row length of the step's data (a curriculum stage has its own rows)
    row_len = lambda run: stages[run.stage].seq_len if stages else config.data.seq_len
    tokens_per_step = lambda run: config.data.batch_size * row_len(run)
    logger, losses = _Logger(tcfg, tokens_per_step, bar, step), _Losses(ckpt)
    all_hooks = (_eval_hook(tcfg),)
    if schedule and len(stages) > 1 and tcfg.curriculum_threshold > 0:
        checks: dict[int, list] = {}  # stage -> its held-out rows, built when first needed

        def threshold(run: Run) -> None:
            i = run.stage
            if i < len(stages) - 1 and run.step < schedule.end(i):
                if i not in checks:
                    held_out = pipeline.make_train_iterator(stage_data(i, True), tok)
                    checks[i] = list(evaluate.take_batches(held_out, curlib.CHECK_ROWS, eval_rows))
                got = evaluate.evaluate(eval_batch, run.state.params, checks[i])["exact_match"]
                run.writer.write(run.step, {"stage": i, "stage_exact_match": got})
                if got >= tcfg.curriculum_threshold:
                    schedule.end_early(i, run.step, lead)

        all_hooks += (Hook(tcfg.eval_every, threshold),)  # before the checkpoint of the step it may end a stage at
    all_hooks += (_checkpoint_hook(tcfg), *hooks)
    try:
        late = None  # (step, its metrics, its batch): a log line to write after the next dispatch
        with _StopFlag(jax.process_count() > 1) as stop:
            while run.step < run.end and run.stop_signal is None:
                if schedule and run.step == schedule.end(run.stage) and run.stage < len(stages) - 1:
                    run.stage += 1  # the next stage: longer rows, a fresh iterator (its own seed)
                    run.iterator = pipeline.make_train_iterator(stage_data(run.stage), tok)
                    if lead:
                        s = stages[run.stage]
                        bar.write(f"curriculum stage {run.stage + 1}/{len(stages)} from step {run.step + 1}: "
                                  f"babilong {s.length}, rows of {s.seq_len} tokens")
                batch = next(run.iterator)
                steplib.check_loss_positions(batch["loss_mask"], tcfg.loss_positions, f"training batch {run.step + 1}")
                run.state, run.step_metrics = train_step(run.state, parallel.global_batch(batch, mesh, rules))
                run.step += 1
                losses.add(run.step, run.step_metrics["loss"])
                if late is not None:  # the previous step's log line, fetched while this step runs
                    late_step, late_metrics, late_batch = late
                    logger.write(run, late_step, losses.check(late_step), float(late_metrics["grad_norm"]),
                                 _crc(late_batch))
                    late = None
                run.stop_signal = stop.after_step(run.step)
                bar.update(1)
                due = [hook for hook in all_hooks if hook.due(run)]
                if due or run.step == run.end or run.stop_signal is not None:
                    run.loss = losses.check(run.step)  # hooks see a checked state: nothing non-finite is saved
                    run.batch_crc32 = _crc(batch)
                    if logger.hook.due(run):
                        logger.write(run, run.step, run.loss, float(run.step_metrics["grad_norm"]), run.batch_crc32)
                    for hook in due:
                        hook.fn(run)
                elif logger.hook.due(run):
                    late = (run.step, run.step_metrics, batch)
        ckpt.wait()
        result = {"step": run.step, **run.metrics}
        if run.stop_signal:
            result["stopped_by"] = run.stop_signal
            if lead:
                print(f"{run.stop_signal}: saved step {run.step} to {ckpt.directory}; exiting", flush=True)
        elif run.step == tcfg.steps:  # the run is over (not paused at train.stop_at_step): final evaluation
            result.update(run_eval(run.state.params))
            keys = ("eval_loss", "exact_match", "heldout_loss", "heldout_perplexity")
            run.writer.write(run.step, {k: result[k] for k in keys if k in result})
            if tcfg.eval_task:
                result.update(_split_eval(config, tok, eval_rows, run.state.params, eval_batch))
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        run.writer.close()
    return result

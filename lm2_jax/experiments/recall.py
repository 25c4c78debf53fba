"""`python -m lm2_jax.experiments.recall`: the memory capacity probe (synthetic associative recall).

    python -m lm2_jax.experiments.recall --quick              # 6.5 minutes on 2 CPU cores (2026-12-02)
    python -m lm2_jax.experiments.recall --out runs/recall    # slots 4..32, gaps 0..3

k key -> value pairs fill the first segment, `gap` segments of filler follow, and a query
segment asks for every value by its key (`recall_task.py`). Each setting trains the model of
`--config` from scratch (default `configs/tiny.py`: its backbone, memory variant and segment
length; `--config.model.memory.*=...` overrides it) with LM2's memory, and the vanilla control
(`memory.layers=0`, the same segments: no path from the pairs to the queries), then scores
held-out rows for every k and gap. Three reference lines tell what a score means: chance
(1 / n_values), and 1/k, what a memory that holds the *set* of values but not which key each
belongs to would score.

Prints progress on stderr, one JSON line per (model, slots, gap, k) on stdout, and writes
`recall.jsonl`, `recall.png` and a text table to `--out`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import flags

from lm2_jax import cli, config as cfglib
from lm2_jax.errors import UsageError

_CONFIG = cli.config_flag(cfglib.checkout_config("tiny.py"),
                          "Model config (its data/train sections are replaced by the probe's).")
_QUICK = flags.DEFINE_bool("quick", False, "One slot count (the config's) and gap 1: about 5 minutes on 2 cores.")
_OUT = flags.DEFINE_string("out", "runs/recall", "Directory for recall.jsonl, recall.png and recall.txt.")
_KS = flags.DEFINE_string("ks", "1,2,4,8", "Numbers of key/value pairs scored (each <= segment_len / 2).")
_SLOTS = flags.DEFINE_string("slots", "", "Memory slot counts N to train ('' = 4,8,16,32; --quick: the config's).")
_GAPS = flags.DEFINE_string("gaps", "", "Filler segments between pairs and queries ('' = 0,1,3; --quick: 1).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Train steps per model.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows per train step.")
_EVAL_ROWS = flags.DEFINE_integer("eval_rows", 256, "Held-out rows per (k, gap).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the model init, the training rows and the held-out rows.")


# the memory settings each record carries, so a table of probes says which memory scored what
MEMORY_KEYS = ("layers", "placement", "write_rule", "address", "read_scope", "write_candidate", "routing",
               "normalize_bank", "init", "top_k", "forget_bias_init")


class ProbeError(UsageError):
    """A bad flag value; the message names the flag."""


def _ints(flag, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProbeError(f"--{flag.name}={text!r}: expected comma-separated integers") from None
    if not values:
        raise ProbeError(f"--{flag.name} is empty")
    return values


def probe_config(base, task, slots: int | None, layers: int | None, steps: int, batch: int, seed: int):
    """The model section of `base` on the probe's vocabulary, with the probe's train settings."""
    import ml_collections

    config = ml_collections.ConfigDict(base.to_dict())
    m = config.model
    m.vocab_size = task.vocab_size
    m.memory.segment_len = task.segment_len
    if slots is not None:
        m.memory.slots = slots
        m.memory.top_k = min(m.memory.top_k, slots)
    if layers is not None:
        m.memory.layers = layers
    m.memory.carry = "sequence"
    config.data.batch_size, config.data.seq_len = batch, task.seq_len
    t = config.train
    t.steps, t.seed, t.grad_accum = steps, seed, 1
    t.warmup_steps = min(t.warmup_steps, steps // 10)
    t.loss_positions = task.max_pairs
    return cfglib.validate(config)


def train_and_score(config, task, gaps, ks, eval_rows: int, seed: int, desc: str) -> dict[tuple[int, int], float]:
    """Train one model on rows with k uniform in [1, max_pairs] and gap uniform over `gaps`;
    return the held-out accuracy (share of queries answered with the right value) per (gap, k)."""
    import jax
    from tqdm import tqdm

    from lm2_jax.experiments import recall_task
    from lm2_jax.train import state as statelib, step as steplib

    state = statelib.init_state(config)
    step = jax.jit(functools.partial(steplib.train_step, config), donate_argnums=0)
    P = config.train.loss_positions

    @jax.jit
    def score(p, b):  # per row: (#correct, #masked) targets
        sums = steplib.loss_sums(config.model, p, b, loss_positions=P)
        return sums.correct_B, sums.targets_B

    batches = recall_task.train_batches(task, config.data.batch_size, seed, gaps)
    bar = tqdm(range(config.train.steps), desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=2)
    metrics = None
    for _ in bar:
        state, new = step(state, next(batches))
        if metrics is not None and bar.n % 50 == 0:  # the previous step's loss: no wait on this one
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        metrics = new
    bar.close()
    out = {}
    for gap in gaps:
        for k in ks:
            hit, n = score(state.params, recall_task.eval_batch(task, k, gap, eval_rows, seed))
            out[(gap, k)] = float(hit.sum() / n.sum())
    return out


def plot(records: list[dict], path: str, task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = sorted({r["gap"] for r in records})
    ks = sorted({r["k"] for r in records})
    fig, axes = plt.subplots(1, len(gaps), figsize=(4.2 * len(gaps) + 1, 3.8), squeeze=False, sharey=True)
    for ax, gap in zip(axes[0], gaps):
        runs = sorted({(r["model"], r["slots"]) for r in records if r["gap"] == gap},
                      key=lambda x: (x[0] != "lm2", x[1]))
        for model, slots in runs:
            rs = sorted((r for r in records if r["gap"] == gap and r["model"] == model and r["slots"] == slots),
                        key=lambda r: r["k"])
            label = f"LM2, {slots} slots" if model == "lm2" else "vanilla (same segments)"
            ax.plot([r["k"] for r in rs], [r["value"] for r in rs], "o-" if model == "lm2" else "s--", label=label)
        ax.plot(ks, [1 / k for k in ks], ":", color="gray", label="values without binding (1/k)")
        ax.axhline(1 / task.n_values, color="black", lw=0.8, ls="-.", label=f"chance (1/{task.n_values})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("key/value pairs k")
        ax.set_title(f"{gap} filler segment{'s' if gap != 1 else ''} between pairs and queries", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out recall accuracy")
    axes[0][-1].legend(fontsize=7, loc="center right")  # the space between the 1/k line and a memory that binds
    fig.suptitle(f"Associative recall across segments of {task.segment_len} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(records: list[dict]) -> str:
    ks = sorted({r["k"] for r in records})
    rows = sorted({(r["model"], r["slots"], r["gap"]) for r in records}, key=lambda x: (x[0] != "lm2", x[2], x[1]))
    lines = [f"{'model':<8} {'slots':>5} {'gap':>3}  " + "  ".join(f"k={k:<4}" for k in ks)]
    for model, slots, gap in rows:
        acc = {r["k"]: r["value"] for r in records if (r["model"], r["slots"], r["gap"]) == (model, slots, gap)}
        lines.append(f"{model:<8} {slots if model == 'lm2' else '-':>5} {gap:>3}  "
                     + "  ".join(f"{acc[k]:<6.3f}" for k in ks))
    return "\n".join(lines)


def run(base, out_dir: str, ks, slot_counts, gaps, steps: int, batch: int, eval_rows: int, seed: int) -> list[dict]:
    from lm2_jax.experiments.recall_task import RecallTask

    task = RecallTask(base.model.memory.segment_len, max(gaps))
    for k in ks:
        task.check(k, 0)
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "recall.jsonl")
    records = []
    runs = [("lm2", n) for n in slot_counts] + [("vanilla", None)]
    date = time.strftime("%Y-%m-%d")
    with open(jsonl, "w") as f:
        for i, (model, slots) in enumerate(runs, 1):
            config = probe_config(base, task, slots, 0 if model == "vanilla" else None, steps, batch, seed)
            desc = f"[{i}/{len(runs)}] " + (f"LM2 {slots} slots" if model == "lm2" else "vanilla")
            t0 = time.perf_counter()
            acc = train_and_score(config, task, gaps, ks, eval_rows, seed, desc)
            mem = config.model.memory
            for (gap, k), value in sorted(acc.items()):
                r = {"name": "recall/accuracy", "model": model, "slots": mem.slots if model == "lm2" else 0,
                     "gap": gap, "k": k, "value": value, "unit": "share of queries",
                     "chance": 1 / task.n_values, "steps": steps, "segment_len": task.segment_len,
                     "eval_rows": eval_rows, "train_seconds": round(time.perf_counter() - t0, 1), "date": date,
                     "memory": {key: mem[key] for key in MEMORY_KEYS}}
                records.append(r)
                print(json.dumps(r), flush=True)
                f.write(json.dumps(r) + "\n")
    plot(records, os.path.join(out_dir, "recall.png"), task)
    text = table(records)
    with open(os.path.join(out_dir, "recall.txt"), "w") as f:
        f.write(text + "\n")
    print(text, file=sys.stderr)
    print(f"wrote {jsonl}, {os.path.join(out_dir, 'recall.png')}", file=sys.stderr)
    return records


def main(argv) -> int:
    cli.no_extra_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    base = cfglib.validate(_CONFIG.value)
    S = base.model.memory.segment_len
    if S < 2:
        raise ProbeError(f"--config model.memory.segment_len={S}: the probe needs segments (>= 2 tokens)")
    if not base.model.memory.layers:
        raise ProbeError("--config has model.memory.layers=0: the probe compares LM2's memory with vanilla")
    ks = _ints(_KS, _KS.value)
    slot_counts = _ints(_SLOTS, _SLOTS.value) if _SLOTS.value else (
        [base.model.memory.slots] if _QUICK.value else [4, 8, 16, 32])
    gaps = _ints(_GAPS, _GAPS.value) if _GAPS.value else ([1] if _QUICK.value else [0, 1, 3])
    for flag, values, lo in ((_KS, ks, 1), (_SLOTS, slot_counts, 1), (_GAPS, gaps, 0)):
        if min(values) < lo:
            raise ProbeError(f"--{flag.name}: {min(values)} is below {lo}")
    if max(ks) > S // 2:
        raise ProbeError(f"--ks: k={max(ks)} pairs do not fit a segment of {S} tokens (at most {S // 2})")
    for flag in (_STEPS, _BATCH, _EVAL_ROWS):
        if flag.value < 1:
            raise ProbeError(f"--{flag.name}={flag.value}: must be >= 1")
    try:
        os.makedirs(_OUT.value, exist_ok=True)
    except OSError as err:
        raise ProbeError(f"--out={_OUT.value}: cannot create it ({err.strerror or err})") from None
    run(base, _OUT.value, ks, slot_counts, sorted(set(gaps)), _STEPS.value, _BATCH.value, _EVAL_ROWS.value,
        _SEED.value)
    return 0


if __name__ == "__main__":
    from lm2_jax import runtime

    runtime.reexec_with_hugepage_malloc("lm2_jax.experiments.recall")
    cli.run(main)

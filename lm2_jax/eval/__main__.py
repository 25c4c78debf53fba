"""`python -m lm2_jax.eval`: evaluate a trained workdir.

    python -m lm2_jax.eval --workdir=runs/tiny --tasks=qa1 --lengths=0k,1k,2k --samples=200
        BABILong table (tasks x lengths) by greedy generation; writes eval.csv, eval.json (every
        prediction with its sample id) and eval.png to --out (default <workdir>/eval).
    python -m lm2_jax.eval memory --workdir=runs/tiny --task=qa1 --length=1k --sample=0
        memory heatmaps: token x slot read attention before/after a segment's update, and the
        memory's trajectories over segments (PNGs in --out).
    python -m lm2_jax.eval errors --workdir=runs/tiny --samples=1000
        qa1's wrong answers by kind (the person's earlier room, another person's room) and exact
        match by the distance of the fact, split by where the facts lie (lm2_jax/eval/qa1_errors.py).
    python -m lm2_jax.eval --workdir=runs/x --text=held_out.txt      perplexity of a text
    python -m lm2_jax.eval --workdir=runs/x --mmlu_dir=data/mmlu     MMLU-format multiple choice
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

from absl import flags

from lm2_jax import cli, runtime
from lm2_jax.errors import UsageError

F = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval, or <workdir>/eval/memory).")
    flags.DEFINE_string("tasks", "qa1-qa10", "bAbI tasks: qa1-qa10, qa1,qa3, ...")
    flags.DEFINE_string("lengths", "0k,1k,2k,4k,8k,16k,32k,64k,128k", "BABILong lengths, comma-separated.")
    flags.DEFINE_integer("samples", 100, "Test samples per task and length (the first of the bAbI test file).")
    flags.DEFINE_integer("batch_tokens", 32768, "Prompt tokens per generation batch (rows = this / length).")
    flags.DEFINE_integer("max_new_tokens", 16, "Longest answer generated.")
    flags.DEFINE_integer("seed", 0, "Seed of the background-text mixing.")
    flags.DEFINE_string("task", "qa1", "memory: the task of the sample drawn.")
    flags.DEFINE_string("length", "1k", "memory: the BABILong length of the sample drawn.")
    flags.DEFINE_integer("sample", 0, "memory: index of the sample in the bAbI test file.")
    flags.DEFINE_integer("block", 0, "memory: which memory block's read attention to draw.")
    flags.DEFINE_integer("segment", -1, "memory: the segment whose update is drawn (-1 = the question's).")
    flags.DEFINE_string("text", None, "Perplexity of this UTF-8 text file instead of the BABILong table.")
    flags.DEFINE_string("mmlu_dir", None, "MMLU-format directory (dev/, test/ CSVs) instead of the BABILong table.")
    flags.DEFINE_integer("mmlu_k", 5, "MMLU: shots per question, from the subject's dev file.")
    flags.DEFINE_integer("mmlu_limit", 0, "MMLU: questions per subject (0 = all).")
    flags.DEFINE_integer("seq_len", 1024, "Perplexity: tokens per row.")


def _babilong(config, params, step, tok, out_dir) -> None:
    from lm2_jax.eval import babilong as bl, plots

    tasks, lengths = bl.parse_tasks(F.tasks), bl.parse_lengths(F.lengths)
    if F.samples < 1:
        raise UsageError(f"--samples={F.samples} must be at least 1")
    table, predictions, failures = bl.evaluate(config.model, params, tok, tasks, lengths, F.samples,
                                               batch_tokens=F.batch_tokens, max_new_tokens=F.max_new_tokens,
                                               seed=F.seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["length", "task", "exact_match", "label_match", "samples"])
        for length in lengths:
            for task in tasks:
                cell = table.get(length, {}).get(task)
                if cell:
                    w.writerow([length, task, f"{cell['exact']:.4f}", f"{cell['label']:.4f}", cell["samples"]])
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"workdir": F.workdir, "step": step, "tasks": tasks, "lengths": lengths, "samples": F.samples,
                   "table": table, "failures": failures,
                   "predictions": [dataclasses.asdict(p) for p in predictions]}, f, indent=1)
    heat = {length: {t: table.get(length, {}).get(t, {}).get("exact", float("nan")) for t in tasks}
            for length in lengths}
    plots.accuracy_heatmap(heat, os.path.join(out_dir, "eval.png"),
                           f"{os.path.basename(os.path.normpath(F.workdir))} step {step}: exact match (%)")
    print(f"BABILong exact match (%), {F.workdir} step {step}, {F.samples} samples per cell:")
    print(bl.format_table(table, tasks, lengths, "exact"))
    print("label-set match (%):")
    print(bl.format_table(table, tasks, lengths, "label"))
    for failure in failures:
        print(f"not run: {failure}")
    print(f"wrote {out_dir}/eval.csv, eval.json, eval.png")


def _memory(config, params, step, tok, out_dir) -> None:
    import numpy as np

    from lm2_jax.data import babilong
    from lm2_jax.eval import babilong as bl, memory_maps, plots

    task, length = bl.parse_tasks(F.task)[0], bl.parse_lengths(F.length)[0]
    rows = list(babilong.split_samples(task, "test", length, tok, seed=F.seed, limit=F.sample + 1))
    match = [s for s in rows if s.index == F.sample]
    if not match:
        raise UsageError(f"--sample={F.sample}: no {task} test sample with that index fits {length}")
    sample = match[0]
    tokens = bl.prompt_of(sample, tok)
    if not 0 <= F.block < config.model.memory.layers:
        raise UsageError(f"--block={F.block}: the model has {config.model.memory.layers} memory blocks")
    tr = memory_maps.trace(config.model, params, tokens, F.segment)
    seg, start = tr["segment"], tr["starts"][tr["segment"]]
    labels = [tok.decode([int(t)], skip_special=False) for t in tokens[start:start + tr["before"].shape[1]]]
    os.makedirs(out_dir, exist_ok=True)
    name = f"{task}_{length}_sample{F.sample}"
    heat = plots.memory_read_heatmaps(
        tr["before"][F.block], tr["after"][F.block], labels, os.path.join(out_dir, f"{name}_read.png"),
        f"{sample.name}, block {F.block}, segment {seg}: read attention (mean over heads) "
        f"against M_{seg} (before) and M_{seg + 1} (after its update)")
    stats = {k: (v[:, F.block] if v.ndim == 2 else v) for k, v in tr["stats"].items()
             if k in ("memory_rms", "memory_change_rms", "g_in", "g_f", "read_entropy", "slot_norm_max",
                      "slot_norm_mean")}
    traj = plots.memory_trajectories(stats, os.path.join(out_dir, f"{name}_trajectories.png"),
                                     f"{sample.name}: the memory over {len(tr['starts'])} segments (block {F.block})")
    print(f"{sample.name}: {len(tokens)} tokens in {len(tr['starts'])} segments; answer {sample.answer!r}")
    print(f"read attention of segment {seg}: max {float(np.max(tr['before'][F.block])):.3f} before, "
          f"{float(np.max(tr['after'][F.block])):.3f} after the update")
    print(f"wrote {heat}\nwrote {traj}")


def _perplexity(config, params, step, tok) -> None:
    from lm2_jax.eval import mmlu

    try:
        with open(F.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UsageError(f"--text={F.text}: {err.strerror}") from None
    result = mmlu.perplexity(config.model, params, tok, text, F.seq_len)
    print(f"{F.text}: perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
          f"({F.workdir} step {step}, rows of {F.seq_len})")


def _mmlu(config, params, step, tok) -> None:
    from lm2_jax.eval import mmlu

    result = mmlu.evaluate(config.model, params, tok, F.mmlu_dir, k=F.mmlu_k, limit=F.mmlu_limit)
    for subject, acc in sorted(result["subjects"].items()):
        print(f"{subject:40s} {100 * acc:5.1f}")
    print(f"{'average':40s} {100 * result['average']:5.1f}   ({F.workdir} step {step}, {F.mmlu_k}-shot)")


def main(argv) -> int:
    from absl import logging as absl_logging

    from lm2_jax.data import tokenizer as toklib
    from lm2_jax.train import checkpoint

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    command = argv[1] if len(argv) > 1 else "babilong"
    if command not in ("babilong", "memory", "errors") or len(argv) > 2:
        raise UsageError(f"unknown command {' '.join(argv[1:])!r}; commands: babilong (the default), memory, errors")
    if F.text is not None and F.mmlu_dir is not None:
        raise UsageError("give at most one of --text and --mmlu_dir")
    config, params, step = checkpoint.load_params(F.workdir, F.step)
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    if command == "errors":
        from lm2_jax.eval import qa1_errors

        print(f"{F.workdir} step {step}, qa1 test, first {F.samples} questions:")
        print(qa1_errors.format_report(qa1_errors.error_report(config, params, tok, F.samples)))
    elif command == "memory":
        _memory(config, params, step, tok, F.out or os.path.join(F.workdir, "eval", "memory"))
    elif F.text is not None:
        _perplexity(config, params, step, tok)
    elif F.mmlu_dir is not None:
        _mmlu(config, params, step, tok)
    else:
        _babilong(config, params, step, tok, F.out or os.path.join(F.workdir, "eval"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    runtime.reexec_with_hugepage_malloc("lm2_jax.eval")
    _define_flags()
    cli.run(main)

"""`python -m lm2_jax.experiments.babilong`: LM2 vs RMT vs vanilla Llama on BABILong, one backbone.

    python -m lm2_jax.experiments.babilong --quick          # a smoke run, about 2 minutes on 2 cores
    python -m lm2_jax.experiments.babilong                  # the CPU comparison of docs/results/ (README)
    python -m lm2_jax.experiments.babilong --models lm2,rmt,vanilla --tasks qa1-qa5 \\
        --train_lengths 0k-2k --eval_lengths 0k,1k,2k,4k,8k,16k --budget 4000000 --samples 25

Every model is the same Llama backbone (`model_config`: the configs `configs/babilong_{lm2,rmt,
vanilla}.py` call it), trained on the same mix of tasks, built on the fly from generated bAbI
stories hidden in the training books (`data.source="babilong_generated"`), with the same curriculum
over the training lengths (one stage per length, 0k -> 1k -> 2k: more segments each stage; each
stage gets an equal share of the token budget) and the same number of tokens. Then each is scored
by real greedy generation (`lm2_jax.eval.babilong`) on the real bAbI test files hidden in the
held-out books, at every evaluation length.

- LM2: memory in block 1 (16 slots, the token candidate, the bank RMS-normalised, as the tiny
  default), segments of `S` tokens;
- RMT: 16 learned memory tokens around the same segments (`model.kind="rmt"`);
- vanilla: trained with full attention over its rows (the paper's baseline) and evaluated twice:
  with full attention at the lengths it was trained on (longer ones are out of its positions), and
  segmented with no memory (segments of `S`, nothing crosses them) at every length.

Training is resumable (each model's workdir under `--workdir` keeps its checkpoints; a model whose
evaluation is already in its `babilong_eval.json` is not redone), so a stopped run continues when
the same command runs again. Writes `babilong_{--tag}.json`, `.md` (the table, one block per model
as the paper's Table 1) and `.png` (exact match vs context length, one panel per task, the segment
length marked) to `--out_dir`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import flags

from lm2_jax import cli, config as cfglib
from lm2_jax.data import babilong as bldata
from lm2_jax.errors import DataError, UsageError

MODELS = ("lm2", "rmt", "vanilla")
_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models to train and compare ({', '.join(MODELS)}).")
_TASKS = flags.DEFINE_string("tasks", "qa1-qa5", "bAbI tasks mixed in training and scored ('qa1-qa5', 'qa1,qa3').")
_TRAIN = flags.DEFINE_string("train_lengths", "0k-2k", "Training lengths, one curriculum stage each, in order.")
_EVAL = flags.DEFINE_string("eval_lengths", "0k,1k,2k,4k,8k,16k", "Evaluation lengths.")
_BUDGET = flags.DEFINE_float("budget", 4e6, "Training tokens per model (rows x row length, padding included).")
_SAMPLES = flags.DEFINE_integer("samples", 25, "Test samples per (task, length).")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a 2-block D=64 backbone, qa1, 0k-1k, a tiny budget.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/babilong", "One training workdir per model goes under it.")
_OUT = flags.DEFINE_string("out_dir", "docs/results", "Where the table, JSON and plot are written.")
_TAG = flags.DEFINE_string("tag", "cpu", "Names the outputs: babilong_{tag}.json/.md/.png.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the model init and the training data.")

SEGMENT = 128  # tokens per segment (LM2, RMT, vanilla segmented)
QUICK_SEGMENT = 64
ROW_ROOM = 32  # [bos], the question, [ans], the answer, [eos] after an L-token context
ZERO_K_ROW = 384  # the 0k rows (facts only; longer qa2/qa3 stories lose their oldest facts)


def model_config(model: str, quick: bool = False):
    """The full config of one model of the comparison (every model shares the backbone)."""
    if model not in MODELS:
        raise cfglib.ConfigError("model", model, f"must be one of {', '.join(MODELS)}")
    c = cfglib.defaults()
    m = c.model
    m.vocab_size = 8192
    if quick:
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 2, 4, 2, 192
    else:
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 128, 4, 4, 2, 384
    m.conv_width = 6  # the tiny default's fix for the binding plateau (docs/memory.md), for all three
    m.memory.segment_len = QUICK_SEGMENT if quick else SEGMENT
    if model == "lm2":
        m.memory.layers, m.memory.slots, m.memory.heads = 1, 16, 4
        m.memory.write_candidate, m.memory.normalize_bank = "tokens", True
    elif model == "rmt":
        m.kind, m.memory.slots, m.memory.init = "rmt", 16, "learned"
    else:
        m.memory.segment_len = 0  # trained with full attention over its rows
    d = c.data
    d.source, d.task, d.babilong_length, d.batch_size, d.truncate = "babilong_generated", "qa1", "0k", 8, "left"
    d.seq_len = ZERO_K_ROW  # also the row length of the end-of-training qa1 (0k) check
    t = c.train
    t.lr, t.warmup_steps, t.loss_positions = 1e-3, 50, 4
    t.eval_task, t.eval_samples, t.eval_batch_size = "qa1", 200, 50
    t.checkpoint_every, t.log_every = 100, 10
    return c


def parse_train_lengths(spec: str) -> list[str]:
    """'0k-2k' -> ['0k', '1k', '2k'] (the BABILong lengths in between); '0k,2k' as given."""
    try:
        return bldata.expand_lengths(spec, ranges=True)
    except DataError as err:
        raise UsageError(f"--train_lengths={spec}: {err}") from None


def row_len(length: str, segment: int) -> int:
    """Training row length for a BABILong length: the context plus ROW_ROOM, in whole segments."""
    tokens = bldata.length_tokens(length)
    if tokens == 0:
        return ZERO_K_ROW
    return -(-(tokens + ROW_ROOM) // segment) * segment


def curriculum(train_lengths: list[str], budget: float, batch: int, segment: int) -> tuple[str, int]:
    """(`train.curriculum`, `train.steps`): one stage per length, an equal share of the tokens each."""
    stages = []
    for length in train_lengths:
        seq = row_len(length, segment)
        stages.append((length, seq, max(1, math.ceil(budget / len(train_lengths) / (batch * seq)))))
    spec = ",".join(f"{n}:{s}:{k}" for n, s, k in stages)
    return spec, sum(k for _, _, k in stages)


def comparison_config(model: str, tasks: list[str], train_lengths: list[str], budget: float, quick: bool = False,
                      seed: int = 0):
    """`model_config` trained as the comparison trains it: the task mix, one curriculum stage per
    training length with an equal share of `budget` tokens, the warmup at most a tenth of the steps."""
    config = model_config(model, quick)
    config.data.task = ",".join(tasks)
    config.data.seed = config.train.seed = seed
    config.train.curriculum, config.train.steps = curriculum(train_lengths, budget, config.data.batch_size,
                                                             QUICK_SEGMENT if quick else SEGMENT)
    config.train.warmup_steps = min(config.train.warmup_steps, max(1, config.train.steps // 10))
    return cfglib.validate(config)


def _train(model: str, args: dict, workdir: str) -> dict:
    from lm2_jax.train import loop

    config = comparison_config(model, args["tasks"], args["train_lengths"], args["budget"], args["quick"],
                               args["seed"])
    t0 = time.perf_counter()
    result = loop.train(config, workdir)
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": config.train.steps,
            "curriculum": config.train.curriculum, "qa1_0k_exact_match": result.get("exact_match"),
            "describe": cfglib.describe_model(config.model)}


def _evaluate(config, params, step: int, variants: dict, args: dict) -> dict:
    """{variant name: {"table", "lengths", "failures", "seconds"}} for one trained model."""
    from lm2_jax.data import tokenizer as toklib
    from lm2_jax.eval import babilong as bl

    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    out = {}
    for name, (edit, lengths, note) in variants.items():
        model_cfg = config.model.copy_and_resolve_references()
        edit(model_cfg)
        t0 = time.perf_counter()
        table, preds, failures = bl.evaluate(model_cfg, params, tok, args["tasks"], lengths, args["samples"],
                                             seed=args["seed"])
        prompt = {n: float(sum(p.prompt_tokens for p in preds if p.length == n)
                           / max(1, sum(p.length == n for p in preds))) for n in lengths}
        out[name] = {"table": table, "lengths": lengths, "failures": failures, "step": step, "note": note,
                     "mean_prompt_tokens": prompt, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}:\n{bl.format_table(table, args['tasks'], lengths)}", file=sys.stderr, flush=True)
    return out


def variants_of(model: str, eval_lengths: list[str], train_lengths: list[str], segment: int) -> dict:
    """The evaluated forms of a trained model: (edit of its model section, lengths)."""
    if model != "vanilla":
        return {model: (lambda m: None, eval_lengths, "")}
    longest = max(bldata.length_tokens(n) for n in train_lengths)

    def segmented(m):
        m.memory.segment_len = segment

    return {"vanilla (full attention)": (lambda m: None,
                                         [n for n in eval_lengths if bldata.length_tokens(n) <= longest],
                                         "evaluated with full attention up to its longest training length"),
            "vanilla (segmented, no memory)": (segmented, eval_lengths,
                                               f"evaluated in segments of {segment} tokens with no memory: nothing "
                                               "crosses a segment")}


def majority_share(task: str, samples: int) -> float:
    """What always answering a task's most frequent answer scores on its first `samples` test questions."""
    import collections

    from lm2_jax.data import babi

    answers = [s.answer for s in babi.load_task(task, "test")[:samples]]
    return max(collections.Counter(answers).values()) / len(answers)


def markdown(results: dict, args: dict) -> str:
    from lm2_jax.eval import babilong as bl

    lines = [f"# BABILong at small scale: {', '.join(results['runs'])}", "",
             f"Command: `{results['command']}`", "",
             f"Date {results['date']}; hardware: {results['hardware']}; training and evaluation "
             f"{results['wall_minutes']:.1f} min in all. "
             f"Exact match (%) of greedy generation on {args['samples']} real test samples per cell (the bAbI test "
             "files hidden in the held-out books); '–' = not evaluated. Always giving a task's most frequent "
             "answer scores " + ", ".join(f"{t} {100 * v:.0f}%" for t, v in results["majority"].items()) + ".", ""]
    for name, ev in results["evaluations"].items():
        run = results["runs"][ev["run"]]
        lines += [f"## {name}", "", f"{run['describe']}; {run['params']:,} parameters; {run['steps']} steps, "
                  f"curriculum `{run['curriculum']}`, trained in {run['train_seconds'] / 60:.1f} min"
                  + (f"; {ev['note']}" if ev.get("note") else "") + ".", "", "```",
                  bl.format_table(ev["table"], args["tasks"], ev["lengths"]), "```", ""]
    return "\n".join(lines)


def plot(results: dict, args: dict, path: str, segment: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = args["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(3.2 * len(tasks) + 1, 7), 3.8), squeeze=False,
                             sharey=True)
    styles = {"lm2": "o-", "rmt": "s-", "vanilla (full attention)": "^-", "vanilla (segmented, no memory)": "v--"}
    for ax, task in zip(axes[0], tasks):
        for name, ev in results["evaluations"].items():
            pts = [(ev["mean_prompt_tokens"][n], 100 * ev["table"][n][task]["exact"]) for n in ev["lengths"]
                   if task in ev["table"].get(n, {})]
            if pts:
                ax.plot(*zip(*pts), styles.get(name, "o-"), label=name.upper() if name in ("lm2", "rmt") else name)
        ax.axhline(100 * results["majority"][task], color="black", lw=0.8, ls="-.")
        ax.text(0.02, 100 * results["majority"][task] + 1.5, "most frequent answer",
                fontsize=7, transform=ax.get_yaxis_transform())
        ax.axvline(segment, color="gray", ls=":", lw=1)
        ax.text(segment, 2, f" segment\n ({segment})", fontsize=7, color="gray")
        ax.set_xscale("log")
        ax.set_ylim(0, 102)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("BABILong exact match vs context length: one backbone, data and token budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: dict) -> dict:
    import jax

    from lm2_jax.runtime import device_description
    from lm2_jax.train import checkpoint

    segment = QUICK_SEGMENT if args["quick"] else SEGMENT
    results = {"runs": {}, "evaluations": {}, "date": time.strftime("%Y-%m-%d"), "command": args["command"],
               "hardware": device_description(), "args": {k: v for k, v in args.items() if k != "command"}}
    for model in args["models"]:
        workdir = os.path.join(args["workdir"], model)
        done_path = os.path.join(workdir, "babilong_eval.json")
        if os.path.isfile(done_path):
            with open(done_path) as f:
                done = json.load(f)
            if done.get("args") == results["args"]:
                print(f"{model}: trained and evaluated before ({done_path})", file=sys.stderr)
                results["runs"][model], evals = done["run"], done["evaluations"]
                results["evaluations"].update(evals)
                continue
        print(f"== {model}: training ({workdir})", file=sys.stderr, flush=True)
        info = _train(model, args, workdir)
        config, params, step = checkpoint.load_params(workdir)
        info["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
        results["runs"][model] = info
        evals = _evaluate(config, params, step,
                          variants_of(model, args["eval_lengths"], args["train_lengths"], segment), args)
        for ev in evals.values():
            ev["run"] = model
        results["evaluations"].update(evals)
        with open(done_path, "w") as f:
            json.dump({"args": results["args"], "run": info, "evaluations": evals}, f, indent=1)
    # Summed over the models' training and evaluation (a rerun that reuses them takes seconds).
    results["wall_minutes"] = (sum(r["train_seconds"] for r in results["runs"].values())
                               + sum(e["seconds"] for e in results["evaluations"].values())) / 60
    results["majority"] = {t: majority_share(t, args["samples"]) for t in args["tasks"]}
    os.makedirs(args["out_dir"], exist_ok=True)
    stem = os.path.join(args["out_dir"], f"babilong_{args['tag']}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results, args))
    plot(results, args, stem + ".png", segment)
    print(markdown(results, args))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png", file=sys.stderr)
    return results


def main(argv) -> int:
    cli.no_extra_args(argv)
    from absl import logging as absl_logging

    from lm2_jax.eval import babilong as bl

    absl_logging.set_verbosity(absl_logging.WARNING)
    quick = _QUICK.value
    models = [m.strip() for m in _MODELS.value if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise UsageError(f"--models={','.join(_MODELS.value)}: choose from {', '.join(MODELS)}")
    defaults = lambda flag, quick_value: quick_value if quick and not flag.present else flag.value
    args = {
        "models": list(dict.fromkeys(models)),
        "tasks": bl.parse_tasks(defaults(_TASKS, "qa1")),
        "train_lengths": parse_train_lengths(defaults(_TRAIN, "0k-1k")),
        "eval_lengths": bl.parse_lengths(defaults(_EVAL, "0k,1k")),
        "budget": float(defaults(_BUDGET, 1e5)),
        "samples": int(defaults(_SAMPLES, 4)),
        "quick": quick, "seed": _SEED.value,
        "workdir": defaults(_WORKDIR, "runs/babilong_quick"),
        "out_dir": defaults(_OUT, os.path.join("runs", "babilong_quick")),
        "tag": defaults(_TAG, "quick"),
        "command": "python -m lm2_jax.experiments.babilong " + " ".join(sys.argv[1:]),
    }
    if args["budget"] <= 0:
        raise UsageError(f"--budget={_BUDGET.value}: must be > 0 tokens")
    if args["samples"] < 1:
        raise UsageError(f"--samples={_SAMPLES.value}: must be at least 1")
    run(args)
    return 0


if __name__ == "__main__":
    from lm2_jax import runtime

    runtime.reexec_with_hugepage_malloc("lm2_jax.experiments.babilong")
    cli.run(main)

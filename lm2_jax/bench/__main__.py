"""`python -m lm2_jax.bench [--quick] [--out=results.jsonl]`: throughput, MFU and scaling figures.

    python -m lm2_jax.bench --quick                              # configs/bench.py, about 3 minutes
    python -m lm2_jax.bench --only=peak_matmul,compile           # some figure groups (and what they need)
    python -m lm2_jax.bench --config.model.d_model=256           # any field overridden, as in every command

`--config` (default: the checkout's `configs/bench.py`) is the LM2 model; the vanilla Llama it is
compared with is the same config with no memory and one segment (`cases.vanilla_of`), and the RMT
the same backbone and segments with 16 memory tokens (`cases.rmt_of`, train step only), so an
override applies to all three.

Prints one JSON line per figure ({"name", "value", "unit", "config", "device", "jax", ...}) on
stdout, progress on stderr, and appends the lines to `--out` if given. The full run took 15 min
32 s on 2 CPU cores (2026-12-02), 13 min 24 s on an AVX-512 host (2026-12-03); `--quick`
(batches of 2 rows, contexts up to 16K) took 3 min before the `train_cli` group (about a minute
more) was added. The README's performance section lists what it printed on this project's machine.

`train_cli` is the one group on another config: `python -m lm2_jax.train` on `configs/tiny.py` (the
CLI's default, whose steps are short enough for the host's work to show) against the jitted step
it runs, dispatched back to back (`cases.bench_train_cli`).

Each group of figures runs in its own child process (this command with the internal `--_job`
flag and the same `--config` arguments), so one group's buffers (or PyTorch's allocator) never
crowd the next, and a group that fails reports an error line instead of ending the run.

On Linux the children run with glibc malloc backing large blocks with transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): XLA's CPU runtime mallocs its multi-GB step
temporaries afresh each step, and with 4 KiB pages the vanilla step page-faulted 1.7M times
(6.5 s of kernel time, steps a fifth slower); with huge pages it faults about 8K times.
`--no_malloc_tuning` measures the untuned process; the PyTorch peer gets the same environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import flags

from lm2_jax import cli, runtime
from lm2_jax.config import checkout_config
from lm2_jax.errors import UsageError
from lm2_jax.runtime import MALLOC_TUNING, tuned_env

GROUPS = ["peak_matmul", "train_step", "torch_peer", "memory_overhead", "context_scaling", "decode", "compile",
          "train_cli"]

# This module runs only as `python -m lm2_jax.bench`, so its flags are defined here.
_CONFIG = cli.config_flag(checkout_config("bench.py"), "The LM2 model's ml_collections config file (file.py or "
                          "file.py:arg); the vanilla model is derived from it.")
flags.declare_key_flag("config")  # listed by --help beside the flags below
_QUICK = flags.DEFINE_boolean("quick", False, "Smaller batches and contexts: about 3 minutes on 2 cores.")
_OUT = flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
_ONLY = flags.DEFINE_list("only", [], f"Comma-separated figure groups (default: all): {','.join(GROUPS)}.")
_NO_MALLOC_TUNING = flags.DEFINE_boolean("no_malloc_tuning", False, "Keep glibc malloc's defaults in the children.")
_JOB = flags.DEFINE_string("_job", "", "Internal (set by the bench for its child processes): the group to compute.")
_PEAK = flags.DEFINE_float("_peak", 0.0, "Internal (child processes): the peak GFLOP/s that MFU is taken against.")
_DECODE = flags.DEFINE_boolean("_decode", False, "Internal (child processes): also time decode after the contexts.")


def _config_args(argv: list[str]) -> list[str]:
    """The `--config=...` and `--config.*` arguments of this command line (flagfiles expanded), in
    the order given, so a child process builds the same config."""
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    out, i = [], 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg == "--":
            break
        m = re.match(r"-{1,2}(no)?(config(?:\.[^=]*)?)(=|$)", arg)
        if not m:
            continue
        out.append(arg)
        if not m.group(3) and not m.group(1) and i < len(args) and not flags.FLAGS[m.group(2)].boolean:
            out.append(args[i])  # `--config path` / `--config.a.b value`
            i += 1
    return out


def _child(job: str, env: dict, extra=()) -> list[dict]:
    """Run one job in a fresh interpreter; its stdout is JSON lines of records."""
    if job == "torch_peer":
        cmd = [sys.executable, "-m", "lm2_jax.bench.torch_peer", *extra]
    else:
        cmd = [sys.executable, "-m", "lm2_jax.bench", f"--_job={job}", *_config_args(sys.argv),
               *(["--quick"] if _QUICK.value else []), *extra]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    records = []
    for ln in p.stdout.splitlines():
        if ln.startswith("{"):
            try:
                records.append(json.loads(ln))
            except json.JSONDecodeError:
                records.append({"error": f"{job}: unreadable output line {ln[:80]!r}"})
    if p.returncode or not records:  # keep what the child printed before it failed
        records.append({"error": f"{job}: child exited {p.returncode}"
                        + (" (killed: out of memory?)" if p.returncode in (-9, 137) else "")})
    return records


def _settings(quick: bool) -> dict:
    return {"batch": 2 if quick else 8, "reps": 2 if quick else 3,
            "lengths": [1024, 4096, 16384] if quick else [1024, 4096, 16384, 65536],
            "vanilla_lengths": [1024, 4096] if quick else [1024, 4096, 16384, 65536]}


def _job_config(variant: str):
    """A validated copy of one variant's config: `--config` for lm2, its `cases.vanilla_of` for vanilla,
    its `cases.rmt_of` for rmt."""
    from lm2_jax import config as cfglib
    from lm2_jax.bench import cases

    derive = {"lm2": lambda c: c, "vanilla": cases.vanilla_of, "rmt": cases.rmt_of}[variant]
    config = derive(_CONFIG.value)
    return cfglib.validate(config.copy_and_resolve_references())


def _run_job(job: str) -> None:
    """Inside a child: compute one group and print its records."""
    from lm2_jax.bench import cases

    quick = _QUICK.value
    st = _settings(quick)
    variant = job.split(":")[1] if ":" in job else "lm2"
    if variant not in ("lm2", "vanilla", "rmt"):
        raise UsageError(f"--_job={job}: unknown variant {variant!r}")
    cfg = _job_config(variant)
    cfg.data.batch_size = st["batch"]
    if job == "peak_matmul":
        records = cases.bench_peak_matmul(quick)
    elif job.startswith("train_step:"):
        records = cases.bench_train_step(variant, cfg, _PEAK.value, st["reps"])
    elif job.startswith("context_scaling:"):
        lengths = st["lengths"] if variant == "lm2" else st["vanilla_lengths"]
        records, memories = cases.bench_context(variant, cfg, lengths, segment=1024)
        if variant == "lm2" and _DECODE.value:
            records += cases.bench_decode(memories, segment=1024, reps=st["reps"])
    elif job == "compile":
        records = cases.bench_compile(cfg)
    elif job == "train_cli":
        records = cases.bench_train_cli(checkout_config("tiny.py"), 150 if quick else 450, st["reps"])
    else:
        raise UsageError(f"--_job={job}: unknown job")
    for r in records:
        print(json.dumps(r, default=float), flush=True)


def main(argv) -> int:
    cli.no_extra_args(argv)
    if _JOB.value:
        _run_job(_JOB.value)
        return 0

    wanted = set(_ONLY.value) if _ONLY.value else set(GROUPS)
    if unknown := wanted - set(GROUPS):
        raise UsageError(f"--only: unknown group(s) {sorted(unknown)}; choose from {','.join(GROUPS)}")

    # The parent only names the device; on a GPU it must not take the memory the children need.
    user_prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    from lm2_jax.bench import cases

    # A bad --config value fails here, before any child starts (both variants are checked).
    dtype, vanilla_cfg = _job_config("lm2").model.dtype, _job_config("vanilla")

    # Figures depend on one another: MFU on the peak, ratios on both steps, decode on the contexts.
    needs = {"train_step": {"peak_matmul"}, "torch_peer": {"train_step"}, "memory_overhead": {"train_step"},
             "decode": {"context_scaling"}}
    for _ in range(2):
        for g in list(wanted):
            wanted |= needs.get(g, set())

    env = dict(os.environ)
    if user_prealloc is None:
        env.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
    else:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user_prealloc
    tuned = sys.platform.startswith("linux") and not _NO_MALLOC_TUNING.value
    if tuned:
        env = tuned_env(env)
    quick = _QUICK.value
    st = _settings(quick)
    common = {"device": runtime.device_description(), "jax": jax.__version__, "mode": "quick" if quick else "full",
              "malloc_tuning": MALLOC_TUNING if tuned else None, "date": time.strftime("%Y-%m-%d")}
    out_file = open(_OUT.value, "a") if _OUT.value else None
    results: dict[str, dict] = {}
    t_start = time.perf_counter()

    def emit(records, group):
        for r in records:
            if "error" in r and "name" not in r:
                r = {"name": f"{group}/error", "value": None, "unit": None, "config": {}, **r}
            r = {**r, **common}
            results[r["name"]] = r
            line = json.dumps(r, default=float)
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
                out_file.flush()

    def stage(name):
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {name}", file=sys.stderr, flush=True)

    def value(name):
        return results.get(name, {}).get("value")

    if "peak_matmul" in wanted:
        stage("peak_matmul")
        emit(_child("peak_matmul", env), "peak_matmul")
    if "train_step" in wanted:
        for variant in ("vanilla", "lm2", "rmt"):
            stage(f"train_step {variant} (batch {st['batch']} x {vanilla_cfg.data.seq_len})")
            emit(_child(f"train_step:{variant}", env, [f"--_peak={value(f'peak_matmul/{dtype}') or 0}"]),
                 f"train_step/{variant}")
    if "torch_peer" in wanted:
        stage("torch_peer (Hugging Face LlamaForCausalLM + AdamW, PyTorch CPU)")
        ours = results.get("train_step/vanilla/tokens_per_s", {})
        peer = _child("torch_peer", env, [f"--model_json={vanilla_cfg.model.to_json()}", f"--batch={st['batch']}",
                                          f"--seq_len={vanilla_cfg.data.seq_len}", f"--steps={st['reps']}"])[0]
        cfg = {**ours.get("config", {}), "attention": "torch sdpa"}  # same shapes, PyTorch's kernel
        if "error" in peer:
            emit([{"name": "torch_peer/vanilla/tokens_per_s", "value": None, "unit": "tokens/s", "config": cfg,
                   "error": peer["error"]}], "torch_peer")
        else:
            emit([cases._record("torch_peer/vanilla/tokens_per_s", peer["tokens_per_s"], "tokens/s", cfg,
                                times=peer["times"], threads=peer["threads"], torch=peer["torch"],
                                transformers=peer["transformers"])], "torch_peer")
            if ours.get("value"):
                emit([cases._record("torch_peer/ratio_ours_over_torch", ours["value"] / peer["tokens_per_s"], "x",
                                    ours["config"], target=">= 1.0")], "torch_peer")
    both_steps = value("train_step/lm2/step_time") and value("train_step/vanilla/step_time")
    if "memory_overhead" in wanted and not both_steps:
        emit([{"error": "memory_overhead needs both train_step figures"}], "memory_overhead")
    elif "memory_overhead" in wanted:
        t_ratio = value("train_step/lm2/step_time") / value("train_step/vanilla/step_time")
        f_ratio = value("train_step/lm2/flops_per_token") / value("train_step/vanilla/flops_per_token")
        cfg = results["train_step/lm2/step_time"]["config"]
        emit([cases._record("memory_overhead/step_time_ratio", t_ratio, "x", cfg),
              cases._record("memory_overhead/flop_ratio", f_ratio, "x", cfg),
              cases._record("memory_overhead/time_ratio_over_flop_ratio", t_ratio / f_ratio, "x", cfg,
                            target="<= 1.1")], "memory_overhead")
    if "context_scaling" in wanted:
        for variant in ("lm2", "vanilla"):
            lengths = st["lengths"] if variant == "lm2" else st["vanilla_lengths"]
            decode = variant == "lm2" and "decode" in wanted
            stage(f"context_scaling {variant} {lengths}" + (" + decode" if decode else ""))
            emit(_child(f"context_scaling:{variant}", env, ["--_decode"] if decode else []),
                 f"context_scaling/{variant}")
    if "compile" in wanted:
        stage("compile (4 vs 32 layers)")
        emit(_child("compile", env), "compile")
    if "train_cli" in wanted:
        stage("train_cli (python -m lm2_jax.train on configs/tiny.py against its bare jitted step)")
        emit(_child("train_cli", env), "train_cli")
    stage(f"done: {len(results)} figures")
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    cli.run(main)

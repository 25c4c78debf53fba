"""`python -m lm2_jax.bench [--quick] [--out results.jsonl]`: throughput, MFU and scaling figures.

Prints one JSON line per figure ({"name", "value", "unit", "config", "device", "jax", ...}) on
stdout, progress on stderr, and appends the lines to `--out` if given. The full run takes about
9 minutes on 2 CPU cores; `--quick` (batches of 2 rows, contexts up to 16K) about 3. The README's
performance section lists what it printed on this project's machine.

Each group of figures runs in its own child process, so one group's buffers (or PyTorch's
allocator) never crowd the next, and a group that fails reports an error line instead of ending
the run.

On Linux the children run with glibc malloc backing large blocks with transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): XLA's CPU runtime mallocs its multi-GB step
temporaries afresh each step, and with 4 KiB pages the vanilla step page-faulted 1.7M times
(6.5 s of kernel time, 20% slower steps); with huge pages it faults about 8K times.
`--no_malloc_tuning` measures the untuned process; the PyTorch peer gets the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from lm2_jax.runtime import MALLOC_TUNING, tuned_env
GROUPS = ["peak_matmul", "train_step", "torch_peer", "memory_overhead", "context_scaling", "decode", "compile"]


def _device() -> str:
    import jax

    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{d.platform} {d.device_kind} x{jax.device_count()} ({cpu}, {os.cpu_count()} cores)"


def _child(job: str, args, env: dict, extra=()) -> list[dict]:
    """Run one job in a fresh interpreter; its stdout is JSON lines of records."""
    if job == "torch_peer":
        cmd = [sys.executable, "-m", "lm2_jax.bench.torch_peer", *extra]
    else:
        cmd = [sys.executable, "-m", "lm2_jax.bench", f"--_job={job}", f"--config={args.config}",
               *(["--quick"] if args.quick else []), *extra]
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


def _run_job(job: str, args) -> None:
    """Inside a child: compute one group and print its records."""
    from lm2_jax.bench import cases

    st = _settings(args.quick)
    variant = job.split(":")[1] if ":" in job else "lm2"
    cfg = cases.load_config(f"{args.config}:{variant}")
    cfg.data.batch_size = st["batch"]
    if job == "peak_matmul":
        records = cases.bench_peak_matmul(args.quick)
    elif job.startswith("train_step:"):
        records = cases.bench_train_step(variant, cfg, args._peak, st["reps"])
    elif job.startswith("context_scaling:"):
        lengths = st["lengths"] if variant == "lm2" else st["vanilla_lengths"]
        records, memories = cases.bench_context(variant, cfg, lengths, segment=1024)
        if variant == "lm2" and args._decode:
            records += cases.bench_decode(memories, segment=1024, reps=st["reps"])
    elif job == "compile":
        records = cases.bench_compile(cfg)
    else:
        raise SystemExit(f"unknown job {job}")
    for r in records:
        print(json.dumps(r, default=float), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and contexts: about 3 minutes on 2 cores")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    parser.add_argument("--config", default="configs/bench.py", help="config file with get_config('lm2'|'vanilla')")
    parser.add_argument("--only", default="", help=f"comma-separated figure groups (default: all): {','.join(GROUPS)}")
    parser.add_argument("--no_malloc_tuning", action="store_true", help="keep glibc malloc's defaults")
    parser.add_argument("--_job", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_peak", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--_decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._job:
        _run_job(args._job, args)
        return 0

    # The parent only names the device; on a GPU it must not take the memory the children need.
    user_prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    from lm2_jax.bench import cases

    wanted = set(args.only.split(",")) if args.only else set(GROUPS)
    if unknown := wanted - set(GROUPS):
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {GROUPS}")
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
    tuned = sys.platform.startswith("linux") and not args.no_malloc_tuning
    if tuned:
        env = tuned_env(env)
    st = _settings(args.quick)
    try:  # a bad --config fails here, before any child starts
        dtype = cases.load_config(args.config + ":lm2").model.dtype
        cases.load_config(args.config + ":vanilla")
    except Exception as e:  # noqa: BLE001 - any failure to build the config is the user's to fix
        parser.error(f"--config={args.config}: {e} (give a file whose get_config takes 'lm2' or 'vanilla')")
    common = {"device": _device(), "jax": jax.__version__, "mode": "quick" if args.quick else "full",
              "malloc_tuning": MALLOC_TUNING if tuned else None, "date": time.strftime("%Y-%m-%d")}
    out_file = open(args.out, "a") if args.out else None
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
        emit(_child("peak_matmul", args, env), "peak_matmul")
    if "train_step" in wanted:
        for variant in ("vanilla", "lm2"):
            stage(f"train_step {variant} (batch {st['batch']} x 1024)")
            emit(_child(f"train_step:{variant}", args, env, [f"--_peak={value(f'peak_matmul/{dtype}') or 0}"]),
                 f"train_step/{variant}")
    if "torch_peer" in wanted:
        stage("torch_peer (Hugging Face LlamaForCausalLM + AdamW, PyTorch CPU)")
        ours = results.get("train_step/vanilla/tokens_per_s", {})
        peer = _child("torch_peer", args, env, [f"--config={args.config}:vanilla", f"--batch={st['batch']}",
                                                f"--steps={st['reps']}"])[0]
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
                                    ours["config"], target=">= 2")], "torch_peer")
    if "memory_overhead" in wanted and not (value("train_step/lm2/step_time") and value("train_step/vanilla/step_time")):
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
            stage(f"context_scaling {variant} {lengths}" + (" + decode" if variant == "lm2" and "decode" in wanted else ""))
            emit(_child(f"context_scaling:{variant}", args, env,
                        ["--_decode"] if variant == "lm2" and "decode" in wanted else []), f"context_scaling/{variant}")
    if "compile" in wanted:
        stage("compile (4 vs 32 layers)")
        emit(_child("compile", args, env), "compile")
    stage(f"done: {len(results)} figures")
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

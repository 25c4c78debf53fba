"""`python -m lm2_jax.bench [--quick] [--out results.jsonl]`: throughput, MFU and scaling figures.

Prints one JSON line per figure ({"name", "value", "unit", "config", "device", "jax", ...}) on
stdout, progress on stderr, and appends the lines to `--out` if given. The full run takes about
13 minutes on 2 CPU cores; `--quick` (batches of 2 rows, contexts up to 16K) about 4. The README's
performance section lists what it printed on this project's machine.

On Linux the command re-executes itself once with glibc malloc tuned (one arena, no mmap, no
trimming): XLA's CPU runtime allocates its multi-GB step temporaries with malloc, and by default
each step page-faulted ~4.5 GB of fresh memory (1.1M faults, a quarter of its CPU time in the
kernel). `--no_malloc_tuning` measures the untuned process; the PyTorch peer inherits the same
environment either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MALLOC_TUNING = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


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


def _torch_peer(config_spec: str, batch: int, seq_len: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "lm2_jax.bench.torch_peer", f"--config={config_spec}", f"--batch={batch}",
           f"--seq_len={seq_len}", f"--steps={steps}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and contexts: about 4 minutes")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    parser.add_argument("--config", default="configs/bench.py", help="config file with get_config('lm2'|'vanilla')")
    parser.add_argument("--only", default="", help="comma-separated figure groups to run (default: all): "
                        "peak_matmul,train_step,torch_peer,memory_overhead,context_scaling,decode,compile")
    parser.add_argument("--no_malloc_tuning", action="store_true", help="keep glibc malloc's defaults")
    args = parser.parse_args(argv)

    if (sys.platform.startswith("linux") and not args.no_malloc_tuning
            and MALLOC_TUNING not in os.environ.get("GLIBC_TUNABLES", "")):
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), MALLOC_TUNING]))
        os.execve(sys.executable, [sys.executable, "-m", "lm2_jax.bench", *(argv if argv is not None else sys.argv[1:])],
                  env)

    import jax

    from lm2_jax.bench import cases

    groups = ["peak_matmul", "train_step", "torch_peer", "memory_overhead", "context_scaling", "decode", "compile"]
    wanted = set(args.only.split(",")) if args.only else set(groups)
    if unknown := wanted - set(groups):
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {groups}")
    # Figures depend on one another (MFU on the peak, ratios on both steps, decode on contexts).
    needs = {"train_step": {"peak_matmul"}, "torch_peer": {"train_step"}, "memory_overhead": {"train_step"},
             "decode": {"context_scaling"}}
    for g in list(wanted):
        wanted |= needs.get(g, set())
    for g in list(wanted):
        wanted |= needs.get(g, set())

    quick = args.quick
    batch, reps = (2, 2) if quick else (8, 3)
    lengths = [1024, 4096, 16384] if quick else [1024, 4096, 16384, 65536]
    spec = args.config
    lm2_cfg, van_cfg = cases.load_config(spec + ":lm2"), cases.load_config(spec + ":vanilla")
    for c in (lm2_cfg, van_cfg):
        c.data.batch_size = batch
    seq_len = van_cfg.data.seq_len
    common = {"device": _device(), "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
              "mode": "quick" if quick else "full",
              "malloc_tuning": MALLOC_TUNING in os.environ.get("GLIBC_TUNABLES", ""),
              "date": time.strftime("%Y-%m-%d")}
    out_file = open(args.out, "a") if args.out else None
    results: dict[str, dict] = {}
    t_start = time.perf_counter()

    def emit(records):
        for r in records:
            r = {**r, **common}
            results[r["name"]] = r
            line = json.dumps(r, default=float)
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
                out_file.flush()

    def stage(name):
        print(f"[bench {time.perf_counter() - t_start:6.0f}s] {name}", file=sys.stderr, flush=True)

    if "peak_matmul" in wanted:
        stage("peak_matmul")
        emit(cases.bench_peak_matmul(quick))
    if "train_step" in wanted:
        peak = results["peak_matmul/float32"]["value"]
        for variant, cfg in (("vanilla", van_cfg), ("lm2", lm2_cfg)):
            stage(f"train_step {variant} (batch {batch} x {seq_len})")
            emit(cases.bench_train_step(variant, cfg, peak, reps))
    if "torch_peer" in wanted:
        stage("torch_peer (Hugging Face LlamaForCausalLM, AdamW)")
        peer = _torch_peer(spec + ":vanilla", batch, seq_len, reps)
        ours = results["train_step/vanilla/tokens_per_s"]["value"]
        cfg = results["train_step/vanilla/tokens_per_s"]["config"]
        if "error" in peer:
            emit([cases._record("torch_peer/vanilla/tokens_per_s", None, "tokens/s", cfg, error=peer["error"])])
        else:
            emit([cases._record("torch_peer/vanilla/tokens_per_s", peer["tokens_per_s"], "tokens/s", cfg,
                                times=peer["times"], threads=peer["threads"], torch=peer["torch"],
                                transformers=peer["transformers"]),
                  cases._record("torch_peer/ratio_ours_over_torch", ours / peer["tokens_per_s"], "x", cfg,
                                target=">= 2")])
    if "memory_overhead" in wanted:
        t_ratio = results["train_step/lm2/step_time"]["value"] / results["train_step/vanilla/step_time"]["value"]
        f_ratio = results["train_step/lm2/flops_per_token"]["value"] / results["train_step/vanilla/flops_per_token"]["value"]
        cfg = results["train_step/lm2/step_time"]["config"]
        emit([cases._record("memory_overhead/step_time_ratio", t_ratio, "x", cfg),
              cases._record("memory_overhead/flop_ratio", f_ratio, "x", cfg),
              cases._record("memory_overhead/time_ratio_over_flop_ratio", t_ratio / f_ratio, "x", cfg,
                            target="<= 1.1")])
    memories = {}
    if "context_scaling" in wanted:
        stage(f"context_scaling {lengths}")
        recs, memories = cases.bench_context(lm2_cfg, van_cfg, lengths, segment=1024,
                                             vanilla_max=4096 if quick else None)
        emit(recs)
    if "decode" in wanted:
        stage("decode")
        emit(cases.bench_decode(memories, segment=1024, reps=reps))
    if "compile" in wanted:
        stage("compile (4 vs 32 layers)")
        emit(cases.bench_compile(lm2_cfg))
    stage(f"done: {len(results)} figures")
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

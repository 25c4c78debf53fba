"""Process set-up shared by the CLIs: glibc malloc with huge pages for XLA's CPU temporaries.

XLA's CPU runtime mallocs its step temporaries afresh every step; with 4 KiB pages a tiny training
step page-faults hundreds of thousands of times (`python -m lm2_jax.bench` measured 1.7M faults
and 20% of a step's time on its CPU config). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc
back large blocks with transparent huge pages. The variable is read when the process starts, so a
CLI re-executes itself once with it set; `LM2_NO_MALLOC_TUNING=1` (or a GLIBC_TUNABLES that
already names hugetlb) leaves the process alone. Other platforms are left alone.
"""

from __future__ import annotations

import os
import sys

MALLOC_TUNING = "glibc.malloc.hugetlb=1"


def tuned_env(env: dict) -> dict:
    """`env` with the malloc tuning appended to any GLIBC_TUNABLES already set."""
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), MALLOC_TUNING]))}


def reexec_with_hugepage_malloc(module: str) -> None:
    """Replace this process by `python -m module <same args>` with the tuning, if it lacks it."""
    env = os.environ
    if (not sys.platform.startswith("linux") or env.get("LM2_NO_MALLOC_TUNING") == "1"
            or "hugetlb" in env.get("GLIBC_TUNABLES", "")):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], tuned_env(dict(env)))


def device_description() -> str:
    """The first JAX device, the device count and the host CPU, for published figures."""
    import platform

    import jax

    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{d.platform} {d.device_kind} x{jax.device_count()} ({cpu}, {os.cpu_count()} cores)"

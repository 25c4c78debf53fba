"""`python -m lm2_jax.train` with faults a test injects, so the product schema holds no test hooks.

    python -m tests.workers.faulty_train --kill_at_step=5 [--nan_at_step=4] <the train CLI's flags>
    python -m tests.workers.faulty_train --sigterm_at_step=1 --sigterm_process=1 --step_sleep_ms=300 ...

`--kill_at_step=K` SIGKILLs the process at the start of step K, after the pending checkpoint is on
disk, like a preempted VM (no handler runs). `--nan_at_step=K` poisons step K's loss mask with NaN
(1-based, counted from this process's start). `--sigterm_at_step=K` sends SIGTERM to this process
after step K when it is process `--sigterm_process` (a pod host preempted alone);
`--step_sleep_ms` slows every step, so the others are still training when the notice spreads. All
are taken off argv before the train CLI parses it.
"""

import importlib
import os
import signal
import sys

import jax
import jax.numpy as jnp


def _take(name: str) -> int:
    for arg in list(sys.argv[1:]):
        if arg.startswith(f"--{name}="):
            sys.argv.remove(arg)
            return int(arg.split("=", 1)[1])
    return -1


def main() -> None:
    kill_at, nan_at = _take("kill_at_step"), _take("nan_at_step")
    term_at, term_proc, sleep_ms = _take("sigterm_at_step"), _take("sigterm_process"), _take("step_sleep_ms")
    from lm2_jax import cli, parallel
    from lm2_jax.train import loop

    hooks = []
    if sleep_ms > 0:
        import time

        hooks.append(loop.Hook(1, lambda run: time.sleep(sleep_ms / 1000)))
    if term_at > 0:
        def term(run):
            if run.step == term_at and jax.process_index() == max(term_proc, 0):
                os.kill(os.getpid(), signal.SIGTERM)
        hooks.append(loop.Hook(1, term))
    if kill_at > 0:
        def kill(run):
            if run.step + 1 == kill_at:
                run.ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        hooks.append(loop.Hook(1, kill))
    if nan_at > 0:
        global_batch, calls = parallel.global_batch, [0]

        def poisoned(batch, *args):
            calls[0] += 1
            out = global_batch(batch, *args)
            return {**out, "loss_mask": out["loss_mask"] * jnp.nan} if calls[0] == nan_at else out
        parallel.global_batch = poisoned
    train = loop.train
    loop.train = lambda config, workdir, hooks_=(): train(config, workdir, (*hooks_, *hooks))
    cli.run(importlib.import_module("lm2_jax.train.__main__").main)


if __name__ == "__main__":
    main()

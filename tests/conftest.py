"""Shared test helpers: tiny model configs built in one place so compiled functions are reused."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # lets tests load configs/*.py the way the CLIs do
    sys.path.insert(0, ROOT)

# The test extra installs libtpu (for `lm2_jax.aot`); without this every test process, and every
# subprocess it starts, would first probe for a TPU. Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Implicit rank promotion ((B, S) + (B,) broadcasting to (B, B, S)) is an error in this test session:
# product code broadcasts explicitly (`x[..., None]`). A config option, not the environment variable,
# so the subprocess workers (which do not import this file) run with JAX's default.
jax.config.update("jax_numpy_rank_promotion", "raise")
# The suite's programs are tiny and run once or twice, so XLA's backend optimisation costs more than it
# saves (a tiny train step compiles in 3.9 s instead of 5.6 s). Numerics are checked to the same
# tolerances either way; the training and multi-host tests run the CLIs in subprocesses, which keep
# the default optimisation.
jax.config.update("jax_disable_most_optimizations", True)


def run_module(module: str, *args, check: bool = True, timeout: int = 600):
    """`python -m module args...` from the checkout, as a user runs a CLI; with `check`, a non-zero
    exit fails the test with the ends of stdout and stderr."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def step_losses(workdir: str) -> dict[int, tuple[float, int]]:
    """{step: (loss, batch CRC)} from a run's metrics.jsonl, the last record of each step (a resumed run
    re-logs the steps it redoes): two runs trained the same iff these are equal."""
    import json

    from etils import epath  # the trainer's own path layer: a gs:// workdir reads the same

    out = {}
    for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = (rec["loss"], rec["batch_crc32"])
    return out


def shipped_config(name: str):
    """`configs/<name>.py`'s `get_config()` (`name` may carry the argument: `bench:vanilla`)."""
    import runpy

    file, _, arg = name.partition(":")
    get_config = runpy.run_path(os.path.join(ROOT, "configs", f"{file}.py"))["get_config"]
    return get_config(arg) if arg else get_config()


def tiny_model(vocab_size: int = 61, n_layers: int = 2, **memory):
    """The suite's small model section: D=32, 4 query heads over 2 KV heads, FFN 64; memory (when
    `layers` > 0) of 8 slots and 2 heads. `memory` overrides `model.memory` fields. Validated."""
    from lm2_jax import config as cfglib

    m = cfglib.model_defaults()
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = vocab_size, 32, n_layers, 4, 2, 64
    m.memory.update(dict(dict(slots=8, heads=2), **memory))
    cfglib.validate_model(m)
    return m


def tiny_config(vocab_size: int = 61, n_layers: int = 2, *, batch_size: int = 8, train=None, **memory):
    """A full config (every section at its default) around `tiny_model`; `train` overrides
    `config.train` fields. Validated."""
    from lm2_jax import config as cfglib

    config = cfglib.defaults()
    config.model = tiny_model(vocab_size, n_layers, **memory)
    config.data.batch_size = batch_size
    config.train.update(train or {})
    return cfglib.validate(config)


@pytest.fixture(scope="module")
def gcs():
    """A local GCS (tests/workers/gcs_emulator.py) and the environment that points clients at it."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tests.workers.gcs_emulator", str(port), "lm2-test"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, server.stderr.read()[-2000:]
            time.sleep(0.2)
    # NO_GCE_CHECK: google-auth would otherwise probe for a GCE metadata server (seconds per client)
    yield {**os.environ, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "True"}
    server.kill()
    server.wait()

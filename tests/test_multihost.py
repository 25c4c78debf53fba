"""Two processes x 4 CPU devices on localhost train like one process x 8 devices; when one of them
alone gets SIGTERM, both save the same step and exit 0; their checkpoint restores in a single
process on another mesh and training continues with the same losses."""

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, step_losses

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses

FLAGS = [
    "--config.model.d_model=64", "--config.model.d_ff=128",
    "--config.data.batch_size=8", "--config.data.seq_len=80",
    "--config.train.log_every=1", "--config.train.eval_samples=8", "--config.train.eval_batch_size=8",
    "--config.train.warmup_steps=1", "--config.train.steps=5", "--config.train.checkpoint_every=3",
    "--config.train.async_checkpoint=False",
]


def _env(devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _cmd(workdir, mesh, *extra):
    return [sys.executable, "-m", "lm2_jax.train", f"--workdir={workdir}", f"--config.mesh.shape={mesh}",
            *FLAGS, *extra]


def _check(proc):
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
    ref_dir, multi_dir = str(tmp_path / "one"), str(tmp_path / "two")
    _check(subprocess.run(_cmd(ref_dir, "(2,2,2)"), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=600))
    reference = step_losses(ref_dir)
    assert sorted(reference) == [1, 2, 3, 4, 5]

    # Two processes; process 1 alone is preempted (SIGTERM after its step 1). Both must save the same
    # step, agreed through JAX's preemption service, and exit 0.
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.workers.faulty_train", "--sigterm_at_step=1",
                               "--sigterm_process=1", "--step_sleep_ms=300",
                               *_cmd(multi_dir, "(2,2,2)", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}")[3:]],
                              cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append(out)
    saved = re.search(r"SIGTERM: saved step (\d+)", outs[0])
    assert saved, outs[0][-2000:]
    k = int(saved.group(1))
    assert 2 <= k < 5  # stopped early, after process 1's notice reached process 0
    steps = sorted(int(d) for d in os.listdir(os.path.join(multi_dir, "checkpoints")) if d.isdigit())
    assert steps[-1] == k  # the one step both processes saved
    data_dir = os.path.join(multi_dir, "checkpoints", str(k), "data")
    data_files = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    two = step_losses(multi_dir)
    assert sorted(two) == list(range(1, k + 1))
    for step in two:
        assert abs(two[step][0] - reference[step][0]) <= 1e-5 * abs(reference[step][0]), step

    # One process, 8 devices, a different mesh: restores the two-process checkpoint and continues.
    resumed = _check(subprocess.run(_cmd(multi_dir, "(1,4,2)"), cwd=ROOT, env=_env(8), capture_output=True,
                                    text=True, timeout=600))
    assert "resumed from" in resumed.stdout
    after = step_losses(multi_dir)
    assert sorted(after) == [1, 2, 3, 4, 5]
    for step in range(k + 1, 6):
        assert abs(after[step][0] - reference[step][0]) <= 1e-5 * abs(reference[step][0]), step

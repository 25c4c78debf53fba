"""`python -m lm2_jax.train` end to end, as a user runs it: exact resume after SIGKILL, SIGTERM,
NaN stop, corrupt checkpoints, metrics files. Each run is a real subprocess on a tiny config."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, step_losses

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses

FLAGS = [
    "--config.model.d_model=64", "--config.model.d_ff=128",
    "--config.data.batch_size=8", "--config.data.seq_len=80",
    "--config.train.log_every=1", "--config.train.eval_samples=16", "--config.train.eval_batch_size=16",
    "--config.train.warmup_steps=2",
]


def _cmd(workdir, *extra, module="lm2_jax.train"):
    return [sys.executable, "-m", module, f"--workdir={workdir}", *FLAGS, *extra]


def _run(workdir, *extra, faults=(), check=True):
    """The train CLI; `faults` (e.g. `--kill_at_step=5`) run it through tests/workers/faulty_train.py."""
    cmd = _cmd(workdir, *extra, *faults, module="tests.workers.faulty_train" if faults else "lm2_jax.train")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _steps_on_disk(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                  if os.path.basename(p).isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("a"))
    proc = _run(workdir, "--config.train.steps=8", "--config.train.checkpoint_every=3")
    return workdir, proc


def test_uninterrupted_run_writes_metrics_tensorboard_and_accuracy(uninterrupted):
    workdir, proc = uninterrupted
    steps = step_losses(workdir)
    assert sorted(steps) == list(range(1, 9))
    assert all(loss > 0 for loss, _ in steps.values())
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert events and b"loss" in open(events[0], "rb").read()
    # The last lines: where the test facts sit, the score with the model named, the score split by
    # whether only the memory can carry the facts.
    where, final, split = proc.stdout.strip().splitlines()[-3:]
    assert where.startswith("qa1 test: the supporting facts lie wholly in an earlier segment than the answer for ")
    assert final.startswith("final: LM2, memory in 1 of 2 blocks, 16 slots (delta-rule write, learned slot keys, "
                            "read token by token), segments of 16, "
                            "6-token convolution: "
                            "step 8 ")
    assert "exact-match accuracy" in final and final.endswith("(16 samples)")
    got = re.fullmatch(r"memory: exact match (\d\.\d{3}) on the (\d+) questions whose facts lie wholly in earlier "
                       r"segments(?:, (\d\.\d{3}) on the (\d+) whose facts straddle a segment boundary)?"
                       r"(?:, (\d\.\d{3}) on the (\d+) whose facts lie inside the answer's segment)?", split)
    assert got, split
    parts = [(float(got[i]), int(got[i + 1])) for i in (1, 3, 5) if got[i]]
    assert sum(n for _, n in parts) == 16 and len(parts) == 3  # the first 16 questions hold all three kinds
    # The parts add up to the whole: the split scores the same rows as the overall figure.
    overall = float(re.search(r"exact-match accuracy (\d\.\d{3})", final)[1])
    assert abs(overall - sum(acc * n for acc, n in parts) / 16) < 2e-3
    assert _steps_on_disk(workdir) == [3, 6, 8]


def test_resume_after_sigkill_is_bit_exact(uninterrupted, tmp_path):
    reference = step_losses(uninterrupted[0])
    workdir = str(tmp_path)
    args = ("--config.train.steps=8", "--config.train.checkpoint_every=3")
    killed = _run(workdir, *args, faults=["--kill_at_step=5"], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _steps_on_disk(workdir) == [3]
    assert max(step_losses(workdir)) == 4  # step 4 was trained and lost with the process
    resumed = _run(workdir, *args)  # the very same command
    assert "resumed from" in resumed.stdout and resumed.stdout.count("resumed") == 1
    # Same losses bit for bit (JSON floats round-trip exactly) and the same batches in the same order.
    assert step_losses(workdir) == reference


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(_cmd(workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=1000"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = int(out.split("saved step ")[1].split()[0])
    assert saved >= 2 and _steps_on_disk(workdir) == [saved]
    assert max(step_losses(workdir)) == saved


def test_nan_stops_run_and_keeps_last_finite_checkpoint(tmp_path):
    workdir = str(tmp_path)
    proc = _run(workdir, "--config.train.steps=8", "--config.train.checkpoint_every=2",
                faults=["--nan_at_step=4"], check=False)
    assert proc.returncode == 1
    assert "non-finite loss (nan) at step 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _steps_on_disk(workdir) == [2]
    assert max(step_losses(workdir)) == 3


def _corrupt(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 0))


def test_corrupt_checkpoint_falls_back_then_fails_clearly(uninterrupted, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(uninterrupted[0], workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "8"))
    proc = _run(workdir, "--config.train.steps=8", "--config.train.checkpoint_every=3")
    assert "checkpoints/8 is unreadable" in proc.stderr
    assert "resumed from" in proc.stdout and proc.stdout.split("resumed from ")[1].split()[0].endswith("/6")

    for step in _steps_on_disk(workdir):
        _corrupt(os.path.join(workdir, "checkpoints", str(step)))
    proc = _run(workdir, "--config.train.steps=8", check=False)
    assert proc.returncode == 1
    assert f"no readable checkpoint in {os.path.join(workdir, 'checkpoints')}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gs_workdir_trains_and_resumes_in_place(uninterrupted, gcs, monkeypatch):
    """A gs:// workdir (the pod launcher's --workdir) is written through GCS's API, not a local
    path: stopped at step 5 and started again with the same command, the run resumes from
    gs://.../checkpoints/5 with the uninterrupted run's losses and batches."""
    from etils import epath

    workdir = "gs://lm2-test/runs/a"
    args = (f"--workdir={workdir}", *FLAGS, "--config.train.steps=8", "--config.train.checkpoint_every=3")
    run = lambda *extra: subprocess.run([sys.executable, "-m", "lm2_jax.train", *args, *extra], cwd=ROOT, text=True,
                                        capture_output=True, timeout=600, env=gcs)
    first = run("--config.train.stop_at_step=5")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from gs://lm2-test/runs/a/checkpoints/5" in second.stdout
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing landed in a local "gs:" directory
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "NO_GCE_CHECK"):
        monkeypatch.setenv(key, gcs[key])
    root = epath.Path(workdir)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["5", "6", "8"]
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert step_losses(workdir) == step_losses(uninterrupted[0])

"""The launchers (`launch/tpu_pod.sh`, `launch/gpu_slurm.sh`) against a fake `gcloud` / `sbatch`
on PATH that record every call (`tests/data/launch/fake_*`): the recorded command sequences match
golden files, `--dry_run` prints exactly what a run calls, failures and bad input stop with one
clear message before anything is created or copied, and shellcheck passes.

Regenerate the golden files after an intended change with `LM2_UPDATE_GOLDENS=1 pytest tests/test_launch.py`
and read the diff.
"""

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

DATA = os.path.join(ROOT, "tests", "data", "launch")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "gpu_slurm.sh")
TRAIN = ["--", "--config=configs/lm2_1p7b.py", "--config.train.steps=100"]


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(DATA, "fake_gcloud"), bin_dir / "gcloud")
    shutil.copy(os.path.join(DATA, "fake_sbatch"), bin_dir / "sbatch")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
           "FAKE_DIR": str(tmp_path), "TMPDIR": str(tmp_path), "LM2_TPU_POLL_S": "0"}
    env.pop("LIBTPU_INIT_ARGS", None)

    def run(script, *args, states=(), ssh_fail=None):
        if states:
            (tmp_path / "qr_states").write_text("".join(f"{s}\n" for s in states))
        e = dict(env, **({"FAKE_SSH_FAIL": ssh_fail} if ssh_fail else {}))
        proc = subprocess.run(["bash", script, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
        return proc

    def calls():
        path = tmp_path / "calls.log"
        return _normal(path.read_text(), tmp_path) if path.exists() else ""

    run.calls, run.tmp = calls, tmp_path
    return run


def _commit():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def _normal(text: str, tmp) -> str:
    """Machine-specific parts replaced by placeholders, so golden files hold across checkouts."""
    text = text.replace(str(tmp), "<TMP>").replace(ROOT, "<ROOT>")
    commit = _commit()
    return text.replace(commit, "<COMMIT>") if commit else text


def _golden(name: str, text: str) -> None:
    path = os.path.join(DATA, name)
    if os.environ.get("LM2_UPDATE_GOLDENS"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"{name} differs; if the change is intended: LM2_UPDATE_GOLDENS=1"


def test_run_creates_multislice_waits_recreates_copies_installs_and_starts(fake):
    proc = fake(TPU, "--name", "lm2", "--zone", "us-east5-a", "--type", "v5p-64", "--create", "--spot",
                "--recreate", "--num_slices", "2", "--workdir", "gs://bucket/runs/lm2", *TRAIN,
                states=["WAITING_FOR_RESOURCES", "SUSPENDED", "PROVISIONING"])
    assert proc.returncode == 0, proc.stderr
    assert "queued resource lm2 is SUSPENDED: deleting and recreating it" in proc.stdout
    assert "training started on lm2-0 lm2-1" in proc.stdout
    assert os.path.getsize(fake.tmp / "lm2-jax-lm2.tar.gz") > 10_000  # the checkout, compressed
    _golden("tpu_run_multislice.txt", fake.calls())


def test_dry_run_prints_the_commands_a_run_makes_and_runs_none(fake):
    args = ["--name", "lm2", "--zone", "us-east5-a", "--type", "v5e-16", "--create", "--project", "p1",
            "--workdir", "gs://bucket/runs/lm2", *TRAIN]
    dry = fake(TPU, *args[:-len(TRAIN)], "--dry_run", *TRAIN)
    assert dry.returncode == 0, dry.stderr
    assert fake.calls() == "" and not os.path.exists(fake.tmp / "lm2-jax-lm2.tar.gz")  # nothing ran
    printed = [ln for ln in _normal(dry.stdout, fake.tmp).splitlines() if ln.startswith("gcloud ")]
    live = fake(TPU, *args)
    assert live.returncode == 0, live.stderr
    assert printed == fake.calls().splitlines()
    assert any("--accelerator-type=v5litepod-16" in ln and "--project=p1" in ln for ln in printed)


def test_status_logs_stop_and_delete(fake):
    where = ["--name", "lm2", "--zone", "us-east5-a"]
    for cmd in (["status"], ["logs"], ["logs", "--follow"], ["stop"], ["delete"]):
        proc = fake(TPU, *cmd, *where)
        assert proc.returncode == 0, (cmd, proc.stderr)
    _golden("tpu_admin.txt", fake.calls())


def test_an_unreachable_worker_stops_the_launch_with_a_clear_message(fake):
    proc = fake(TPU, "--name", "lm2", "--zone", "us-east5-a", "--type", "v5p-64", "--workdir", "gs://b/r", *TRAIN,
                ssh_fail="pip install")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tpu_pod.sh: error: gcloud compute tpus tpu-vm ssh lm2 "
                                                           "failed with ssh's exit 255: a worker is unreachable")
    calls = fake.calls().splitlines()
    assert "pip\\ install" in calls[-1] and not any("lm2_jax.train" in c and "nohup" in c for c in calls)


@pytest.mark.parametrize("args,message", [
    (["--name", "x", "--zone", "z", "--type", "v9-8", "--workdir", "gs://b", *TRAIN],
     "--type=v9-8: unknown accelerator"),
    (["--name", "x", "--type", "v5p-8", "--workdir", "gs://b", *TRAIN], "--zone is required"),
    (["--name", "x", "--zone", "z", "--type", "v5p-8", "--workdir", "gs://b", "--", "--config=configs/nope.py"],
     "--config=configs/nope.py: no such config file"),
    (["--name", "x", "--zone", "z", "--type", "v5p-8", "--workdir", "gs://b", "--"], "nothing after '--'"),
    (["--name", "x", "--zone", "z", "--type", "v5p-8", *TRAIN], "--workdir is required"),
    (["--name", "x", "--zone", "z", "--type", "v5p-8", "--spot", "--workdir", "gs://b", *TRAIN],
     "--spot needs --create"),
])
def test_tpu_bad_input_fails_before_anything_is_created_or_copied(fake, args, message):
    proc = fake(TPU, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpu_pod.sh: error: ") and message in lines[0], proc.stderr
    assert fake.calls() == "" and not any(f.endswith(".tar.gz") for f in os.listdir(fake.tmp))


SLURM_ARGS = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time", "12:00:00",
              "--workdir", "/shared/runs/lm2", "--venv", "/shared/venv"]


def test_slurm_job_script_and_submission(fake):
    job_dir = str(fake.tmp / "jobs")
    proc = fake(SLURM, *SLURM_ARGS, "--job_dir", job_dir, *TRAIN)
    assert proc.returncode == 0, proc.stderr
    assert fake.calls() == "sbatch <TMP>/jobs/lm2.sbatch\n"
    script = _normal((fake.tmp / "submitted.sbatch").read_text(), fake.tmp)
    _golden("gpu_slurm_job.txt", script)
    dry = fake(SLURM, *SLURM_ARGS, "--job_dir", job_dir, "--dry_run", *TRAIN)
    assert dry.returncode == 0 and len(fake.calls().splitlines()) == 1  # the dry run submitted nothing
    printed = _normal(dry.stdout, fake.tmp).splitlines()
    assert printed[0] == "# <TMP>/jobs/lm2.sbatch" and printed[-1] == "sbatch <TMP>/jobs/lm2.sbatch"
    assert "\n".join(printed[1:-1]) + "\n" == script


@pytest.mark.parametrize("args,message", [
    (["--gpus_per_node", "8", "--workdir", "/w", *TRAIN], "--nodes is required"),
    (["--nodes", "2", "--gpus_per_node", "8", *TRAIN], "--workdir is required"),
    (["--nodes", "2", "--gpus_per_node", "8", "--workdir", "/w", "--"], "nothing after '--'"),
    (["--nodes", "2", "--gpus_per_node", "8", "--workdir", "/w", "--", "--config=configs/nope.py"],
     "no such config file"),
])
def test_slurm_bad_input(fake, args, message):
    proc = fake(SLURM, *args)
    assert proc.returncode == 2 and message in proc.stderr and fake.calls() == ""


def test_shellcheck_passes():
    lib = os.path.join(ROOT, "launch", "train_args.sh")  # -x: follow the launchers' `source` of it
    proc = subprocess.run(["shellcheck", "-x", TPU, SLURM, lib], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_describes_every_subcommand():
    out = subprocess.run(["bash", TPU, "--help"], capture_output=True, text=True).stdout
    for word in ("run (default)", "status", "logs", "stop", "delete", "--dry_run", "--num_slices", "--spot"):
        assert word in out

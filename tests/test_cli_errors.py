"""Bad input on every CLI: one `error:` line naming the culprit, exit 1, no traceback; a bug still
shows its traceback. Each case is the command a new user would type (a real subprocess).

Error types covered here and elsewhere: ConfigError, UsageError, DataError, MissingFileError (here);
MeshError (test_parallel), CheckpointError and NonFiniteLossError (test_train), ProbeError
(test_experiments_recall), the bench's flags (test_bench_cli).
"""

import os
import subprocess
import sys
import time

import pytest

from lm2_jax import cli, errors
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

QUICK_TRAIN = ["--config.train.steps=1", "--config.train.eval_samples=4"]


def _run(module, *args, cwd=ROOT):
    env = {**os.environ, "LM2_NO_MALLOC_TUNING": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def _one_error_line(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_babi_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("babi")
    (d / "qa1_single-supporting-fact_train.txt").write_text("1 Mary went to the hallway.\nxx not a line\n")
    return d


CASES = {
    # module, args, what the error line must name
    "train: config file missing": ("lm2_jax.train", ["--config=nope.py"], ["--config=nope.py", "no such config file"]),
    "train: override of a missing field": ("lm2_jax.train", ["--config.model.nonsense=1"],
                                           ["--config.model.nonsense=1", "no field model.nonsense"]),
    "train: override, explicit config": ("lm2_jax.train", ["--config=configs/tiny.py", "--config.train.nope=2"],
                                         ["no field train.nope"]),
    "train: override value does not parse": ("lm2_jax.train", ["--config.train.steps=abc"],
                                             ["--config.train.steps=abc"]),
    "train: unknown flag": ("lm2_jax.train", ["--stpes=3"], ["stpes"]),
    "train: impossible value (ConfigError)": ("lm2_jax.train", ["--config.model.n_heads=3"], ["model.n_heads=3"]),
    "train: workdir cannot be created": ("lm2_jax.train", ["--workdir=/proc/lm2/x", *QUICK_TRAIN],
                                         ["/proc/lm2/x", "cannot be created"]),
    "train: tokenizer file missing": ("lm2_jax.train", ["--config.data.tokenizer=/nope/tokenizer.json"],
                                      ["data.tokenizer", "/nope/tokenizer.json", "no such file"]),
    "train: stray argument": ("lm2_jax.train", ["configs/tiny.py"], ["unexpected arguments configs/tiny.py"]),
    "summary: config file missing": ("lm2_jax.model.summary", ["--config=nope.py"], ["--config=nope.py"]),
    "summary: override of a missing field": ("lm2_jax.model.summary", ["--config.model.nonsense=1"],
                                             ["no field model.nonsense"]),
    "sharding table: config file missing": ("lm2_jax.sharding_table", ["--config=nope.py"], ["--config=nope.py"]),
    "recall: override of a missing field": ("lm2_jax.experiments.recall", ["--config.model.memory.nope=1"],
                                            ["no field model.memory.nope"]),
    "babi: directory missing (MissingFileError)": ("lm2_jax.data.babi", ["--count", "/nope/babi"], ["/nope/babi"]),
    "babi_gen: unknown task (DataError)": ("lm2_jax.data.babi_gen", ["--task=qa99", "--stories=1", "--out=x.txt"],
                                           ["'qa99'"]),
    "stats: unknown task": ("lm2_jax.data.stats", ["--tasks=qa77"], ["'qa77'"]),
    "tokenizer: bAbI directory missing": ("lm2_jax.data.tokenizer", ["--train", "--out=/tmp/t.json",
                                                                     "--babi-dir=/nope/babi"], ["/nope/babi"]),
    "tfds builder: unknown BABILong length": ("lm2_jax.data.tfds_babilong", ["--task=qa1", "--length=3k",
                                                                             "--data-dir=/tmp/unused"], ["'3k'"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_prints_one_error_line(name):
    module, args, needles = CASES[name]
    _one_error_line(_run(module, *args), *needles)


def test_malformed_babi_file_names_file_and_line(bad_babi_dir):
    _one_error_line(_run("lm2_jax.data.babi", "--count", str(bad_babi_dir)),
                    "qa1_single-supporting-fact_train.txt:2", "xx not a line")


def test_bad_eval_task_fails_before_training(tmp_path):
    t0 = time.perf_counter()
    proc = _run("lm2_jax.train", f"--workdir={tmp_path}", "--config.train.eval_task=qa99")
    elapsed = time.perf_counter() - t0
    _one_error_line(proc, "train.eval_task='qa99'")
    assert elapsed < 30, elapsed
    assert not (tmp_path / "checkpoints").exists()


def test_an_unexpected_exception_keeps_its_traceback(tmp_path):
    """A bug (here a RuntimeError injected into the loop) is not dressed up as a user error."""
    code = ("import importlib; from lm2_jax import cli; from lm2_jax.train import loop\n"
            "def boom(*a, **k): raise RuntimeError('injected bug')\n"
            "loop.train = boom\n"
            "cli.run(importlib.import_module('lm2_jax.train.__main__').main)\n")
    proc = subprocess.run([sys.executable, "-c", code, f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: injected bug" in proc.stderr
    assert "error: " not in proc.stderr


def test_every_error_type_is_an_lm2_error():
    for cls in (errors.ConfigError, errors.UsageError, errors.DataError, errors.MissingFileError,
                errors.CheckpointError, errors.NonFiniteLossError):
        assert issubclass(cls, errors.Lm2Error)
    from lm2_jax import parallel
    from lm2_jax.data import babi, babilong, qa

    for cls in (parallel.MeshError, babi.BabiFormatError, qa.SampleTooLongError, babilong.FactsTooLongError):
        assert issubclass(cls, errors.Lm2Error)


def test_run_argparse_turns_lm2_errors_into_one_line(capsys):
    def main(argv):
        raise errors.DataError("bad thing in x.txt")

    with pytest.raises(SystemExit) as exit_:
        cli.run_argparse(main, [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: bad thing in x.txt\n"

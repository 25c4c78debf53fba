"""`python -m lm2_jax.experiments.babilong`: its helpers, its flag errors, and the --quick smoke run end
to end (train the three models, evaluate, write the table, JSON and plot; a rerun reuses them)."""

import json
import os
import subprocess
import sys

import pytest

from lm2_jax import config as cfglib
from lm2_jax.errors import UsageError
from lm2_jax.experiments import babilong as exp
from tests.conftest import ROOT


def test_train_lengths_curriculum_and_rows():
    assert exp.parse_train_lengths("0k-2k") == ["0k", "1k", "2k"]
    assert exp.parse_train_lengths("0k,4k") == ["0k", "4k"]
    for bad in ("2k-0k", "0k-3k", ""):
        with pytest.raises(UsageError, match="--train_lengths"):
            exp.parse_train_lengths(bad)
    assert exp.row_len("1k", 128) == 1152 and exp.row_len("2k", 128) == 2048 and exp.row_len("0k", 128) == 384
    spec, steps = exp.curriculum(["0k", "1k"], 1e6, 8, 128)
    assert spec == "0k:384:163,1k:1152:55" and steps == 218  # an equal share of the tokens per stage


@pytest.mark.parametrize("model", exp.MODELS)
def test_the_three_models_share_the_backbone(model):
    c = cfglib.validate(exp.model_config(model))
    base = exp.model_config("lm2").model
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "conv_width"):
        assert c.model[field] == base[field]
    assert (c.model.kind, c.model.memory.layers, c.model.memory.segment_len) == {
        "lm2": ("lm2", 1, 128), "rmt": ("rmt", 0, 128), "vanilla": ("lm2", 0, 0)}[model]


def _run(*args, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "lm2_jax.experiments.babilong", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_models_flag_is_one_error_line():
    p = _run("--models=lm2,gpt")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")] == [
        "error: --models=lm2,gpt: choose from lm2, rmt, vanilla"]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    p = _run("--quick", f"--workdir={work}", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.load(open(out / "babilong_quick.json"))
    assert list(results["runs"]) == ["lm2", "rmt", "vanilla"]
    assert list(results["evaluations"]) == ["lm2", "rmt", "vanilla (full attention)",
                                            "vanilla (segmented, no memory)"]
    for name, ev in results["evaluations"].items():
        lengths = ["0k", "1k"]
        assert ev["lengths"] == lengths and not ev["failures"], name
        for n in lengths:
            cell = ev["table"][n]["qa1"]
            assert cell["samples"] == 4 and 0 <= cell["exact"] <= 1
    steps = {r["steps"] for r in results["runs"].values()}
    assert len(steps) == 1  # the same curriculum and budget for every model
    text = (out / "babilong_quick.md").read_text()
    assert text.count("## ") == 4 and "RMT, 16 memory tokens" in text and "segments of 64 tokens with no memory" in text
    assert (out / "babilong_quick.png").stat().st_size > 10_000
    again = _run("--quick", f"--workdir={work}", f"--out_dir={out}")
    assert again.returncode == 0 and again.stderr.count("trained and evaluated before") == 3, again.stderr[-2000:]

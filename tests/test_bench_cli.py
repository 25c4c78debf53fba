"""The benchmark CLI's argument errors and config loading (no figure is measured here: timing
belongs to `python -m lm2_jax.bench`, never to the test suite)."""

import subprocess
import sys

import pytest

from lm2_jax.bench import cases
from tests.conftest import ROOT


def test_unknown_group_is_named():
    p = subprocess.run([sys.executable, "-m", "lm2_jax.bench", "--only=peak_matmul,warp_speed"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert "warp_speed" in p.stderr and "peak_matmul" in p.stderr


def test_bench_config_variants_and_errors():
    lm2, van = cases.load_config("configs/bench.py:lm2"), cases.load_config("configs/bench.py:vanilla")
    assert (lm2.model.memory.layers, lm2.model.memory.segment_len) == (8, 512)
    assert (van.model.memory.layers, van.model.d_model, van.data.seq_len) == (0, 512, 1024)
    with pytest.raises(ValueError, match="variant"):
        cases.load_config("configs/bench.py:tiny")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        cases.load_config("configs/nope.py")


def test_bad_config_is_named_before_any_child_starts():
    p = subprocess.run([sys.executable, "-m", "lm2_jax.bench", "--config=configs/tiny.py"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert "--config=configs/tiny.py" in p.stderr and "Traceback" not in p.stderr

"""Parameter counts of the shipped configs, computed abstractly with `jax.eval_shape`."""

import subprocess
import sys

import pytest

from lm2_jax.model import summary
from tests.conftest import ROOT, shipped_config


def _model(name):
    return shipped_config(name).model


@pytest.mark.parametrize("name,expected", [("lm2_1p7b", 1.70e9), ("vanilla_1p2b", 1.24e9)])
def test_paper_parameter_counts(name, expected):
    total = sum(n for _, n in summary.module_counts(_model(name)))
    assert abs(total - expected) / expected <= 0.02, total


def test_memory_is_seven_square_matrices_per_block():
    m = _model("lm2_1p7b")
    rows = dict(summary.module_counts(m))
    D = m.d_model
    assert rows["mem_blocks/memory"] == m.n_layers * (7 * D * D + 2 * D)


@pytest.mark.slow
def test_summary_cli_prints_table():
    out = subprocess.run([sys.executable, "-m", "lm2_jax.model.summary", "--config=configs/lm2_1p7b.py"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "mem_blocks/memory" in out and "469,827,584" in out
    assert out.strip().splitlines()[-1].split()[:2] == ["total", "1,705,641,984"]

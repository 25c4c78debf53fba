"""`python -m lm2_jax.aot`: the real train step compiled for TPU slices on this CPU (libtpu's
compile-only devices): the tiny config for a v5e-4 (with the splash attention kernel) and for two
v5e-4 slices, and the paper's 1.7B model with an over-large batch failing with the HBM message."""

import pytest

from tests.conftest import run_module

pytestmark = pytest.mark.slow  # each test compiles a train step for a TPU in a subprocess


def _aot(*args):
    return run_module("lm2_jax.aot", *args, check=False)


# One v5e-4 with segments of 128 (auto attention picks the TPU splash kernel: Mosaic calls in the
# compiled step) and two slices with the default segments of 16 (not a multiple of 128: blocked).
@pytest.mark.parametrize("slices,mesh,devices,seg,seq,kernel", [(1, "(4,1,1)", 4, 128, 256, "splash"),
                                                                (2, "(2,-1,1)", 8, 16, 80, "blocked")])
def test_tiny_config_compiles_for_v5e_slices(slices, mesh, devices, seg, seq, kernel):
    proc = _aot("--config=configs/tiny.py", "--topology=v5e-4", f"--num_slices={slices}", f"--config.mesh.shape={mesh}",
                f"--config.model.memory.segment_len={seg}", f"--seq_len={seq}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, figures, attention = proc.stdout.strip().splitlines()[-3:]
    assert f"{devices} x TPU v5 lite" in head and f"batch 32 x {seq}" in head and f"segments of {seg}" in head
    assert figures.startswith("per device: peak ") and "of 15.75 GiB HBM (fits)" in figures
    peak = float(figures.split("peak ")[1].split(" GiB")[0])
    assert 0 < peak < 1  # a tiny model: well under a GiB per chip
    assert attention.startswith(f"attention: {kernel} (model.attention=auto); ")
    calls = int(attention.split("; ")[1].split()[0])
    assert (calls > 0) == (kernel == "splash"), attention


def test_paper_model_with_an_over_large_batch_fails_with_the_hbm_message():
    proc = _aot("--config=configs/lm2_1p7b.py", "--topology=v5e-4", "--config.mesh.shape=(1,-1,1)", "--batch=32",
                "--seq_len=4096")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: v5e-4 (v5e:2x2): the train step does not fit: it needs ")
    assert "of HBM per device, the chip has 15.75 GiB (batch 32 x 4096" in last


def test_bad_topology_is_named():
    proc = _aot("--config=configs/tiny.py", "--topology=v9-8")
    assert proc.returncode == 1 and "--topology=v9-8: unknown; one of v4-8" in proc.stderr

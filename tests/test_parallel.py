"""Sharding on CPU-emulated meshes: every mesh trains identically, shardings follow the rules table,
the memory bank is split over the batch axes, bad meshes fail clearly, two processes = one."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from lm2_jax import parallel
from tests.conftest import ROOT

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def _worker(task: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.workers.mesh_worker", task], cwd=ROOT, text=True,
                          capture_output=True, timeout=900, env={**os.environ, **EIGHT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_three_steps_identical_on_every_mesh():
    results = _worker("equivalence")
    assert len(results) == 15  # LM2, vanilla and RMT on five meshes, each against one device
    for name, r in results.items():
        assert r["loss_rel"] <= 1e-5, (name, r)
        assert r["param_rel"] <= 1e-5, (name, r)
        assert r["losses"][2] < r["losses"][0], (name, r)  # the steps trained something


@pytest.mark.slow
def test_splash_kernel_in_shard_map_trains_like_the_blocked_kernel():
    r = _worker("splash")  # (2, 2, 2) mesh, Pallas' interpreter, two documents and padding per row
    rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], r["ref_losses"])]
    assert max(rel) <= 1e-5 and r["param_rel"] <= 1e-5, r
    assert r["losses"][2] < r["losses"][0], r


# The rules table applied by hand to configs/tiny.py on (data, fsdp, tensor) = (2, 2, 2).
GOLDEN = {
    "['embed']": P("tensor", "fsdp"),
    "['final_norm']['scale']": P("fsdp"),
    "['{b}']['attn']['q']": P(None, "fsdp", "tensor"),
    "['{b}']['attn']['k']": P(None, "fsdp", "tensor"),
    "['{b}']['attn']['v']": P(None, "fsdp", "tensor"),
    "['{b}']['attn']['o']": P(None, "tensor", None, "fsdp"),
    "['{b}']['attn_norm']['scale']": P(None, "fsdp"),
    "['{b}']['mlp_norm']['scale']": P(None, "fsdp"),
    "['{b}']['mlp']['gate']": P(None, "fsdp", "tensor"),
    "['{b}']['mlp']['up']": P(None, "fsdp", "tensor"),
    "['{b}']['mlp']['down']": P(None, "tensor", "fsdp"),
    "['{b}']['conv']['taps']": P(None, None, "fsdp"),  # (layers, conv_width, D)
    "['mem_blocks']['memory']['q']": P(None, "fsdp", "tensor"),
    "['mem_blocks']['memory']['slot_keys']": P(None, "tensor"),  # (layers, heads, slots, head_dim)
    "['mem_blocks']['memory']['v']": P(None, "fsdp", "tensor"),
    "['mem_blocks']['memory']['o']": P(None, "tensor", None, "fsdp"),
    "['mem_blocks']['memory']['out_gate']": P(None, "fsdp", "tensor"),
    "['mem_blocks']['memory']['cand']": P(None, "fsdp", "tensor"),
    "['mem_blocks']['memory']['bank_norm']['scale']": P(None, "fsdp"),
    # the delta-rule write (configs/tiny.py): a strength vector over D, one bias per block
    "['mem_blocks']['memory']['write_strength']": P(None, "fsdp"),
    "['mem_blocks']['memory']['write_bias']": P(),  # replicated
}


def _golden_params():
    out = {}
    for key, spec in GOLDEN.items():
        for b in ("blocks", "mem_blocks") if "{b}" in key else ("",):
            out[".params" + key.format(b=b)] = spec
    return out


@pytest.mark.slow
def test_golden_sharding_table_on_2x2x2():
    actual = _worker("golden")
    expected = _golden_params()
    params = {k: v for k, v in actual.items() if k.startswith(".params")}
    assert set(params) == set(expected)
    for key, spec in expected.items():
        assert params[key][0] == str(spec), key
        assert params[key][2] == [2, 2, 2]
    # Adam's moments are laid out exactly like their parameters; counters are replicated.
    moments = {k: v for k, v in actual.items() if ".mu" in k or ".nu" in k}
    assert len(moments) == 2 * len(expected)
    for key, (spec, _, _) in moments.items():
        param_key = ".params" + key.split(".mu" if ".mu" in key else ".nu", 1)[1]
        assert spec == str(expected[param_key]), key
    assert actual[".step"][0] == str(P())


@pytest.mark.slow
def test_memory_state_is_sharded_over_batch_axes_in_compiled_step():
    r = _worker("memory")
    batch_spec = str(P(("data", "fsdp")))
    assert r["in"] == r["out"] == r["result"] == batch_spec
    assert r["shape"][0] == 8 and r["shard_shape"][0] == 2  # 8 rows over data x fsdp = 4 -> 2 per device


def test_mesh_that_does_not_fit_fails_clearly():
    with pytest.raises(parallel.MeshError, match=r"mesh\.shape=\(3, 3, 1\): needs 9 devices, but 8 are available"):
        parallel.mesh_shape((3, 3, 1), 8)
    with pytest.raises(parallel.MeshError, match="does not divide"):
        parallel.mesh_shape((3, -1, 1), 8)
    assert parallel.mesh_shape((2, -1, 2), 8) == (2, 2, 2)


@pytest.mark.slow
def test_cli_rejects_mesh_that_does_not_fit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lm2_jax.train", f"--workdir={tmp_path}",
                           "--config.mesh.shape=(3,3,1)"], cwd=ROOT, text=True, capture_output=True,
                          timeout=300, env={**os.environ, **EIGHT})
    assert proc.returncode == 1
    assert "mesh.shape=(3, 3, 1): needs 9 devices, but 8 are available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resolve_drops_axes_that_do_not_divide_or_repeat():
    import types

    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})  # resolve reads only sizes
    rules = parallel.DEFAULT_RULES
    assert parallel.resolve(("vocab", "embed"), (8192, 128), mesh, rules) == P("tensor", "fsdp")
    assert parallel.resolve(("kv_heads",), (3,), mesh, rules) == P()  # 3 heads do not split over 2
    assert parallel.resolve(("batch", "mem_slots", "act_embed"), (8, 16, 128), mesh, rules) == P(("data", "fsdp"))
    assert parallel.resolve(("batch",), (2,), mesh, rules) == P("data")  # 2 rows: only data fits
    assert parallel.resolve(("embed", "embed"), (128, 128), mesh, rules) == P("fsdp")  # an axis once only

"""The benchmark CLI's flag errors, its config (the vanilla model derived from `--config`, and the
arguments its child processes get); no figure is measured here: timing belongs to
`python -m lm2_jax.bench`, never to the test suite."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import bench
from lm2_jax import config as cfglib
from lm2_jax.bench import cases
from tests.conftest import ROOT, shipped_config


def _bench(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "lm2_jax.bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def _one_error_line(p, *needles):
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, p.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not p.stdout  # no figure, no child started


def test_unknown_group_is_one_error_line():
    _one_error_line(_bench("--only=peak_matmul,warp_speed"), "--only", "warp_speed", "peak_matmul")


@pytest.mark.parametrize("args, needles", [
    (["--config=configs/nope.py"], ["--config=configs/nope.py", "no such config file"]),
    (["--config.model.nonsense=1"], ["--config.model.nonsense=1", "no field model.nonsense"]),
    (["--config.model.n_heads=3"], ["model.n_heads=3"]),  # a ConfigError, checked before any child starts
])
def test_bad_config_is_named_before_any_child_starts(args, needles):
    _one_error_line(_bench(*args), *needles)


def test_help_lists_the_flags():
    p = _bench("--help")  # absl's --help exits 1, as for every absl command
    assert "Traceback" not in p.stderr and "error:" not in p.stderr, p.stderr[-2000:]
    for flag in ("--config:", "--[no]quick:", "--out:", "--only:", "--[no]no_malloc_tuning:"):
        assert flag in p.stdout, p.stdout


def _train_step_jaxpr(config) -> str:
    from lm2_jax.train import optimizer as optlib, state as statelib, step as steplib

    tx = optlib.make_optimizer(config.train)
    B, T = config.data.batch_size, config.data.seq_len
    batch = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32), "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    state = jax.eval_shape(lambda: statelib.init_state(config, tx=tx))
    return str(jax.make_jaxpr(functools.partial(steplib.train_step, config))(state, batch))


def test_bench_config_default_is_lm2_and_variant_errors():
    lm2 = cfglib.validate(bench.get_config())
    assert (lm2.model.memory.layers, lm2.model.memory.segment_len) == (8, 512)
    assert (lm2.model.d_model, lm2.data.seq_len, lm2.data.batch_size) == (512, 1024, 8)
    with pytest.raises(ValueError, match="variant"):
        bench.get_config("tiny")


def test_derived_vanilla_is_configs_bench_vanilla():
    """`cases.vanilla_of(get_config())` is `configs/bench.py:vanilla` in every field but the memory
    fields that no memory layer reads, and those change nothing: the train steps trace the same."""
    lm2, derived, given = bench.get_config(), cases.vanilla_of(bench.get_config()), bench.get_config("vanilla")
    cfglib.validate(derived)
    assert lm2.model.memory.layers == 8  # the copy, not the config it came from, lost its memory

    def without_unread(c):
        d = c.to_dict()
        # read only by memory layers / several segments
        for field in ("slots", "heads", "remat_segments", "unroll_segments"):
            d["model"]["memory"].pop(field)
        return d

    assert (derived.model.memory.layers, derived.model.memory.segment_len) == (0, 0)
    assert without_unread(derived) == without_unread(given)
    assert cases._model_summary(derived.model, 8, 1024) == cases._model_summary(given.model, 8, 1024)
    assert _train_step_jaxpr(derived) == _train_step_jaxpr(given)


def test_overrides_reach_both_variants():
    lm2 = bench.get_config()
    lm2.model.d_model, lm2.data.seq_len = 256, 512
    vanilla = cases.vanilla_of(lm2)
    assert (vanilla.model.d_model, vanilla.data.seq_len, vanilla.model.memory.layers) == (256, 512, 0)


def test_children_get_the_same_config_arguments(tmp_path):
    """The parent passes its `--config` arguments (in any spelling absl accepts, flagfiles expanded)
    to each child, and nothing else of its command line."""
    flagfile = tmp_path / "flags"
    flagfile.write_text("--config.model.n_layers=2\n--out=x.jsonl\n")
    argv = ["bench", "--quick", "--config", "configs/bench.py", "--config.model.d_model=256", "--only=compile",
            "--config.data.seq_len", "512", "--noconfig.model.memory.remat_segments", f"--flagfile={flagfile}"]
    code = ("import json, sys; from absl import flags; from lm2_jax.bench import __main__ as b; "
            "flags.FLAGS(sys.argv); print(json.dumps(b._config_args(sys.argv)))")
    p = subprocess.run([sys.executable, "-c", code, *argv[1:]], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1]) == [
        "--config", "configs/bench.py", "--config.model.d_model=256", "--config.data.seq_len", "512",
        "--noconfig.model.memory.remat_segments", "--config.model.n_layers=2"]


def test_train_cli_rate_is_steps_over_the_logged_seconds_after_the_warm_up(tmp_path):
    # Lines every 10 steps; the interval ending at step 20 took 10 / 2 = 5 s, the next two 2 s each;
    # steps up to `after` (the compile) and lines without a rate (evaluations) are not counted.
    lines = [{"step": 10, "steps_per_s": 0.1}, {"step": 20, "steps_per_s": 2.0}, {"step": 20, "exact_match": 0.5},
             {"step": 30, "steps_per_s": 5.0}, {"step": 40, "steps_per_s": 5.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cases._cli_steps_per_s(str(path), after=10) == pytest.approx(30 / 9)
    assert cases._cli_steps_per_s(str(path), after=20) == pytest.approx(20 / 4)


def test_decode_rates_alternate_contexts_and_name_both():
    """`bench_decode` on the tiny model after two contexts: one rate per context from `reps` timed
    runs each (the runs alternate between the contexts), and their ratio from the same records."""
    config = shipped_config("tiny")
    seg = config.model.memory.segment_len
    records, memories = cases.bench_context("lm2", config, [seg, 4 * seg], seg)
    assert {r["name"] for r in records} >= {f"context_scaling/lm2/{seg}", f"context_scaling/lm2/{4 * seg}"}
    out = {r["name"]: r for r in cases.bench_decode(memories, segment=seg, reps=2)}
    short, long_ = out[f"decode/lm2/after_{seg}"], out[f"decode/lm2/after_{4 * seg}"]
    for r in (short, long_):
        assert len(r["times"]) == 2 and r["value"] == pytest.approx(seg / min(r["times"]))
    assert out[f"decode/lm2/ratio_{seg}_over_{4 * seg}"]["value"] == pytest.approx(short["value"] / long_["value"])

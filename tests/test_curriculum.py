"""Curriculum training (`train.curriculum`): stage parsing and errors, which stage a step belongs to
(budgets and early ends, kept across restarts), and a run that crosses a stage boundary resumes
exactly from a checkpoint taken at it."""

from __future__ import annotations

import json
import os

import pytest

from lm2_jax import config as cfglib
from lm2_jax.errors import ConfigError
from lm2_jax.train import curriculum, loop
from tests.conftest import step_losses, tiny_config


def test_parse_and_errors():
    assert curriculum.parse("") == []
    assert curriculum.parse("0k:96:3, 1K:1100:0") == [curriculum.Stage("0k", 96, 3), curriculum.Stage("1k", 1100, 0)]
    for bad, needle in [("0k:96", "stage 1 ('0k:96') must be length:seq_len:steps"),
                        ("0k:96:3,3k:100:0", "stage 2"),
                        ("0k:96:0,1k:1100:0", "only the last stage may have steps 0")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            curriculum.parse(bad)


def _config(**train):
    c = tiny_config(8192, batch_size=2, train=dict(dict(steps=5, log_every=1, eval_samples=4, eval_batch_size=4,
                                                         warmup_steps=1, checkpoint_every=100, async_checkpoint=False),
                                                    **train), layers=1, segment_len=32)
    c.data.update(source="babilong_generated", task="qa1,qa2", seq_len=160, read_threads=1, truncate="left")
    c.train.curriculum = "0k:160:3,1k:1100:0"
    return cfglib.validate(c)


def test_config_errors_name_the_field():
    c = _config()
    c.data.source = "babi_generated"
    with pytest.raises(ConfigError, match="train.curriculum=.*not a babilong source"):
        cfglib.validate(c)
    c = _config()
    c.train.curriculum = "0k:160:3,1k:1100:3"
    with pytest.raises(ConfigError, match="its stages take 6 steps; train.steps=5"):
        cfglib.validate(c)
    c = _config()
    c.train.curriculum_threshold = 0.5
    with pytest.raises(ConfigError, match="train.eval_every=0"):
        cfglib.validate(c)


def test_schedule_budgets_and_early_ends_survive_a_restart(tmp_path):
    stages = curriculum.parse("0k:64:10,1k:1100:10,2k:2100:0")
    s = curriculum.Schedule(stages, 50, str(tmp_path))
    assert [s.end(i) for i in range(3)] == [10, 20, 50]
    assert [s.stage_of(k) for k in (0, 10, 11, 20, 21, 50)] == [0, 0, 1, 1, 2, 2]
    s.end_early(0, 4, lead=True)  # the threshold was reached at step 4
    assert [s.end(i) for i in range(3)] == [4, 14, 50] and s.stage_of(5) == 1
    again = curriculum.Schedule(stages, 50, str(tmp_path))
    assert [again.end(i) for i in range(3)] == [4, 14, 50]
    assert json.load(open(os.path.join(tmp_path, "curriculum.json"))) == {"early_ends": {"0": 4}}


def test_stages_change_the_rows_and_resume_exactly_at_the_boundary(tmp_path):
    seen = {}
    spy = loop.Hook(1, lambda run: seen.setdefault(run.step, run.stage))
    full = str(tmp_path / "full")
    loop.train(_config(), full, hooks=[spy])
    assert seen == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    paused = str(tmp_path / "paused")
    loop.train(_config(stop_at_step=3), paused)  # a checkpoint at the last step of stage 1
    result = loop.train(_config(), paused)
    assert result["step"] == 5
    assert step_losses(paused) == step_losses(full)

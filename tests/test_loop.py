"""The training loop's host side (`lm2_jax.train.loop`): losses are fetched one step late and only
when a log line or a hook needs them, and a non-finite loss between log lines is still caught,
named by its own step, before anything after it is saved."""

from __future__ import annotations

import pytest

from lm2_jax import parallel
from lm2_jax.errors import NonFiniteLossError
from lm2_jax.train import loop
from tests.conftest import step_losses, tiny_config


def _config(**train):
    return tiny_config(8192, batch_size=2, train=dict(dict(steps=9, log_every=4, eval_samples=4, eval_batch_size=4,
                                                           warmup_steps=1, checkpoint_every=100,
                                                           async_checkpoint=False), **train),
                       layers=1, segment_len=16)


@pytest.fixture
def checks(monkeypatch):
    """Every `_Losses.check(upto)` call as (upto, the steps dispatched but not yet fetched then)."""
    calls, check = [], loop._Losses.check

    def spy(self, upto):
        calls.append((upto, sorted(s for s, _ in self.pending)))
        return check(self, upto)

    monkeypatch.setattr(loop._Losses, "check", spy)
    return calls


def test_log_lines_are_fetched_one_step_late(tmp_path, checks):
    loop.train(_config(), str(tmp_path))
    # Log steps 4 and 8 are fetched after steps 5 and 9 were dispatched; the last step (9) at once.
    assert checks == [(4, [1, 2, 3, 4, 5]), (8, [5, 6, 7, 8, 9]), (9, [9])]
    assert sorted(step_losses(str(tmp_path))) == [4, 8, 9]


def test_a_nan_between_log_lines_is_named_by_its_step(tmp_path, monkeypatch, checks):
    global_batch, calls = parallel.global_batch, [0]

    def poisoned(batch, *args):
        calls[0] += 1
        out = global_batch(batch, *args)
        return {**out, "loss_mask": out["loss_mask"] * float("nan")} if calls[0] == 6 else out

    monkeypatch.setattr(parallel, "global_batch", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6; .* is step None"):
        loop.train(_config(checkpoint_every=7), str(tmp_path))
    # Caught at the checkpoint of step 7, which is not saved; the log line of step 4 was written.
    assert checks[-1] == (7, [5, 6, 7]) and sorted(step_losses(str(tmp_path))) == [4]

"""The memory capacity probe: its rows hide the pairs from the queries except through memory."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lm2_jax.experiments import recall_task as rt


@pytest.fixture(scope="module")
def task():
    return rt.RecallTask(segment_len=16, max_gap=2)


def test_row_layout(task):
    ks, gaps = [1, 3, 8, 5], [0, 2, 1, 2]
    b = rt.make_batch(task, np.random.default_rng(0), ks, gaps)
    S, T = task.segment_len, task.seq_len
    assert all(v.shape == (4, T) and v.dtype == np.int32 for v in b.values())
    keys, values, filler = set(task.keys()), set(task.values()), set(task.filler())
    for row, (k, gap) in enumerate(zip(ks, gaps)):
        tok, mask, doc = b["tokens"][row], b["loss_mask"][row], b["doc_ids"][row]
        q0, used = S * (gap + 1), S * (gap + 2)
        pairs = dict(zip(tok[0:2 * k:2], tok[1:2 * k:2]))
        assert len(pairs) == k and set(pairs) <= keys and set(pairs.values()) <= values
        assert set(tok[2 * k:q0]) <= filler  # the rest of segment 0 and the gap: filler only
        queries = dict(zip(tok[q0:q0 + 2 * k:2], tok[q0 + 1:q0 + 2 * k:2]))
        assert queries == pairs  # every key asked once, answered with its own value
        assert set(tok[q0 + 2 * k:used]) <= filler and not tok[used:].any() and not doc[used:].any()
        # loss at each query key (its target is the next token, the value), nowhere else
        np.testing.assert_array_equal(np.flatnonzero(mask), q0 + 2 * np.arange(k))
        # each query pair is its own document: no query sees another's answer
        np.testing.assert_array_equal(doc[q0:q0 + 2 * k], 2 + np.repeat(np.arange(k), 2))
        assert (doc[:q0] == 1).all()


def test_eval_rows_are_fixed_and_differ_from_training(task):
    a = rt.eval_batch(task, 4, 1, 8, seed=0)
    np.testing.assert_array_equal(a["tokens"], rt.eval_batch(task, 4, 1, 8, seed=0)["tokens"])
    train = next(rt.train_batches(task, 8, seed=0, gaps=[1]))
    assert not np.array_equal(a["tokens"], train["tokens"])


@pytest.mark.parametrize("k,gap", [(0, 0), (9, 0), (2, 3), (2, -1)])
def test_bad_settings_are_named(task, k, gap):
    with pytest.raises(ValueError, match="k=" if k in (0, 9) else "gap="):
        task.check(k, gap)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--ks=1,x"], "--ks='1,x': expected comma-separated integers"),
    (["--ks=9", "--config.model.memory.segment_len=16"], "--ks: k=9 pairs do not fit a segment of 16 tokens"),
    (["--gaps=-1"], "--gaps: -1 is below 0"),
    (["--config.model.memory.layers=0"], "model.memory.layers=0"),
    (["--config.model.memory.segment_len=0"], "needs segments"),
    (["--steps=0"], "--steps=0: must be >= 1"),
])
def test_cli_bad_flags_print_one_error_line(args, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "lm2_jax.experiments.recall", f"--out={tmp_path}", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

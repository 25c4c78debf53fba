"""`python -m lm2_jax.eval`: BABILong table by generation, its scoring, files, memory maps, errors."""

import csv
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import generate as gen
from lm2_jax.data import babi, babilong, qa, tokenizer as toklib
from lm2_jax.errors import UsageError
from lm2_jax.eval import babilong as bl
from lm2_jax.model import decoder
from lm2_jax.train import step as steplib
from tests.conftest import run_module, tiny_model


def test_task_and_length_specs():
    assert bl.parse_tasks("qa1-qa3,qa7") == ["qa1", "qa2", "qa3", "qa7"]
    assert bl.parse_tasks("QA2") == ["qa2"]
    assert bl.parse_lengths("0k, 1K,2k") == ["0k", "1k", "2k"]
    with pytest.raises(UsageError, match=r"--tasks=qa1,qa99: .*qa99"):
        bl.parse_tasks("qa1,qa99")
    with pytest.raises(UsageError, match=r"--tasks=qa11: qa11 is not one of qa1..qa10"):
        bl.parse_tasks("qa11")
    with pytest.raises(UsageError, match=r"--lengths=0k,3q: '3q' is not a BABILong length"):
        bl.parse_lengths("0k,3q")


def test_table_from_hand_made_predictions(monkeypatch):
    """Scores are what the answers deserve: an exact answer, the same answer in capitals with a
    period (exact after normalisation), and 'none' everywhere in qa7, which a substring matcher
    would count right for every answer 'one' (word boundaries: it is not)."""
    tok = toklib.default_tokenizer()
    golds = {t: [s.answer for s in babi.load_task(t, "test")[:6]] for t in ("qa1", "qa7")}
    assert "one" in golds["qa7"]  # the case the published matcher gets wrong is in the sample

    calls = []

    def fake_answer(model_cfg, params, tokenizer, prompts, max_new_tokens):  # one call per task: qa1, qa7
        task = ("qa1", "qa7")[len(calls) % 2]
        calls.append(task)
        if task == "qa7":
            return ["none"] * len(prompts)
        return [[g, g.upper() + ".", "garden"][i % 3] for i, g in enumerate(golds["qa1"][:len(prompts)])]

    monkeypatch.setattr(bl, "answer", fake_answer)
    for length in ("0k", "1k"):
        table, preds, failures = bl.evaluate(None, None, tok, ["qa1", "qa7"], [length], 6, progress=False)
        assert failures == []
        want_qa1 = np.mean([1, 1, golds["qa1"][2] == "garden", 1, 1, golds["qa1"][5] == "garden"])
        assert table[length]["qa1"]["exact"] == pytest.approx(want_qa1)
        assert table[length]["qa1"]["label"] == pytest.approx(want_qa1)
        want_qa7 = np.mean([g == "none" for g in golds["qa7"]])
        assert table[length]["qa7"]["exact"] == pytest.approx(want_qa7)
        assert table[length]["qa7"]["label"] == pytest.approx(want_qa7)
        assert [p.sample_id for p in preds[:2]] == ["qa1 test sample 0", "qa1 test sample 1"]
    text = bl.format_table({"0k": {"qa1": {"exact": 0.5}}}, ["qa1", "qa7"], ["0k", "1k"])
    assert text.splitlines()[2].split() == ["0k", "|", "50.0", "–", "|", "50.0"]
    assert text.splitlines()[3].split() == ["1k", "|", "–", "–", "|", "–"]


def test_teacher_forced_exact_match_agrees_with_greedy_generation():
    """Train-time evaluation (one teacher-forced pass: every answer token and <eos> the argmax)
    counts a row right exactly when greedy generation produces that answer. Rows whose 'answer' is
    the model's own greedy continuation must count right, rows with one token changed must not."""
    tok = toklib.default_tokenizer()
    m = tiny_model(tok.vocab_size, 2, layers=1, segment_len=16)
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(0)))
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)  # far from the near-uniform init
    samples = list(babilong.split_samples("qa1", "test", "0k", tok, limit=6))
    prompts = [bl.prompt_of(s, tok) for s in samples]
    n = 3
    greedy = gen.generate(m, params, prompts, n).tokens
    T = max(len(p) for p in prompts) + n
    batch = {k: np.zeros((len(prompts), T), np.int32) for k in ("tokens", "loss_mask", "doc_ids", "positions")}
    wanted = []
    for r, (p, g) in enumerate(zip(prompts, greedy)):
        answer = g.copy()
        if r % 2:  # odd rows: the last answer token is not what the model would say
            answer[-1] = (answer[-1] + 1) % tok.vocab_size
        row = np.concatenate([p, answer])
        batch["tokens"][r, :len(row)], batch["doc_ids"][r, :len(row)] = row, 1
        batch["positions"][r, :len(row)] = np.arange(len(row))
        batch["loss_mask"][r, len(p) - 1:len(row) - 1] = 1
        wanted.append(r % 2 == 0)
    sums = steplib.loss_sums(m, params, {k: jnp.asarray(v) for k, v in batch.items()})
    teacher_forced = list(np.asarray(sums.correct_B == sums.targets_B))
    generated = [bool((g == batch["tokens"][r, len(p):len(p) + n]).all())
                 for r, (p, g) in enumerate(zip(prompts, greedy))]
    assert teacher_forced == generated == wanted


_cli = run_module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LM2 trained for a few steps by the train CLI; its final qa1 exact match."""
    workdir = str(tmp_path_factory.mktemp("run"))
    proc = _cli("lm2_jax.train", f"--workdir={workdir}", "--config.model.d_model=64", "--config.model.d_ff=128",
                "--config.data.batch_size=8", "--config.train.steps=6", "--config.train.warmup_steps=2",
                "--config.train.eval_samples=8", "--config.train.eval_batch_size=8",
                "--config.train.checkpoint_every=6")
    final = re.search(r"exact-match accuracy ([0-9.]+) \((\d+) samples\)", proc.stdout)
    return workdir, float(final.group(1)), int(final.group(2))


@pytest.mark.slow
def test_eval_cli_table_files_and_training_figure(trained, tmp_path):
    workdir, train_exact, n = trained
    out = str(tmp_path / "eval")
    proc = _cli("lm2_jax.eval", f"--workdir={workdir}", "--tasks=qa1,qa7", "--lengths=0k,1k", f"--samples={n}",
                f"--out={out}")
    lines = proc.stdout.splitlines()
    head = lines.index(next(x for x in lines if x.strip().startswith("length")))
    assert lines[head].split() == ["length", "|", "qa1", "qa7", "|", "Avg"]
    row0k = lines[head + 2].split()
    assert row0k[0] == "0k" and lines[head + 3].split()[0] == "1k"
    assert float(row0k[2]) == pytest.approx(100 * train_exact, abs=0.05)  # generation = teacher forcing
    with open(os.path.join(out, "eval.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["length"], r["task"]) for r in rows] == [("0k", "qa1"), ("0k", "qa7"), ("1k", "qa1"), ("1k", "qa7")]
    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    assert len(report["predictions"]) == 4 * n
    p = report["predictions"][0]
    assert p["sample_id"] == "qa1 test sample 0" and p["exact"] == qa.exact_match(p["prediction"], p["answer"])
    with open(os.path.join(out, "eval.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_memory_maps(trained, tmp_path):
    workdir, _, _ = trained
    proc = _cli("lm2_jax.eval", "memory", f"--workdir={workdir}", "--task=qa1", "--length=1k", "--sample=0",
                f"--out={tmp_path}")
    assert "qa1 test sample 0" in proc.stdout
    pngs = sorted(os.listdir(tmp_path))
    assert pngs == ["qa1_1k_sample0_read.png", "qa1_1k_sample0_trajectories.png"]


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--tasks=qa99"], "--tasks=qa99"),
    (["--lengths=0k,3q"], "'3q' is not a BABILong length"),
    (["--step=12345"], "--step=12345"),
])
def test_eval_bad_input_is_one_line(trained, args, needle):
    workdir, _, _ = trained
    proc = _cli("lm2_jax.eval", f"--workdir={workdir}", *args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and needle in proc.stderr


@pytest.mark.slow
def test_eval_and_generate_need_a_checkpoint(tmp_path):
    from lm2_jax import config as cfglib

    (tmp_path / "config.json").write_text(cfglib.defaults().to_json())  # a workdir that never saved
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = [(tmp_path / "nothing", "no config.json there"), (tmp_path, "no checkpoint in"),
             (tmp_path / "broken", "is not a config this version can read")]
    for workdir, needle in cases:
        for module, extra in (("lm2_jax.eval", []), ("lm2_jax.generate", ["--prompt=Where is Mary?"])):
            proc = _cli(module, f"--workdir={workdir}", *extra, check=False)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert needle in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_generate_cli_answers(trained):
    workdir, _, _ = trained
    proc = _cli("lm2_jax.generate", f"--workdir={workdir}", "--prompt=Mary went to the kitchen. Where is Mary?",
                "--max_new_tokens=4")
    assert re.search(r"step 6: \d+ prompt tokens, [1-4] generated, (ended at <eos>|stopped at --max_new_tokens)",
                     proc.stderr), proc.stderr


@pytest.mark.slow
def test_eval_text_and_mmlu_from_the_cli(trained, tmp_path):
    workdir, _, _ = trained
    text = tmp_path / "held_out.txt"
    text.write_text("Mary went to the kitchen. John moved to the garden. Where is Mary? kitchen\n" * 3)
    proc = _cli("lm2_jax.eval", f"--workdir={workdir}", f"--text={text}", "--seq_len=32")
    assert re.search(r"held_out.txt: perplexity [0-9.]+ over \d+ tokens", proc.stdout), proc.stdout
    for split, rows in (("dev", "q,a,b,c,d,A\n"), ("test", "q,a,b,c,d,B\nq2,a,b,c,d\n")):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"logic_{split}.csv").write_text(rows)
    proc = _cli("lm2_jax.eval", f"--workdir={workdir}", f"--mmlu_dir={tmp_path / 'mmlu'}", "--mmlu_k=1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "logic_test.csv: row 2 has 5 columns, expected 6" in proc.stderr.strip().splitlines()[-1]


def test_qa1_error_kinds_from_hand_made_stories():
    from lm2_jax.eval import qa1_errors

    s = babi.Sample("qa1", ("Mary moved to the bathroom.", "John went to the hallway.", "Mary went to the office."),
                    "Where is Mary?", "office", (2,))
    kinds = [qa1_errors.kind_of(s, p) for p in ("office", "bathroom", "hallway", "garden")]
    assert kinds == ["right", "earlier room of the person", "room of another person", "other"]


@pytest.mark.slow
def test_eval_errors_cli_counts_every_question(trained):
    workdir, train_exact, n = trained
    proc = _cli("lm2_jax.eval", "errors", f"--workdir={workdir}", f"--samples={n}")
    groups = re.findall(r"^(\w+) \((\d+) questions\): right (\d+)", proc.stdout, re.M)
    assert groups and sum(int(q) for _, q, _ in groups) == n, proc.stdout
    # qa1's answers are one token: every exact match of the training figure has the right first token
    assert sum(int(r) for _, _, r in groups) >= round(train_exact * n)

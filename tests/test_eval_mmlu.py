"""The MMLU-format harness and perplexity, on a fixture written in the public layout."""

import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.data import tokenizer as toklib
from lm2_jax.errors import DataError, MissingFileError
from lm2_jax.eval import mmlu
from lm2_jax.model import decoder
from tests.conftest import tiny_model

ROWS = {
    "high_school_geography": {
        "dev": [["Which is a river?", "Nile", "Alps", "Sahara", "Pacific", "A"],
                ['Which city is "the Big Apple", famously?', "Paris", "New York", "Rome", "Oslo", "B"]],
        "test": [["Where is Mary, after she went to the kitchen?", "garden", "kitchen", "hallway", "office", "B"],
                 ["Pick D", "w", "x", "y", "z", "D"], ["Pick A, please", "a", "b", "c", "d", "A"]]},
    "logic": {
        "dev": [["2 + 2?", "3", "4", "5", "6", "B"], ["Not true?", "false", "true", "maybe", "none", "A"]],
        "test": [["Yes or no?", "yes", "no", "both", "neither", "C"], ["One, two, or three?", "1", "2", "3", "0", "A"],
                 ["Last one", "p", "q", "r", "s", "D"]]},
}


@pytest.fixture()
def mmlu_dir(tmp_path):
    for subject, splits in ROWS.items():
        for split, rows in splits.items():
            (tmp_path / split).mkdir(exist_ok=True)
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return str(tmp_path)


@pytest.fixture(scope="module")
def model():
    tok = toklib.default_tokenizer()
    m = tiny_model(tok.vocab_size, 2, layers=1, segment_len=16)
    params = nn.meta.unbox(decoder.init_params(m, jax.random.key(0)))
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)  # far from the near-uniform init
    return tok, m, params


def test_layout_and_prompt(mmlu_dir):
    assert mmlu.subjects(mmlu_dir) == ["high_school_geography", "logic"]
    dev = mmlu.load_subject(mmlu_dir, "high_school_geography", "dev")
    test = mmlu.load_subject(mmlu_dir, "high_school_geography", "test")
    assert dev[1].question == 'Which city is "the Big Apple", famously?' and dev[1].answer == "B"
    assert mmlu.format_prompt("high_school_geography", dev[:1], test[0]) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Which is a river?\nA. Nile\nB. Alps\nC. Sahara\nD. Pacific\nAnswer: A\n\n"
        "Where is Mary, after she went to the kitchen?\nA. garden\nB. kitchen\nC. hallway\nD. office\nAnswer:")


def test_bad_files_are_named(mmlu_dir, tmp_path):
    with pytest.raises(MissingFileError, match=r"nope_test\.csv: no such MMLU file"):
        mmlu.load_subject(mmlu_dir, "nope", "test")
    path = tmp_path / "test" / "logic_test.csv"
    path.write_text("q,a,b,c,d,A\nq,a,b,c,E\n")
    with pytest.raises(DataError, match=r"logic_test\.csv: row 2 has 5 columns, expected 6: question, A, B, C, D"):
        mmlu.load_subject(mmlu_dir, "logic", "test")
    path.write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"row 1 has answer 'E'"):
        mmlu.load_subject(mmlu_dir, "logic", "test")


def test_choice_logprobs_match_an_unpadded_forward(model):
    tok, m, params = model
    prompts = ["Which is a river?\nA. Nile\nB. Alps\nC. Sahara\nD. Pacific\nAnswer:", "Short one.\nAnswer:"]
    got = mmlu.choice_logprobs(m, params, tok, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        for j, letter in enumerate("ABCD"):
            ids = [tok.bos_id] + tok.encode(p)
            choice = tok.encode(" " + letter)
            full = np.array(ids + choice, np.int32)
            logits, _ = decoder.forward(m, params, jnp.asarray(full[None]))
            logp = np.asarray(jax.nn.log_softmax(logits[0]))
            want = sum(logp[len(ids) - 1 + n, c] for n, c in enumerate(choice))
            assert got[i, j] == pytest.approx(want, abs=1e-4)
    assert np.ptp(got) > 1e-3  # the letters really differ


def test_accuracy_is_the_argmax_letter(mmlu_dir, model, monkeypatch):
    tok, m, params = model
    real = mmlu.evaluate(m, params, tok, mmlu_dir, k=2, progress=False)
    assert set(real["subjects"]) == {"high_school_geography", "logic"} and real["questions"] == 6
    assert all(0.0 <= a <= 1.0 for a in real["subjects"].values())
    picks = iter([[1, 3, 1], [2, 0, 0]])  # geography: right, right, wrong; logic: right, right, wrong

    def fake(cfg, params, tokenizer, prompts, batch_size=8):
        return np.eye(4)[next(picks)][:len(prompts)]

    monkeypatch.setattr(mmlu, "choice_logprobs", fake)
    got = mmlu.evaluate(m, params, tok, mmlu_dir, k=2, progress=False)
    assert got["subjects"] == {"high_school_geography": pytest.approx(2 / 3), "logic": pytest.approx(2 / 3)}
    with pytest.raises(DataError, match=r"2 rows, fewer than the 3 shots"):
        mmlu.evaluate(m, params, tok, mmlu_dir, k=3, progress=False)


def test_perplexity_matches_numpy(model):
    tok, m, params = model
    text = "Mary went to the kitchen. John moved to the garden. Where is Mary? kitchen"
    seq_len = 8
    got = mmlu.perplexity(m, params, tok, text, seq_len)
    ids = tok.encode(text)
    nll = 0.0
    for i in range(0, len(ids), seq_len - 1):
        row = np.array([tok.bos_id] + ids[i:i + seq_len - 1], np.int32)
        logits, _ = decoder.forward(m, params, jnp.asarray(row[None]))
        logp = np.asarray(jax.nn.log_softmax(logits[0]))
        nll -= sum(logp[t, row[t + 1]] for t in range(len(row) - 1))
    assert got["tokens"] == len(ids)
    assert got["perplexity"] == pytest.approx(np.exp(nll / len(ids)), rel=1e-4)
    with pytest.raises(DataError, match="empty"):
        mmlu.perplexity(m, params, tok, "", seq_len)

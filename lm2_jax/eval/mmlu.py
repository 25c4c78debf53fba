"""Multiple choice in the public MMLU layout, and perplexity of held-out text. Nothing is downloaded.

MMLU layout: `<dir>/dev/<subject>_dev.csv` (the k shots) and `<dir>/test/<subject>_test.csv`, no
header, six columns per row: question, A, B, C, D, answer letter. A question is scored by the
log-likelihood of each choice letter after the k-shot prompt (the standard harness), the
prediction being the most likely letter.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from lm2_jax.errors import DataError, MissingFileError
from lm2_jax.model import decoder

LETTERS = ("A", "B", "C", "D")
COLUMNS = "question, A, B, C, D, answer"


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str


def subject_file(mmlu_dir: str, subject: str, split: str) -> str:
    return os.path.join(mmlu_dir, split, f"{subject}_{split}.csv")


def load_subject(mmlu_dir: str, subject: str, split: str) -> list[Question]:
    path = subject_file(mmlu_dir, subject, split)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such MMLU file (expected {split}/<subject>_{split}.csv under {mmlu_dir})")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise DataError(f"{path}: row {i} has {len(row)} columns, expected 6: {COLUMNS}")
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                raise DataError(f"{path}: row {i} has answer {row[5]!r}, expected one of A, B, C, D")
            out.append(Question(row[0], tuple(row[1:5]), answer))
    return out


def subjects(mmlu_dir: str) -> list[str]:
    test_dir = os.path.join(mmlu_dir, "test")
    if not os.path.isdir(test_dir):
        raise MissingFileError(f"{test_dir}: no such directory (an MMLU directory holds dev/ and test/)")
    return sorted(f[:-len("_test.csv")] for f in os.listdir(test_dir) if f.endswith("_test.csv"))


def _block(q: Question, with_answer: bool) -> str:
    lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")


def format_prompt(subject: str, shots: list[Question], question: Question) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(_block(s, True) for s in shots) + _block(question, False)


@functools.lru_cache(maxsize=8)
def _scorer(cfg_json: str):
    """jit: per-row sum of log p(token) over the positions in `score_BT` (inputs at t predict t+1)."""
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))

    def score(params, tokens_BT, doc_BT, score_BT):
        logits_BTV, _ = decoder.forward(cfg, params, tokens_BT, doc_ids_BT=doc_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
        target_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(target_BT * score_BT[:, :-1], axis=1), jnp.sum(score_BT[:, :-1], axis=1)

    return jax.jit(score)


def _score_rows(cfg, params, rows: list[tuple[list[int], int]], batch_size: int) -> np.ndarray:
    """rows: (tokens, number of trailing tokens to score). Returns the summed log-probs."""
    score = _scorer(cfg.to_json())
    params = nn.meta.unbox(params)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = -(-max(len(t) for t, _ in chunk) // 64) * 64  # padded to 64s: few compiled shapes
        tokens = np.zeros((batch_size, T), np.int32)
        doc, mask = np.zeros_like(tokens), np.zeros((batch_size, T), np.float32)
        for r, (t, k) in enumerate(chunk):
            tokens[r, :len(t)], doc[r, :len(t)] = t, 1
            mask[r, len(t) - 1 - k:len(t) - 1] = 1  # inputs whose targets are the scored tokens
        out.append(np.asarray(score(params, tokens, doc, mask)[0])[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0)


def choice_logprobs(cfg, params, tokenizer, prompts: list[str], batch_size: int = 8) -> np.ndarray:
    """(len(prompts), 4): log-likelihood of " A" .. " D" after each prompt (bos first)."""
    letters = [tokenizer.encode(" " + letter) for letter in LETTERS]
    rows = []
    for p in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(p)
        rows += [(ids + letter, len(letter)) for letter in letters]
    return _score_rows(cfg, params, rows, 4 * batch_size).reshape(len(prompts), 4)


def evaluate(cfg, params, tokenizer, mmlu_dir: str, k: int = 5, subject_names=None, limit: int = 0,
             progress: bool = True) -> dict:
    """{"subjects": {name: accuracy}, "average": macro average, "questions": count}."""
    names = list(subject_names or subjects(mmlu_dir))
    if not names:
        raise DataError(f"{mmlu_dir}/test: no <subject>_test.csv file")
    work = []  # every file read and checked before any scoring
    for name in names:
        shots = load_subject(mmlu_dir, name, "dev")
        if k > len(shots):
            raise DataError(f"{subject_file(mmlu_dir, name, 'dev')}: {len(shots)} rows, fewer than the {k} shots asked")
        work.append((name, shots[:k], load_subject(mmlu_dir, name, "test")[:limit or None]))
    accs, total = {}, sum(len(q) for _, _, q in work)
    bar = tqdm(total=total, desc="mmlu", unit="question", disable=not progress)
    for name, shots, questions in work:
        lp = choice_logprobs(cfg, params, tokenizer, [format_prompt(name, shots, q) for q in questions])
        right = [LETTERS[int(i)] == q.answer for i, q in zip(np.argmax(lp, axis=1), questions)]
        accs[name] = float(np.mean(right)) if right else float("nan")
        bar.update(len(questions))
    bar.close()
    return {"subjects": accs, "average": float(np.nanmean(list(accs.values()))), "questions": total}


def perplexity(cfg, params, tokenizer, text: str, seq_len: int, batch_size: int = 4) -> dict:
    """exp(mean NLL) of `text`, cut into rows of `seq_len` tokens, each starting with bos and a
    fresh memory (as in training); every token but the bos is predicted once."""
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError("the text is empty: nothing to score")
    body = seq_len - 1
    rows = [([tokenizer.bos_id] + ids[i:i + body], len(ids[i:i + body])) for i in range(0, len(ids), body)]
    nll = -float(np.sum(_score_rows(cfg, params, rows, batch_size)))
    return {"perplexity": math.exp(nll / len(ids)), "nll": nll, "tokens": len(ids)}

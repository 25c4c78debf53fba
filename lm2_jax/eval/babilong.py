"""BABILong evaluation by generation: tasks x lengths, exact match and label-set match.

Test samples come from the real bAbI test files mixed with the held-out books (`data.babilong`,
split "test": never a training book). Each prompt is answered by real greedy generation
(`lm2_jax.generate`), not teacher forcing, and scored twice: exact match of the normalised answer,
and BABILong's label-set match with word boundaries (`data.qa.label_set_match`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from tqdm import tqdm

from lm2_jax import generate as genlib
from lm2_jax.data import babi, babilong, qa
from lm2_jax.errors import DataError, Lm2Error, UsageError

log = logging.getLogger(__name__)

ALL_TASKS = tuple(f"qa{i}" for i in range(1, 11))
DEFAULT_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")


def parse_tasks(spec: str) -> list[str]:
    """'qa1-qa10', 'qa1,qa3' or 'qa2' -> canonical task names, in order."""
    try:
        tasks = babi.expand_tasks(spec)
    except DataError as err:
        raise UsageError(f"--tasks={spec}: {err}") from None
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise UsageError(f"--tasks={spec}: {unknown[0]} is not one of qa1..qa10")
    return tasks


def parse_lengths(spec: str) -> list[str]:
    """'0k,1k,2k' -> the same names, each checked (`data.babilong.LENGTHS`)."""
    try:
        return babilong.expand_lengths(spec)
    except DataError as err:
        raise UsageError(f"--lengths={spec}: {err}") from None


@dataclasses.dataclass
class Prediction:
    sample_id: str
    task: str
    length: str
    prompt_tokens: int
    question: str
    answer: str
    prediction: str
    exact: bool
    label: bool


def prompt_of(sample: babilong.BabilongSample, tokenizer) -> np.ndarray:
    return qa.prompt_tokens(qa.QAExample(sample.name, sample.context_ids, sample.question_ids,
                                         sample.answer_ids), tokenizer)


def answer(model_cfg, params, tokenizer, prompts: list[np.ndarray], max_new_tokens: int) -> list[str]:
    """Greedy answers (text before <eos>) to `prompts`, one generation call."""
    result = genlib.generate(model_cfg, params, prompts, max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode([t for t in row.tolist() if t != tokenizer.eos_id]).strip() for row in result.tokens]


def batch_rows(prompt_len: int, batch_tokens: int) -> int:
    """Rows per generation batch: about `batch_tokens` prompt tokens in flight."""
    return max(1, batch_tokens // max(prompt_len, 1))


def evaluate(model_cfg, params, tokenizer, tasks, lengths, samples: int, *, batch_tokens: int = 32768,
             max_new_tokens: int = 16, seed: int = 0, progress: bool = True):
    """Returns (table, predictions, failures): `table[length][task]` = {"exact", "label", "samples"};
    a (task, length) that cannot run (facts longer than the length, a model out of memory) is left
    out of the table with its reason in `failures` and the rest continue."""
    table: dict[str, dict[str, dict]] = {}
    predictions: list[Prediction] = []
    failures: list[str] = []
    for length in lengths:
        for task in tasks:
            try:
                rows = list(babilong.split_samples(task, "test", length, tokenizer, seed=seed, limit=samples))
                if not rows:
                    raise DataError(f"{task} at {length}: no sample fits that length")
                prompts = [prompt_of(s, tokenizer) for s in rows]
                per_batch = batch_rows(max(len(p) for p in prompts), batch_tokens)
                got = []
                bar = tqdm(total=len(rows), desc=f"{task} {length}", unit="sample", disable=not progress,
                           leave=False)
                for start in range(0, len(rows), per_batch):
                    got += answer(model_cfg, params, tokenizer, prompts[start:start + per_batch], max_new_tokens)
                    bar.update(min(per_batch, len(rows) - start))
                bar.close()
            except (Lm2Error, MemoryError) as err:
                failures.append(f"{task} {length}: {err}")
                log.warning("%s %s skipped: %s", task, length, err)
                continue
            except Exception as err:  # XLA reports an allocation failure as a runtime error
                if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                    raise
                failures.append(f"{task} {length}: out of memory ({str(err).splitlines()[0][:160]})")
                log.warning("%s %s skipped: out of memory", task, length)
                continue
            preds = [Prediction(s.name, task, length, len(p), s.question, s.answer, text,
                                qa.exact_match(text, s.answer), qa.label_set_match(text, s.answer, task, s.question))
                     for s, p, text in zip(rows, prompts, got)]
            predictions += preds
            table.setdefault(length, {})[task] = {
                "exact": float(np.mean([p.exact for p in preds])),
                "label": float(np.mean([p.label for p in preds])),
                "samples": len(preds)}
    return table, predictions, failures


def format_table(table, tasks, lengths, metric: str = "exact") -> str:
    """The paper's Table 1 layout: lengths as rows, tasks as columns, then the row average (%)."""
    head = f"{'length':>6} | " + " ".join(f"{t:>5}" for t in tasks) + " |   Avg"
    lines = [head, "-" * len(head)]
    for length in lengths:
        cells = [table.get(length, {}).get(t, {}).get(metric) for t in tasks]
        have = [c for c in cells if c is not None]
        avg = f"{100 * np.mean(have):5.1f}" if have else "    –"
        lines.append(f"{length:>6} | " + " ".join("    –" if c is None else f"{100 * c:5.1f}" for c in cells)
                     + f" | {avg}")
    return "\n".join(lines)

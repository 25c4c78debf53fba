"""Exact-match evaluation on real bAbI test files.

Greedy decoding produces the gold answer exactly iff, under teacher forcing, every answer token
and the final [eos] is the argmax of its logits (by induction over the generated prefix). So one
teacher-forced forward pass per batch gives the exact-match accuracy of greedy generation.
"""

from __future__ import annotations

import numpy as np

from lm2_jax.data import babi, qa


def qa_batches(task: str, tokenizer, seq_len: int, batch_size: int, limit: int = 0, truncate: str = "error",
               select=None):
    """Padded numpy batches (tokens, loss_mask, doc_ids, positions) of a task's real test samples
    (the first `limit`; of those, only the indices in `select` when given)."""
    samples = babi.load_task(task, "test")
    if limit:
        samples = samples[:limit]
    keep = range(len(samples)) if select is None else select
    rows = [qa.fit_qa(qa.encode_sample(samples[i], tokenizer, f"{task}/test[{i}]"), tokenizer, seq_len, truncate)
            for i in keep]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("tokens", "loss_mask", "doc_ids", "positions")}
        batch["tokens"][:] = tokenizer.pad_id
        for r, (tok, mask) in enumerate(chunk):  # rows past the end stay empty: no doc, no loss
            n = len(tok)
            batch["tokens"][r, :n], batch["loss_mask"][r, :n], batch["doc_ids"][r, :n] = tok, mask, 1
            batch["positions"][r, :n] = np.arange(n)
        yield batch


def fact_share(task: str, tokenizer, segment_len: int, limit: int = 0) -> tuple[float, float]:
    """Shares of the task's real test questions whose supporting facts lie (wholly, partly) in an
    earlier segment than the answer: what only the memory can carry (`qa.fact_segments`)."""
    samples = babi.load_task(task, "test")
    return qa.earlier_segment_share(samples[:limit] if limit else samples, tokenizer, segment_len)


FACT_GROUPS = ("earlier", "straddling", "inside")


def fact_groups(task: str, tokenizer, segment_len: int, limit: int = 0) -> dict[str, list[int]]:
    """Indices of the task's (first `limit`) test questions by where their supporting facts lie
    relative to the answer's segment (`qa.fact_segments`): wholly in earlier segments (only the
    memory can bring them), straddling a segment boundary (part in an earlier segment: memory and
    attention together), or wholly inside the answer's segment (attention alone suffices)."""
    samples = babi.load_task(task, "test")
    samples = samples[:limit] if limit else samples
    groups: dict[str, list[int]] = {name: [] for name in FACT_GROUPS}
    for i, s in enumerate(samples):
        wholly, partly = qa.fact_segments(s, tokenizer, segment_len)
        groups["earlier" if wholly else "straddling" if partly else "inside"].append(i)
    return groups


HELDOUT_ROWS = 1000  # rows of data.eval_paths evaluated when train.eval_samples is 0


def evaluate(eval_fn, params, batches) -> dict:
    """Sum `eval_fn` outputs over batches: mean answer loss and exact-match accuracy."""
    tot = {"ce": 0.0, "n": 0.0, "exact": 0.0, "rows": 0.0}
    for batch in batches:
        out = eval_fn(params, batch)
        for k in tot:
            tot[k] += float(out[k])
    return {"eval_loss": tot["ce"] / max(tot["n"], 1.0), "exact_match": tot["exact"] / max(tot["rows"], 1.0),
            "samples": int(tot["rows"])}


def take_batches(iterator, rows: int, batch_size: int):
    """The first `rows` rows of a training-format iterator (fewer if it ends first), regrouped into
    padded batches of `batch_size` rows (rows past the end are empty: no document, no loss)."""
    got, n = [], 0
    for b in iterator:
        got.append(b)
        n += len(b["tokens"])
        if n >= rows:
            break
    if not got:
        return
    full = {k: np.concatenate([b[k] for b in got])[:rows] for k in got[0]}
    for start in range(0, min(rows, n), batch_size):
        batch = {k: np.zeros((batch_size, v.shape[1]), np.int32) for k, v in full.items()}
        for k, v in full.items():
            chunk = v[start:start + batch_size]
            batch[k][:len(chunk)] = chunk
        yield batch

"""Synthetic associative recall across segments: the memory capacity probe's data and scoring.

A row is laid out in segments of S tokens (the model's own segment length)::

    segment 0          k pairs  key_1 value_1 ... key_k value_k, then filler to S
    segments 1..gap    filler tokens only
    query segment      the k keys again in a random order, each followed by its value;
                       the loss (and the score) is on predicting each value from its key.
                       Each query pair is its own document (doc ids 2, 3, ...), so self-attention
                       cannot see the other queries: otherwise a model that only knew the *set*
                       of values could answer later queries by elimination (1/k, 1/(k-1), ... 1)
    (rest of the row)  padding (doc id 0), for rows with a smaller gap than the longest

Keys are distinct within a row; values are drawn independently. A query segment never shows the
pairs of segment 0, so a model answers above chance (1 / n_values) only if something carries the
pairs across the segment boundary: LM2's memory does, a vanilla model with the same segments has no
path at all. Filler tokens come from their own range so that nothing but segment 0 holds a pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm2_jax.errors import DataError

PAD = 0


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Token ranges and row geometry; ids: 0 pad, then keys, values, filler."""

    segment_len: int
    max_gap: int
    n_keys: int = 32
    n_values: int = 32
    n_filler: int = 32

    def __post_init__(self):
        if self.segment_len < 2:
            raise DataError(f"segment_len={self.segment_len}: a segment must hold at least one pair")
        if self.max_gap < 0:
            raise DataError(f"max_gap={self.max_gap} must be >= 0")

    @property
    def max_pairs(self) -> int:
        return min(self.segment_len // 2, self.n_keys)

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values + self.n_filler

    @property
    def seq_len(self) -> int:
        return self.segment_len * (self.max_gap + 2)

    def keys(self) -> np.ndarray:
        return 1 + np.arange(self.n_keys)

    def values(self) -> np.ndarray:
        return 1 + self.n_keys + np.arange(self.n_values)

    def filler(self) -> np.ndarray:
        return 1 + self.n_keys + self.n_values + np.arange(self.n_filler)

    def check(self, k: int, gap: int) -> None:
        if not 1 <= k <= self.max_pairs:
            raise DataError(f"k={k} pairs: must be in [1, {self.max_pairs}] for segments of {self.segment_len} tokens")
        if not 0 <= gap <= self.max_gap:
            raise DataError(f"gap={gap}: must be in [0, {self.max_gap}]")


def make_batch(task: RecallTask, rng: np.random.Generator, ks, gaps) -> dict[str, np.ndarray]:
    """One (B, T) batch in the trainer's format; row b has ks[b] pairs and gaps[b] filler segments."""
    S, T = task.segment_len, task.seq_len
    B = len(ks)
    batch = {name: np.zeros((B, T), np.int32) for name in ("tokens", "loss_mask", "doc_ids", "positions")}
    keys, values, filler = task.keys(), task.values(), task.filler()
    for b, (k, gap) in enumerate(zip(ks, gaps)):
        task.check(int(k), int(gap))
        used = S * (gap + 2)
        row = rng.choice(filler, size=used)
        kk = rng.choice(keys, size=k, replace=False)
        vv = rng.choice(values, size=k)
        row[0:2 * k:2], row[1:2 * k:2] = kk, vv
        order = rng.permutation(k)
        q0 = S * (gap + 1)
        row[q0:q0 + 2 * k:2], row[q0 + 1:q0 + 2 * k:2] = kk[order], vv[order]
        batch["tokens"][b, :used] = row
        batch["loss_mask"][b, q0:q0 + 2 * k:2] = 1  # at each query key: the target is its value
        batch["doc_ids"][b, :used] = 1
        batch["doc_ids"][b, q0:q0 + 2 * k] = 2 + np.repeat(np.arange(k), 2)
        batch["positions"][b, :used] = np.arange(used)
    return batch


def train_batches(task: RecallTask, batch_size: int, seed: int, gaps):
    """Endless training batches: k uniform in [1, max_pairs], gap uniform over `gaps`."""
    rng = np.random.default_rng(seed)
    gaps = np.asarray(gaps)
    while True:
        yield make_batch(task, rng, rng.integers(1, task.max_pairs + 1, batch_size), rng.choice(gaps, batch_size))


def eval_batch(task: RecallTask, k: int, gap: int, rows: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed held-out batch for one (k, gap) setting (its own seed stream, never a training seed)."""
    rng = np.random.default_rng([seed, 1_000_003, k, gap])
    return make_batch(task, rng, [k] * rows, [gap] * rows)

"""BABILong mixing: the facts of one bAbI sample hidden, in order, in background book text.

A sample of target length ``L`` tokens (``LENGTHS``: 1k = 1,000 tokens as in BABILong, so
``[bos] + context + question + [ans] + answer + [eos]`` of a 1k sample fits a 1,024-token row)
has a context of exactly ``L`` tokens: the sample's sentences (the facts) and whole background
sentences; ``0k`` is the facts alone. The question follows the context.

How (all in token space, every piece encoded with one leading space so lengths add up):
1. noise budget = ``L`` − tokens of the facts (a sample whose facts alone exceed ``L`` is an error);
2. from a random position of the split's books, consecutive sentences of at least
   ``MIN_NOISE_TOKENS`` tokens are taken (one longer than what is left is passed over) until the
   remainder ``r`` is at most ``FILL_MAX_TOKENS`` and some sentence of the split's books has
   exactly ``r`` tokens; one such sentence, drawn at random, fills it (if the remainder falls
   below ``MIN_NOISE_TOKENS`` with no exact match, the last sentence taken is given back).
   BABILong cuts the last sentence instead; this keeps every sentence whole;
3. each fact is put into one of the (#noise sentences + 1) gaps, uniformly and independently; the
   gaps are sorted so the facts keep their order.

The random stream is ``numpy.random.default_rng([seed, index, L])``: the same seed and sample index
give the same sample. Training samples draw from the training books, test samples from the
evaluation books (``books.py``), which never overlap.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lm2_jax.data import babi, books, qa
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.errors import DataError

LENGTHS = {"0k": 0, "1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000, "16k": 16000,
           "32k": 32000, "64k": 64000, "128k": 128000}
MIN_NOISE_TOKENS = 10
FILL_MAX_TOKENS = 64  # the last gap is filled by one sentence of at most this many tokens
BOOK_SPLIT = {"train": "train", "test": "eval"}  # bAbI split -> background books

log = logging.getLogger(__name__)


class FactsTooLongError(DataError):
    """The facts of a sample alone are longer than the target length."""


def length_tokens(length: str | int) -> int:
    """``'4k'`` -> 4000 (an int is taken as a token count)."""
    if isinstance(length, int) and not isinstance(length, bool) and length >= 0:
        return length
    key = str(length).lower()
    if key not in LENGTHS:
        raise DataError(f"unknown BABILong length {length!r}; valid lengths: {', '.join(LENGTHS)}")
    return LENGTHS[key]


def length_name(length: str) -> str:
    """``'1K '`` -> ``'1k'``: a BABILong length name (DataError for anything else)."""
    name = str(length).strip().lower()
    if name not in LENGTHS:
        raise DataError(f"{name!r} is not a BABILong length; valid: {', '.join(LENGTHS)}")
    return name


def expand_lengths(spec: str, ranges: bool = False) -> list[str]:
    """'0k,1k,2k' (with `ranges` also '0k-2k') -> length names, in order (DataError naming the bad one)."""
    return babi.expand_spec(spec, list(LENGTHS), length_name, "length", ranges)


@dataclasses.dataclass(frozen=True)
class Haystack:
    """The tokenised sentences of one split's books, in book order."""

    split: str
    book_names: tuple[str, ...]
    texts: tuple[str, ...]
    ids: tuple[np.ndarray, ...]
    lengths: np.ndarray
    stream: np.ndarray  # indices of sentences with >= MIN_NOISE_TOKENS tokens, in order
    by_length: dict[int, np.ndarray]  # token count -> indices of all sentences of that length

    @classmethod
    def build(cls, split: str, tokenizer: Tokenizer, haystack_dir: str | Path | None = None) -> Haystack:
        paths = books.book_paths(split, haystack_dir)
        texts = tuple(s for p in paths for s in books.book_sentences(p))
        ids = tuple(np.asarray(x, np.int32) for x in tokenizer.encode_batch([" " + t for t in texts]))
        lengths = np.array([len(x) for x in ids], np.int64)
        order = np.argsort(lengths, kind="stable")
        bounds = np.flatnonzero(np.diff(lengths[order])) + 1
        by_length = {int(lengths[g[0]]): g for g in np.split(order, bounds) if len(g)}
        stream = np.flatnonzero(lengths >= MIN_NOISE_TOKENS)
        if len(stream) == 0:
            raise DataError(f"no sentence of >= {MIN_NOISE_TOKENS} tokens in the {split} books {paths}")
        return cls(split, tuple(books.book_stem(p) for p in paths), texts, ids, lengths, stream, by_length)

    def draw(self, budget: int, rng: np.random.Generator) -> list[int]:
        """Indices of whole sentences with exactly ``budget`` tokens in all (see module doc)."""
        chosen: list[int] = []
        rest, n = budget, len(self.stream)
        k = int(rng.integers(n))
        for _ in range(2 * n + budget):
            if rest == 0:
                return chosen
            if rest <= FILL_MAX_TOKENS and rest in self.by_length:
                chosen.append(int(rng.choice(self.by_length[rest])))
                return chosen
            if rest < MIN_NOISE_TOKENS and chosen:  # nothing fits exactly: give one back
                rest += int(self.lengths[chosen.pop()])
                continue
            sentence = int(self.stream[k % n])
            k += 1
            if self.lengths[sentence] <= rest:  # a sentence longer than the rest is passed over
                chosen.append(sentence)
                rest -= int(self.lengths[sentence])
        raise DataError(f"no {self.split} sentences add up to exactly {budget} tokens")


@functools.lru_cache(maxsize=8)
def haystack(split: str, tokenizer: Tokenizer, haystack_dir: str | None = None) -> Haystack:
    """Cached :meth:`Haystack.build` (tokenising the books takes a moment)."""
    return Haystack.build(split, tokenizer, haystack_dir)


@dataclasses.dataclass(frozen=True)
class BabilongSample:
    """One BABILong sample in ids. ``fact_starts[i]``: token offset of fact ``i`` in the context;
    ``noise``: the background sentences used (indices into the haystack of ``noise_split``)."""

    name: str
    task: str
    index: int
    length: int
    context_ids: np.ndarray
    question_ids: np.ndarray
    answer_ids: np.ndarray
    fact_starts: np.ndarray
    question: str
    answer: str
    noise: tuple[int, ...]
    noise_split: str


def mix(sample: babi.Sample, length: str | int, hay: Haystack, tokenizer: Tokenizer, *, seed: int,
        index: int, name: str | None = None) -> BabilongSample:
    """Hide ``sample``'s facts in ``hay`` text so the context has exactly ``length`` tokens."""
    target = length_tokens(length)
    name = name or f"{sample.task} sample {index}"
    facts = qa.encode_pieces(tokenizer, sample.context)
    question, answer = qa.encode_pieces(tokenizer, [sample.question, sample.answer])
    fact_tokens = sum(len(f) for f in facts)
    noise: list[int] = []
    gaps = np.zeros(len(facts), np.int64)
    if 0 < target < fact_tokens:
        raise FactsTooLongError(f"{name}: its facts take {fact_tokens} tokens, more than the target {target}")
    elif target > 0:
        rng = np.random.default_rng([seed, index, target])
        noise = hay.draw(target - fact_tokens, rng)
        gaps = np.sort(rng.integers(0, len(noise) + 1, size=len(facts)))
    pieces, starts, offset, k = [], [], 0, 0
    for gap in range(len(noise) + 1):
        while k < len(facts) and gaps[k] == gap:
            pieces.append(facts[k])
            starts.append(offset)
            offset += len(facts[k])
            k += 1
        if gap < len(noise):
            pieces.append(hay.ids[noise[gap]])
            offset += len(hay.ids[noise[gap]])
    context = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    return BabilongSample(name, sample.task, index, target, context, question, answer,
                          np.array(starts, np.int32), sample.question, sample.answer, tuple(noise), hay.split)


def split_samples(task: str, split: str, length: str | int, tokenizer: Tokenizer, *, seed: int = 0,
                  babi_dir: str | Path | None = None, haystack_dir: str | Path | None = None,
                  limit: int | None = None, skipped: list[int] | None = None) -> Iterator[BabilongSample]:
    """The samples of a bAbI file (``split`` 'train' or 'test') mixed with that split's books.

    Samples whose facts alone exceed the target length cannot be built and are left out (as
    BABILong drops stories with too many facts); never silently: their indices are appended to
    ``skipped`` and logged. ``limit``: only the first ``limit`` samples of the file.
    """
    if split not in BOOK_SPLIT:
        raise DataError(f"unknown BABILong split {split!r}; valid splits: {', '.join(BOOK_SPLIT)}")
    task = babi.canonical_task(task)
    hay = haystack(BOOK_SPLIT[split], tokenizer, None if haystack_dir is None else str(haystack_dir))
    left_out = []
    for index, sample in itertools.islice(enumerate(babi.load_task(task, split, babi_dir)), limit):
        try:
            yield mix(sample, length, hay, tokenizer, seed=seed, index=index,
                      name=f"{task} {split} sample {index}")
        except FactsTooLongError:
            left_out.append(index)
    if left_out:
        log.warning("%s %s %s: %d samples longer than the target left out: %s",
                    task, split, length, len(left_out), left_out)
    if skipped is not None:
        skipped.extend(left_out)

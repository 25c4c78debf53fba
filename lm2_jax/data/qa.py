"""QA sample -> model tokens, prompts for generation, and answer scoring.

Layout of one QA row (ids)::

    [bos] context question [ans] answer [eos]

Every context sentence, the question and the answer are encoded separately with one leading space
and concatenated, so the length of a context is the sum of its sentences' lengths (see
``tokenizer.py``) and BABILong contexts built in token space stay exact.

Loss mask, aligned to *inputs*: ``tokens[t]`` is the input at position ``t``, its target is
``tokens[t + 1]``, and ``loss_mask[t] = 1`` iff that target is an answer token or the final
``[eos]``. The last position has no target (mask 0). So the model is trained on the answer only,
as in BABILong's fine-tuning recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lm2_jax.data import babi, babi_gen
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.errors import ConfigError, DataError

TRUNCATE_MODES = ("error", "left")
_PIECE_CACHE_SIZE = 200_000


class SampleTooLongError(DataError):
    """A row longer than the configured sequence length (``data.truncate='error'``)."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    """A QA sample in ids; ``name`` identifies it in error messages (task, split, index)."""

    name: str
    context_ids: np.ndarray
    question_ids: np.ndarray
    answer_ids: np.ndarray


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[str]) -> list[np.ndarray]:
    """Each piece encoded with one leading space, as read-only int32 arrays (cached: bAbI
    sentences repeat a lot; safe to call from several reader threads)."""
    cache = _piece_cache(tokenizer)
    found = {p: cache.get(p) for p in dict.fromkeys(pieces)}
    missing = [p for p, ids in found.items() if ids is None]
    if missing:
        if len(cache) > _PIECE_CACHE_SIZE:
            cache.clear()
        for piece, ids in zip(missing, tokenizer.encode_batch([" " + p for p in missing])):
            array = np.asarray(ids, dtype=np.int32)
            array.flags.writeable = False
            found[piece] = cache[piece] = array
    return [found[p] for p in pieces]


@functools.lru_cache(maxsize=8)
def _piece_cache(tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    return {}


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32) if len(parts) else np.zeros(0, np.int32)


def encode_sample(sample: babi.Sample, tokenizer: Tokenizer, name: str) -> QAExample:
    context = encode_pieces(tokenizer, sample.context)
    question, answer = encode_pieces(tokenizer, [sample.question, sample.answer])
    return QAExample(name, _concat(context), question, answer)


def prompt_tokens(example: QAExample, tokenizer: Tokenizer) -> np.ndarray:
    """``[bos] context question [ans]``: what a model continues to generate the answer."""
    return _concat([np.array([tokenizer.bos_id], np.int32), example.context_ids,
                    example.question_ids, np.array([tokenizer.sep_id], np.int32)])


def prompt_from_text(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """A typed story and question ("Mary went to the kitchen. Where is Mary?") in the training
    layout: each sentence a piece, the last one the question, then ``[ans]``."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s.strip()]
    if not sentences:
        raise DataError("the prompt is empty: give a story and a question, e.g. "
                        "'Mary went to the kitchen. Where is Mary?'")
    *context, question = sentences
    return prompt_tokens(encode_sample(babi.Sample("prompt", tuple(context), question, "", ()), tokenizer, "prompt"),
                         tokenizer)


def _rows(examples: Sequence[QAExample], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``[bos]`` then, per example, ``context question [ans] answer [eos]``; the loss mask (module
    doc: every answer token and its ``[eos]`` a target) and where each example's ``[eos]`` ends."""
    parts, targets, ends = [np.array([tokenizer.bos_id], np.int32)], [], []
    n = 1
    for ex in examples:
        parts += [ex.context_ids, ex.question_ids, np.array([tokenizer.sep_id], np.int32), ex.answer_ids,
                  np.array([tokenizer.eos_id], np.int32)]
        start = n + len(ex.context_ids) + len(ex.question_ids)  # [ans]: its target is the first answer token
        n = start + 1 + len(ex.answer_ids) + 1
        targets.append((start, n - 1))
        ends.append(n)
    tokens = _concat(parts)
    mask = np.zeros(len(tokens), np.int32)
    for start, stop in targets:
        mask[start:stop] = 1
    return tokens, mask, ends


def qa_tokens(example: QAExample, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, loss_mask)`` of the full row, both int32 of the same length (mask: see module doc)."""
    tokens, mask, _ = _rows([example], tokenizer)
    return tokens, mask


def questions_tokens(sample: babi.Sample, tokenizer: Tokenizer, seq_len: int | None = None):
    """``data.extra_questions``: the sample's one-question row, then other questions its
    context answers as the generator would ask them (``babi_gen.answerable_questions``), each with
    its answer, as many as fit in ``seq_len``::

        [bos] context question [ans] answer [eos] question2 [ans] answer2 [eos] ...

    The first question's prefix is exactly its one-question row, so the extra questions train
    on what would otherwise be padding."""
    extra = [(q, a) for q, a in babi_gen.answerable_questions(sample) if q != sample.question]
    ids = encode_pieces(tokenizer, [p for qa_pair in extra for p in qa_pair])
    empty = np.zeros(0, np.int32)
    examples = [encode_sample(sample, tokenizer, ""),
                *(QAExample("", empty, q, a) for q, a in zip(ids[::2], ids[1::2]))]
    tokens, mask, ends = _rows(examples, tokenizer)
    keep = max([e for e in ends if e <= seq_len] or ends[:1]) if seq_len else ends[-1]
    return tokens[:keep], mask[:keep]


def fit_qa(example: QAExample, tokenizer: Tokenizer, seq_len: int, truncate: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`qa_tokens`, checked against ``seq_len``.

    A longer row is an error naming the sample (``truncate='error'``) or loses its oldest context
    tokens (``truncate='left'``; ``[bos]``, the question and the answer are always kept, and a row
    whose question and answer alone do not fit is an error in both modes).
    """
    if truncate not in TRUNCATE_MODES:
        raise ConfigError("data.truncate", truncate, f"must be one of {TRUNCATE_MODES}")
    tokens, mask = qa_tokens(example, tokenizer)
    excess = len(tokens) - seq_len
    if excess <= 0:
        return tokens, mask
    if truncate == "error":
        raise SampleTooLongError(
            f"{example.name}: {len(tokens)} tokens > data.seq_len={seq_len} (raise data.seq_len, "
            "or set data.truncate='left' to drop the oldest context tokens)"
        )
    if excess > len(example.context_ids):
        raise SampleTooLongError(
            f"{example.name}: question and answer alone ({len(tokens) - len(example.context_ids)} "
            f"tokens) exceed data.seq_len={seq_len}"
        )
    keep = np.r_[0, 1 + excess:len(tokens)]
    return tokens[keep], mask[keep]


def fact_segments(sample: babi.Sample, tokenizer: Tokenizer, segment_len: int) -> tuple[bool, bool]:
    """Where a sample's supporting facts lie relative to the answer, in segments of `segment_len`.

    Returns (all facts wholly in earlier segments, some fact token in an earlier segment) than the
    segment of the ``[ans]`` position, whose logits predict the answer, in the row layout of
    :func:`qa_tokens` (untruncated). With ``segment_len=0`` (one segment) both are False. Only the
    memory can carry a fact of the first kind to the answer.
    """
    if not segment_len:
        return False, False
    pieces = encode_pieces(tokenizer, list(sample.context))
    starts = np.cumsum([1] + [len(p) for p in pieces])  # the row starts with [bos]
    question = encode_pieces(tokenizer, [sample.question])[0]
    ans_pos = int(starts[-1]) + len(question)  # [ans]: the input whose target is the first answer token
    seg = ans_pos // segment_len
    last = [int(starts[f]) + len(pieces[f]) - 1 for f in sample.supporting]
    first = [int(starts[f]) for f in sample.supporting]
    return all(t // segment_len < seg for t in last), any(t // segment_len < seg for t in first)


def earlier_segment_share(samples, tokenizer: Tokenizer, segment_len: int) -> tuple[float, float]:
    """Shares of `samples` for the two cases of :func:`fact_segments`."""
    flags = np.array([fact_segments(s, tokenizer, segment_len) for s in samples], bool).reshape(-1, 2)
    return float(flags[:, 0].mean()), float(flags[:, 1].mean())


# -- scoring ---------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, first line, no surrounding space or final period, no spaces around commas."""
    text = text.strip().split("\n", 1)[0].strip().lower().rstrip(".").strip()
    return re.sub(r"\s*,\s*", ",", re.sub(r"\s+", " ", text))


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)


# Fixed answer vocabularies of qa1–qa10 (BABILong's label sets).
TASK_LABELS: dict[str, frozenset[str]] = {
    **{t: frozenset(babi_gen.ROOMS) for t in ("qa1", "qa2", "qa3", "qa4")},
    "qa5": frozenset(w.lower() for w in babi_gen.ACTORS_QA5) | frozenset(babi_gen.OBJECTS),
    "qa6": frozenset({"yes", "no"}),
    "qa7": frozenset(babi_gen.NUMBER_WORDS),
    "qa8": frozenset(babi_gen.OBJECTS) | {"nothing"},
    "qa9": frozenset({"yes", "no"}),
    "qa10": frozenset({"yes", "no", "maybe"}),
}


def _words_present(text: str, labels: Iterable[str]) -> set[str]:
    return {w for w in labels if re.search(rf"\b{re.escape(w)}\b", text)}


def label_set_match(prediction: str, target: str, task: str, question: str = "") -> bool:
    """BABILong's matcher for free-form output, with word boundaries.

    The output is lower-cased and cut at the first period; the task's answer words found in it,
    minus those that also occur in the question, must be exactly the target's words (qa8: the
    listed objects, any order). Words match only as whole words, so "none" does not contain "one"
    (the published matcher's substring test counts it).
    """
    labels = TASK_LABELS[babi.canonical_task(task)]
    text = prediction.lower().split(".", 1)[0]
    found = _words_present(text, labels) - _words_present(question.lower(), labels)
    wanted = set(normalize_answer(target).split(","))
    return found == wanted

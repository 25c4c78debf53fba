"""What a model's wrong qa1 answers are: the asked person's earlier room, another person's room, or
something else; and its accuracy by how many sentences separate the supporting fact from the
question. `python -m lm2_jax.eval errors --workdir=runs/tiny` prints it.

qa1 statements all read "<person> <verb> to the <room>.", and the question "Where is <person>?",
so each story's history of rooms per person is read off its sentences. A model whose memory holds
the rooms but not whose they are answers "another person's room" whenever the asked person's move
is not the story's last sentence; one that holds the persons but not the order of their moves
answers "the person's earlier room".
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from lm2_jax.data import babi
from lm2_jax.model import decoder
from lm2_jax.train import evaluate

KINDS = ("right", "earlier room of the person", "room of another person", "other")


def _history(context) -> dict[str, list[str]]:
    """{person: their rooms in story order} of qa1 statements."""
    rooms = collections.defaultdict(list)
    for sentence in context:
        words = sentence.rstrip(".").split()
        rooms[words[0]].append(words[-1])
    return rooms


def kind_of(sample: babi.Sample, prediction: str) -> str:
    """Which of `KINDS` a prediction is for a qa1 sample."""
    person = sample.question.rstrip("?").split()[-1]
    rooms = _history(sample.context)
    if prediction == sample.answer:
        return KINDS[0]
    if prediction in rooms[person][:-1]:
        return KINDS[1]
    if any(prediction in seen for who, seen in rooms.items() if who != person):
        return KINDS[2]
    return KINDS[3]


def predictions(config, params, tokenizer, samples: int, batch_rows: int = 100) -> list[str]:
    """The greedy first answer token of each of the first `samples` qa1 test questions (qa1's
    answers are one room, one token), decoded."""
    fwd = jax.jit(lambda p, t, pos, doc: decoder.forward(config.model, p, t, pos, doc)[0])
    out = []
    for b in evaluate.qa_batches("qa1", tokenizer, config.data.seq_len, batch_rows, samples, config.data.truncate):
        logits = np.asarray(fwd(params, b["tokens"], b["positions"], b["doc_ids"]))
        for r in range(len(b["tokens"])):
            where = np.nonzero(b["loss_mask"][r])[0]
            if len(where):
                out.append(tokenizer.decode([int(np.argmax(logits[r, where[0]]))]).strip())
    return out


def error_report(config, params, tokenizer, samples: int = 1000) -> dict:
    """{group: {kind: count}} by where the facts lie (`evaluate.fact_groups`; one group "all" for a
    model of one segment), and {group: {sentences after the fact: [right, questions]}}."""
    test = babi.load_task("qa1", "test")[:samples]
    S = config.model.memory.segment_len
    groups = evaluate.fact_groups("qa1", tokenizer, S, samples) if S else {"all": list(range(len(test)))}
    group_of = {i: g for g, ids in groups.items() for i in ids}
    kinds = {g: dict.fromkeys(KINDS, 0) for g in groups}
    by_distance = {g: collections.defaultdict(lambda: [0, 0]) for g in groups}
    for i, (sample, pred) in enumerate(zip(test, predictions(config, params, tokenizer, samples))):
        g, kind = group_of[i], kind_of(sample, pred)
        kinds[g][kind] += 1
        after = len(sample.context) - 1 - max(sample.supporting)
        by_distance[g][after][0] += kind == KINDS[0]
        by_distance[g][after][1] += 1
    return {"kinds": kinds, "by_distance": {g: dict(sorted(d.items())) for g, d in by_distance.items()}}


def format_report(report: dict) -> str:
    lines = []
    for g, counts in report["kinds"].items():
        n = sum(counts.values())
        if not n:
            continue
        lines.append(f"{g} ({n} questions): " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in counts.items()))
        lines.append("  exact match by sentences between the fact and the question: " + ", ".join(
            f"{d}: {r / q:.3f} ({q})" for d, (r, q) in report["by_distance"][g].items()))
    return "\n".join(lines)

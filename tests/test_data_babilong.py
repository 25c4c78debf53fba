"""BABILong mixing: exact lengths, facts kept in order, determinism, disjoint train/eval books."""

from __future__ import annotations

import numpy as np
import pytest

from lm2_jax.data import babi, babilong, books, qa
from lm2_jax.data.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def check_facts_in_order(s: babilong.BabilongSample, sample: babi.Sample, tok):
    facts = qa.encode_pieces(tok, sample.context)
    assert len(s.fact_starts) == len(facts)
    assert np.all(np.diff(s.fact_starts) > 0) or len(facts) < 2
    for start, fact in zip(s.fact_starts, facts):
        np.testing.assert_array_equal(s.context_ids[start:start + len(fact)], fact)
    text = tok.decode(s.context_ids)
    positions = [text.index(" " + f) for f in sample.context[:1]]
    for f in sample.context[1:]:  # each fact is found (in order) in the decoded context
        positions.append(text.index(" " + f, positions[-1] + 1))
    assert positions == sorted(positions)


@pytest.mark.parametrize("length", ["1k", "4k"])
@pytest.mark.parametrize("task", ["qa1", "qa2", "qa5", "qa8"])
def test_exact_length_and_facts_in_order(task, length, tok):
    hay = babilong.haystack("eval", tok)
    for index, sample in list(enumerate(babi.load_task(task, "test")))[::97]:
        s = babilong.mix(sample, length, hay, tok, seed=3, index=index)
        assert len(s.context_ids) == babilong.LENGTHS[length]
        assert s.context_ids.dtype == np.int32
        check_facts_in_order(s, sample, tok)
        np.testing.assert_array_equal(s.question_ids, tok.encode(" " + sample.question))
        np.testing.assert_array_equal(s.answer_ids, tok.encode(" " + sample.answer))


def test_16k_samples(tok):
    hay = babilong.haystack("train", tok)
    for index in (0, 517):
        sample = babi.load_task("qa3", "train")[index]
        s = babilong.mix(sample, "16k", hay, tok, seed=0, index=index)
        assert len(s.context_ids) == 16000
        check_facts_in_order(s, sample, tok)


def test_every_noise_sentence_is_whole(tok):
    hay = babilong.haystack("eval", tok)
    sample = babi.load_task("qa2", "test")[5]
    s = babilong.mix(sample, "2k", hay, tok, seed=0, index=5)
    noise_tokens = sum(len(hay.ids[i]) for i in s.noise)
    assert noise_tokens + sum(len(f) for f in qa.encode_pieces(tok, sample.context)) == 2000
    text = tok.decode(s.context_ids)
    for i in s.noise:
        assert " " + hay.texts[i] in text


def test_0k_is_the_facts_alone(tok):
    sample = babi.load_task("qa1", "test")[4]
    s = babilong.mix(sample, "0k", babilong.haystack("eval", tok), tok, seed=0, index=4)
    assert tok.decode(s.context_ids) == "".join(" " + c for c in sample.context)
    assert s.noise == ()


def test_same_seed_same_sample_other_seed_other_sample(tok):
    hay = babilong.haystack("eval", tok)
    sample = babi.load_task("qa2", "test")[10]
    a = babilong.mix(sample, "4k", hay, tok, seed=5, index=10)
    b = babilong.mix(sample, "4k", hay, tok, seed=5, index=10)
    c = babilong.mix(sample, "4k", hay, tok, seed=6, index=10)
    np.testing.assert_array_equal(a.context_ids, b.context_ids)
    np.testing.assert_array_equal(a.fact_starts, b.fact_starts)
    assert not np.array_equal(a.context_ids, c.context_ids)


def test_train_and_eval_books_never_overlap(tok, tmp_path):
    train, test = books.book_paths("train"), books.book_paths("eval")
    assert train and test and not {books.book_stem(p) for p in train} & {books.book_stem(p) for p in test}
    for name in ["dracula", "emma", "sherlock_holmes", "moby_dick", "wuthering_heights"]:
        (tmp_path / f"{name}.txt").write_text("x")
    assert [p.name for p in books.book_paths("eval", tmp_path)] == [
        "dracula.txt", "sherlock_holmes.txt", "wuthering_heights.txt"]
    assert [p.name for p in books.book_paths("train", tmp_path)] == ["emma.txt", "moby_dick.txt"]
    # Samples of each bAbI split draw their noise from that split's books only.
    eval_texts = set(babilong.haystack("eval", tok).texts)
    train_texts = set(babilong.haystack("train", tok).texts)
    for split, own, other in (("train", train_texts, eval_texts), ("test", eval_texts, train_texts)):
        for s in babilong.split_samples("qa1", split, "1k", tok, limit=5):
            hay = babilong.haystack(s.noise_split, tok)
            long_ones = [hay.texts[i] for i in s.noise if hay.lengths[i] >= babilong.MIN_NOISE_TOKENS]
            assert long_ones and all(t in own and t not in other for t in long_ones)


def test_facts_longer_than_the_target(tok):
    sample = max(babi.load_task("qa3", "test"), key=lambda s: len(s.context))
    with pytest.raises(babilong.FactsTooLongError, match="more than the target 1000"):
        babilong.mix(sample, "1k", babilong.haystack("eval", tok), tok, seed=0, index=0)
    skipped: list[int] = []
    kept = list(babilong.split_samples("qa3", "test", "1k", tok, limit=400, skipped=skipped))
    assert skipped == [364] and len(kept) == 399


def test_haystack_draw_is_exact_for_every_budget(tok):
    hay = babilong.haystack("eval", tok)
    rng = np.random.default_rng(0)
    for budget in [*range(1, 400), 999, 4000, 31999, 128000]:
        assert int(hay.lengths[hay.draw(budget, rng)].sum()) == budget


def test_unknown_length_and_split(tok):
    with pytest.raises(ValueError, match="unknown BABILong length '3k'; valid lengths: 0k, 1k"):
        babilong.length_tokens("3k")
    with pytest.raises(ValueError, match="unknown BABILong split 'dev'"):
        next(babilong.split_samples("qa1", "dev", "1k", tok))
    with pytest.raises(ValueError, match="unknown book split"):
        books.book_paths("test")
    assert babilong.length_tokens("128K") == 128000


def test_sentence_splitter():
    para = ('"Mr. Holmes, J. Watson is here." He rose. "Is it?" said he! It cost 3s. 6d. Fine. '
            "No. 221B was quiet")
    assert books.sentences(para) == [
        '"Mr. Holmes, J. Watson is here."', "He rose.", '"Is it?" said he!', "It cost 3s.",
        "6d.", "Fine.", "No. 221B was quiet"]
    assert list(books.paragraphs("a\nb\n\n\n  c  d \n")) == ["a b", "c d"]

"""Grain pipeline: batch format, checkpoint/restore (state and Orbax), host sharding, length errors."""

from __future__ import annotations

import collections
import itertools

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm2_jax.data import options, pipeline, qa, tokenizer as toklib
from lm2_jax.data.tokenizer import default_tokenizer

BOOKS = str(pipeline.books.VENDORED_BOOKS / "treasure_island.txt.gz")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def cfg(**overrides):
    c = options.defaults()
    c.update(dict(batch_size=8, seq_len=128, read_threads=1, prefetch_buffer=4) | overrides)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def check_rows(batch, tok, seq_len, rows):
    assert set(batch) == set(pipeline.FEATURES)
    for k in pipeline.FEATURES:
        assert batch[k].shape == (rows, seq_len) and batch[k].dtype == np.int32
    for tokens, mask, doc, pos in zip(*(batch[k] for k in pipeline.FEATURES)):
        pad = doc == 0
        assert np.all(tokens[pad] == tok.pad_id) and np.all(mask[pad] == 0) and np.all(pos[pad] == 0)
        for d in np.unique(doc[doc > 0]):
            where = np.flatnonzero(doc == d)
            np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            assert mask[where[-1]] == 0  # no target across documents


def test_default_batches_are_generated_qa1(tok):
    c = cfg(batch_size=32, seq_len=256)
    batch = next(pipeline.make_train_iterator(c, tok))
    check_rows(batch, tok, 256, 32)
    assert np.all(batch["doc_ids"].max(axis=1) == 1)  # pad mode: one sample per row
    row = tok.decode(batch["tokens"][0], skip_special=False)
    assert row.startswith("<bos> ") and "Where is" in row and row.count("<ans>") == 1
    targets = batch["tokens"][0, 1:][batch["loss_mask"][0, :-1] == 1]
    assert tok.decode(targets, skip_special=False).endswith("<eos>")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # generated qa1, padded
        dict(source="babi_file", task="qa2", num_epochs=3, batch_size=16, seq_len=512),
        dict(source="text", text_paths=BOOKS, mode="pack", seq_len=64),
        dict(source="babi_generated", task="qa5", mode="pack", seq_len=256, shuffle=False, truncate="left"),
        dict(source="babi_generated", task="qa1-qa3", mix_weights="3,1,1", seq_len=512, truncate="left"),
        dict(source="babilong_generated", task="qa1,qa2", babilong_length="0k,1k", seq_len=1100, batch_size=4),
        dict(extra_questions=0.5, seq_len=80),
    ],
    ids=["generated", "file-epochs", "text-pack", "qa-pack", "task-mix", "babilong-mix", "extra-questions"],
)
def test_restored_iterator_continues_exactly(tok, overrides):
    c = cfg(**overrides)
    k, n = 7, 6
    reference = take(pipeline.make_train_iterator(c, tok), k + n)
    first = pipeline.make_train_iterator(c, tok)
    assert_same(take(first, k), reference[:k])
    state = first.get_state()
    resumed = pipeline.make_train_iterator(c, tok)
    resumed.set_state(state)
    assert_same(take(resumed, n), reference[k:])
    check_rows(reference[-1], tok, c.seq_len, c.batch_size)


def test_restore_through_orbax_checkpoint_manager(tok, tmp_path):
    c = cfg(source="babi_file", task="qa1", mode="pack")
    k, n = 5, 4
    reference = take(pipeline.make_train_iterator(c, tok), k + n)
    it = pipeline.make_train_iterator(c, tok)
    take(it, k)
    train_state = {"step": np.array(k, np.int32), "w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(k, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                                 data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    take(it, 3)  # the live iterator moves on; the checkpoint must not
    fresh = pipeline.make_train_iterator(c, tok)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(k, args=ocp.args.Composite(state=ocp.args.StandardRestore(train_state),
                                                               data=grain.checkpoint.CheckpointRestore(fresh)))
    assert int(restored.state["step"]) == k
    assert_same(take(restored.data, n), reference[k:])


def row_keys(batches):
    return collections.Counter(row.tobytes() for b in batches for row in b["tokens"])


def test_two_hosts_get_disjoint_shards_covering_the_data(tok):
    # 1,000 qa1 test samples, one epoch: 125 global batches of 8, i.e. 4 rows per host and step.
    c = cfg(source="babi_file", task="qa1", split="test", num_epochs=1, seed=9)
    single = list(pipeline.make_train_iterator(c, tok, process_index=0, process_count=1))
    hosts = [list(pipeline.make_train_iterator(c, tok, process_index=i, process_count=2)) for i in (0, 1)]
    assert [len(h) for h in hosts] == [125, 125] and len(single) == 125
    assert all(b["tokens"].shape == (4, 128) for h in hosts for b in h)
    union = row_keys(hosts[0]) + row_keys(hosts[1])
    assert union == row_keys(single)  # every sample exactly once over the two hosts
    assert sum(union.values()) == 1000
    # The same global order: host i holds records i, i+2, ... of the shuffled sequence.
    interleaved = [r for b0, b1 in zip(*hosts) for pair in zip(b0["tokens"], b1["tokens"]) for r in pair]
    np.testing.assert_array_equal(np.stack(interleaved), np.concatenate([b["tokens"] for b in single]))


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tok):
    c = cfg(source="babi_file", task="qa1", split="test", batch_size=1000, num_epochs=2)
    a, b = list(pipeline.make_train_iterator(c, tok))
    assert row_keys([a]) == row_keys([b]) and not np.array_equal(a["tokens"], b["tokens"])
    again = next(pipeline.make_train_iterator(c, tok))
    np.testing.assert_array_equal(again["tokens"], a["tokens"])
    other = next(pipeline.make_train_iterator(cfg(**{**c, "seed": 1}), tok))
    assert not np.array_equal(other["tokens"], a["tokens"])


def test_packed_rows_hold_several_documents(tok):
    c = cfg(source="text", text_paths=BOOKS, mode="pack", seq_len=256)
    batch = next(pipeline.make_train_iterator(c, tok))
    check_rows(batch, tok, 256, 8)
    assert batch["doc_ids"].max() > 1
    for tokens, doc in zip(batch["tokens"], batch["doc_ids"]):
        starts = np.flatnonzero(np.diff(np.r_[0, doc]) > 0)
        assert np.all(tokens[starts] == tok.bos_id)


def test_long_text_documents_become_windows(tok):
    docs = pipeline.text_documents(BOOKS, tok, window=16)
    assert max(map(len, docs)) == 16
    full = np.concatenate(docs)
    assert (full == tok.bos_id).sum() == (full == tok.eos_id).sum()  # nothing cut away


@pytest.mark.parametrize("source", ["babi_generated", "babi_file"])
def test_extra_questions_fill_a_share_of_the_rows(tok, source):
    one = next(pipeline.make_train_iterator(cfg(source=source, seq_len=80, batch_size=64, shuffle=False), tok))
    for share in (1.0, 0.5):
        c = cfg(source=source, extra_questions=share, seq_len=80, batch_size=64, shuffle=False)
        batch = next(pipeline.make_train_iterator(c, tok))
        check_rows(batch, tok, 80, 64)
        extended = 0
        for tokens, mask, first, first_mask in zip(batch["tokens"], batch["loss_mask"], one["tokens"],
                                                   one["loss_mask"]):
            n = int((first != tok.pad_id).sum())
            np.testing.assert_array_equal(tokens[:n], first[:n])  # the same sample, then any extra questions
            assert mask.sum() == 2 * (tokens == tok.sep_id).sum() >= first_mask.sum()
            extended += int(mask.sum() > first_mask.sum())
        # qa1 asks about up to four people: nearly every row has another answerable question
        assert extended > 56 if share == 1.0 else 16 < extended < 48


def test_too_long_sample_is_an_error_naming_it(tok):
    c = cfg(source="babi_file", task="qa3", split="test", seq_len=64, shuffle=False)
    with pytest.raises(qa.SampleTooLongError, match=r"qa3 test sample 0: \d+ tokens > data.seq_len=64"):
        next(pipeline.make_train_iterator(c, tok))
    c.truncate = "left"
    batch = next(pipeline.make_train_iterator(c, tok))
    assert np.all(batch["tokens"][:, 0] == tok.bos_id) and np.all(batch["doc_ids"] == 1)
    assert np.all(batch["loss_mask"].sum(axis=1) >= 2)  # answer and eos kept


def test_batch_size_must_split_over_hosts(tok):
    with pytest.raises(ValueError, match="data.batch_size=8: must be divisible by the number of hosts"):
        pipeline.make_train_iterator(cfg(), tok, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index < process_count"):
        pipeline.make_train_iterator(cfg(), tok, process_index=2, process_count=2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("source", "c4", "must be one of babi_generated"),
        ("task", "qa42", "unknown bAbI task 'qa42'"),
        ("seq_len", 0, "must be an integer >= 8"),
        ("batch_size", 2.5, "must be an integer >= 1"),
        ("mode", "concat", "must be one of pad, pack"),
        ("truncate", "right", "must be one of error, left"),
        ("seed", -1, "must be an integer >= 0"),
        ("num_epochs", -1, "must be an integer >= 0"),
        ("shuffle", 1, "must be a bool"),
        ("tokenizer", None, "must be a string"),
        ("extra_questions", 1.5, "must be a share between 0 and 1"),
    ],
)
def test_validate_names_field_and_value(field, value, message):
    c = ml_collections.ConfigDict({**options.defaults().to_dict(), field: value})
    with pytest.raises(ValueError, match=f"data.{field}={value!r}: {message}"):
        options.validate(c)


def test_validate_source_specific_fields():
    c = options.defaults()
    c.update(source="babi_generated", task="qa12")
    with pytest.raises(ValueError, match="data.task='qa12': source babi_generated has tasks qa1"):
        options.validate(c)
    c = options.defaults()
    c.source = "babilong_tfds"
    with pytest.raises(ValueError, match="data.tfds_data_dir=''"):
        options.validate(c)
    c.update(tfds_data_dir="/x", babilong_length="3k")
    with pytest.raises(ValueError, match="data.babilong_length='3k'"):
        options.validate(c)
    c = options.defaults()
    c.source = "text"
    with pytest.raises(ValueError, match="data.text_paths=''"):
        options.validate(c)
    c = options.defaults()
    c.update(source="babilong_generated", extra_questions=0.5)
    with pytest.raises(ValueError, match="data.extra_questions=0.5: needs data.source babi_generated or babi_file"):
        options.validate(c)
    assert options.validate(options.defaults()) is not None


def test_validate_rejects_unknown_fields():
    c = options.defaults()
    with c.unlocked():
        c.seqlen = 3
    with pytest.raises(ValueError, match="data.seqlen=3: unknown field"):
        options.validate(c)


def test_babilong_tfds_source(tok, tmp_path):
    from lm2_jax.data import tfds_babilong

    tfds_babilong.prepare("qa1", "1k", tmp_path, limit=16)
    c = cfg(source="babilong_tfds", tfds_data_dir=str(tmp_path), seq_len=1024, batch_size=4, shuffle=False)
    batches = list(itertools.islice(pipeline.make_train_iterator(c, tok), 2))
    check_rows(batches[0], tok, 1024, 4)
    lengths = (batches[0]["doc_ids"] > 0).sum(axis=1)
    assert np.all(lengths > 1000)  # 1,000 context tokens + bos, question, separator, answer, eos
    other = toklib.train(iter([" Mary went to the hallway."] * 5), vocab_size=300)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="was built with another tokenizer"):
        pipeline.make_train_iterator(c, toklib.Tokenizer.load(tmp_path / "other.json"))


def test_worker_processes_give_the_same_batches(tok):
    c = cfg(worker_count=2)
    reference = take(pipeline.make_train_iterator(cfg(), tok), 6)
    it = pipeline.make_train_iterator(c, tok)
    try:
        assert_same(take(it, 3), reference[:3])
        state = it.get_state()
    finally:
        it.close()
    resumed = pipeline.make_train_iterator(c, tok)
    try:
        resumed.set_state(state)
        assert_same(take(resumed, 3), reference[3:])
    finally:
        resumed.close()


def _question_kinds(batches, tok):
    """Per row: the task its question belongs to, from the question's wording (qa1 and qa2 ask
    'Where is <person>?' / 'Where is the <object>?', qa3 'Where was the <object> before ...?')."""
    kinds = collections.Counter()
    for b in batches:
        for row in b["tokens"]:
            text = tok.decode(row, skip_special=False)
            q = text[:text.index("<ans>")].rsplit(".", 1)[-1]
            kinds["qa3" if "before" in q else "qa2" if "the " in q else "qa1"] += 1
    return kinds


def test_task_mix_follows_its_weights(tok):
    c = cfg(source="babi_generated", task="qa1-qa3", mix_weights="2,1,1", seq_len=512, batch_size=16, truncate="left")
    kinds = _question_kinds(take(pipeline.make_train_iterator(c, tok), 10), tok)
    assert sum(kinds.values()) == 160
    assert abs(kinds["qa1"] - 80) <= 2 and abs(kinds["qa2"] - 40) <= 2 and abs(kinds["qa3"] - 40) <= 2, kinds


def test_babilong_generated_hides_facts_in_training_books_only(tok):
    c = cfg(source="babilong_generated", task="qa1", babilong_length="1k", seq_len=1100, batch_size=2)
    source = pipeline.make_source(c, tok)
    name, sample = source[3]
    assert sample.noise_split == "train" and len(sample.context_ids) == 1000 and "qa1@1k" in name
    eval_texts = set(pipeline.babilong.haystack("eval", tok).texts)
    assert not eval_texts & {source.hay.texts[i] for i in sample.noise}
    batch = next(pipeline.make_train_iterator(c, tok))
    check_rows(batch, tok, 1100, 2)
    assert np.all(batch["doc_ids"].sum(axis=1) > 1000)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(task="qa3-qa1"), "data.task='qa3-qa1': the range qa3-qa1 runs backwards"),
    (dict(task="qa1,qa99"), "data.task='qa1,qa99'"),
    (dict(task="qa1,qa2", mix_weights="1"), "data.mix_weights='1': needs 2 positive weights, one per component"),
    (dict(task="qa1,qa2", mix_weights="1,x"), "data.mix_weights='1,x': must be comma-separated numbers"),
    (dict(source="babilong_generated", babilong_length="0k,5k"), "data.babilong_length='0k,5k'"),
])
def test_validate_mix_fields(overrides, message):
    c = cfg(**overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        options.validate(c)

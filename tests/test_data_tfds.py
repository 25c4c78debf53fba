"""TFDS builder: a small babilong config built to ArrayRecord reads back identical to memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm2_jax.data import babilong, tfds_babilong
from lm2_jax.data.tokenizer import default_tokenizer

LIMIT = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_babilong.prepare("qa2", "1k", data_dir, limit=LIMIT, seed=4)
    return data_dir


def test_data_source_reads_back_the_in_memory_samples(built):
    tok = default_tokenizer()
    source = tfds.data_source("babilong/qa2_1k", data_dir=str(built))
    for split in ("train", "test"):
        expected = list(babilong.split_samples("qa2", split, "1k", tok, seed=4, limit=LIMIT))
        records = source[split]
        assert len(records) == len(expected) == LIMIT
        for i, s in enumerate(expected):
            r = records[i]
            assert r["index"] == s.index == i
            for key in ("context_ids", "question_ids", "answer_ids", "fact_starts"):
                assert r[key].dtype == np.int32
                np.testing.assert_array_equal(r[key], getattr(s, key))
            assert len(r["context_ids"]) == 1000
            assert r["question"].decode() == s.question and r["answer"].decode() == s.answer
            assert r["context"].decode() == tok.decode(s.context_ids)


def test_metadata_records_the_tokenizer_and_sources(built):
    meta = json.loads((built / "babilong" / "qa2_1k" / "1.0.0" / "metadata.json").read_text())
    assert meta["tokenizer_fingerprint"] == default_tokenizer().fingerprint
    assert meta["seed"] == 4 and meta["limit"] == LIMIT
    assert meta["skipped"] == {"train": [], "test": []}


def test_configs_cover_tasks_and_lengths():
    names = {c.name for c in tfds_babilong.Babilong.BUILDER_CONFIGS}
    assert len(names) == 10 * len(babilong.LENGTHS)
    assert {"qa1_0k", "qa1_4k", "qa10_128k"} <= names


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"babilong/qa1_4k .*tfds_babilong.prepare\('qa1', '4k'"):
        tfds_babilong.data_source("qa1", "4k", "test", tmp_path)


def test_reusing_a_build_with_other_settings_is_an_error(built):
    tfds_babilong.prepare("qa2", "1k", built, limit=LIMIT, seed=4)  # same settings: reused
    with pytest.raises(ValueError, match=r"was built differently .*'seed': \(4, 5\)"):
        tfds_babilong.prepare("qa2", "1k", built, limit=LIMIT, seed=5)

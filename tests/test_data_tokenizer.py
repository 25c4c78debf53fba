"""Tokenizer: vendored BPE, special ids, exact round trips, additive lengths, loading other files."""

from __future__ import annotations

import json
import sys

import pytest
import tokenizers

from lm2_jax.data import babi, books, tokenizer as toklib


@pytest.fixture(scope="module")
def tok():
    return toklib.default_tokenizer()


def test_vendored_tokenizer(tok):
    assert tok.vocab_size == 8192
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
    assert toklib.load_tokenizer("") is tok and toklib.load_tokenizer(None) is tok


def test_round_trip_of_any_text(tok):
    texts = [" Mary moved to the bathroom.", " café — “quoted” 日本語 \t\n x", " Where was the milk before?"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode(" hallway"), tok.eos_id]) == " hallway"
    assert tok.decode([tok.bos_id, *tok.encode(" hallway")], skip_special=False) == "<bos> hallway"


def test_babi_words_are_single_tokens(tok):
    for word in ["Mary", "Sandra", "bathroom", "hallway", "football", "journeyed", "north", "maybe"]:
        assert len(tok.encode(" " + word)) == 1, word


def test_lengths_add_up_over_sentences(tok):
    """A text of pieces that each start with one space tokenises to the concatenated pieces."""
    sents = [" " + s for s in books.book_sentences(books.book_paths("eval")[0])[:2000]]
    sents += [" " + s.text for story in babi.read_stories(babi.task_file("qa5", "test"))[:50] for s in story]
    pieces = tok.encode_batch(sents)
    assert tok.encode("".join(sents)) == [i for p in pieces for i in p]


def test_training_is_reproducible(tmp_path):
    texts = [" " + line.text for story in babi.read_stories(babi.task_file("qa1", "train")) for line in story]
    a, b = toklib.train(iter(texts), vocab_size=300), toklib.train(iter(texts), vocab_size=300)
    assert a.to_str() == b.to_str()
    assert [a.id_to_token(i) for i in range(4)] == list(toklib.SPECIAL_TOKENS)


def test_load_other_tokenizer_files(tmp_path):
    gpt2_like = toklib.train(iter([" hello world"] * 10), vocab_size=300)
    gpt2_like.add_special_tokens(["<|endoftext|>", "<sep>"])
    path = tmp_path / "tokenizer.json"
    gpt2_like.save(str(path))
    loaded = toklib.Tokenizer.load(path)  # our names exist in this file
    assert loaded.sep_id == gpt2_like.token_to_id("<ans>")
    renamed = toklib.Tokenizer.load(path, special_tokens={"sep": "<sep>", "bos": "<|endoftext|>"})
    assert renamed.sep_id == gpt2_like.token_to_id("<sep>")
    assert renamed.bos_id == gpt2_like.token_to_id("<|endoftext|>")
    assert loaded.fingerprint != renamed.fingerprint != toklib.default_tokenizer().fingerprint


def test_missing_special_token_is_a_clear_error(tmp_path):
    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    path = tmp_path / "bare.json"
    bare.save(str(path))
    with pytest.raises(ValueError, match=r"bare.json: no token for 'pad' .*special_tokens="):
        toklib.Tokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        toklib.Tokenizer.load(tmp_path / "nope.json")


def test_sentencepiece_model_needs_the_package(tmp_path, monkeypatch):
    path = tmp_path / "tok.model"
    path.write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # unimportable, whatever is installed
    with pytest.raises(ImportError, match="install `sentencepiece`"):
        toklib.Tokenizer.load(path)


def test_vendored_file_is_the_trained_one():
    """The committed tokenizer.json is what the training command produces (no drift)."""
    trained = toklib.train(toklib.training_texts())
    assert json.loads(trained.to_str()) == json.loads(toklib.DEFAULT_PATH.read_text())

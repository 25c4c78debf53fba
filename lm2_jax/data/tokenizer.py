"""Tokenizer: the project's byte-level BPE (vendored ``assets/tokenizer.json``) or an existing file.

Why byte-level BPE with Hugging Face ``tokenizers`` rather than SentencePiece:
- every byte sequence encodes (no unknown token) and decoding is exact, so any book or user text
  round-trips;
- GPT-2-style pre-tokenisation splits text at the space before each word, so a text made of
  pieces that each start with one space tokenises to the concatenation of the pieces' tokens. The
  BABILong mixer relies on this to count a context's length exactly by summing sentence lengths;
- the same ``tokenizer.json`` format is what Llama-3 and most Hugging Face models ship, so loading a
  real model's tokenizer is the same code path; ``tokenizers`` is already a dependency (fast Rust
  batch encoding, no model download).

The vendored tokenizer (vocabulary 8192) is trained offline, never at run time:

    python -m lm2_jax.data.tokenizer --train --out lm2_jax/data/assets/tokenizer.json

on the vendored bAbI ``en`` train files (qa1–qa10) and the vendored *training* books (evaluation
books are kept out). Special tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<ans>`` 3 (separates
question and answer).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm2_jax.data import babi, books
from lm2_jax.errors import DataError, MissingFileError

DEFAULT_PATH = Path(__file__).parent / "assets" / "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<ans>")
VOCAB_SIZE = 8192
# Names tried, in order, when loading a tokenizer made elsewhere (Llama-3, GPT-2, SentencePiece).
_CANDIDATES = {
    "pad": ("<pad>", "<|finetune_right_pad_id|>", "<unk>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "sep": ("<ans>", "<sep>", "<|reserved_special_token_0|>"),
}


class Tokenizer:
    """Text <-> ids, plus the ids of the four special tokens the data pipeline needs."""

    def __init__(self, backend: tokenizers.Tokenizer | object, special: dict[str, int], name: str):
        self._backend = backend
        self.pad_id, self.bos_id = special["pad"], special["bos"]
        self.eos_id, self.sep_id = special["eos"], special["sep"]
        self.name = name

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        return self.pad_id, self.bos_id, self.eos_id, self.sep_id

    @property
    def vocab_size(self) -> int:
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no special tokens are added."""
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(self._backend, tokenizers.Tokenizer):
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self._backend.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(self.special_ids)
            ids = [i for i in ids if i not in special]
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def save_hf(self, directory: str | Path) -> list[str]:
        """Write this tokenizer as a Hugging Face model folder carries it (`tokenizer.json` or a
        SentencePiece `tokenizer.model`, and `tokenizer_config.json` naming the special tokens);
        returns the file names."""
        import json
        import shutil

        directory = Path(directory)
        if isinstance(self._backend, tokenizers.Tokenizer):
            (directory / "tokenizer.json").write_text(self._backend.to_str())
            token, cls, written = self._backend.id_to_token, "PreTrainedTokenizerFast", ["tokenizer.json"]
        else:
            shutil.copyfile(self.name, directory / "tokenizer.model")
            token, cls, written = self._backend.id_to_piece, "LlamaTokenizer", ["tokenizer.model"]
        config = {"tokenizer_class": cls, "bos_token": token(self.bos_id), "eos_token": token(self.eos_id),
                  "pad_token": token(self.pad_id), "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return written + ["tokenizer_config.json"]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary and special ids: data tokenised with another tokenizer differs."""
        if isinstance(self._backend, tokenizers.Tokenizer):
            blob = self._backend.to_str()
        else:
            blob = self._backend.serialized_model_proto().hex()
        return hashlib.sha256(f"{blob}{self.special_ids}".encode()).hexdigest()

    @classmethod
    def load(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        """Load ``tokenizer.json`` (HF) or a SentencePiece ``.model``.

        ``special_tokens`` maps 'pad'/'bos'/'eos'/'sep' to token strings for tokenizers whose names
        differ from the usual ones; a role that cannot be resolved is an error naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"tokenizer file not found: {path}")
        if path.suffix == ".model":
            try:
                import sentencepiece  # noqa: PLC0415 (optional dependency)
            except ImportError as e:
                raise ImportError(
                    f"{path} is a SentencePiece model; install `sentencepiece` to load it"
                ) from e
            backend = sentencepiece.SentencePieceProcessor(model_file=str(path))

            def lookup(token: str) -> int | None:
                i = backend.piece_to_id(token)
                return None if i == backend.unk_id() and token != "<unk>" else i
        else:
            backend = tokenizers.Tokenizer.from_file(str(path))
            lookup = backend.token_to_id
        special = {}
        for role, names in _CANDIDATES.items():
            chosen = [special_tokens[role]] if special_tokens and role in special_tokens else names
            ids = [i for i in (lookup(n) for n in chosen) if i is not None]
            if not ids:
                raise DataError(
                    f"{path}: no token for {role!r} among {list(chosen)}; pass "
                    f"special_tokens={{{role!r}: '<token>'}}"
                )
            special[role] = ids[0]
        return cls(backend, special, name=str(path))


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The vendored byte-level BPE (vocabulary 8192)."""
    return Tokenizer.load(DEFAULT_PATH)


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """``None`` or ``''`` -> the vendored tokenizer; else :meth:`Tokenizer.load`."""
    return default_tokenizer() if not path else Tokenizer.load(path)


def training_texts(babi_dir: str | Path | None = None, haystack_dir: str | Path | None = None) -> Iterator[str]:
    """bAbI train sentences, questions and answers (qa1–qa10) and training-book paragraphs."""
    for task in [f"qa{i}" for i in range(1, 11)]:
        for story in babi.read_stories(babi.task_file(task, "train", babi_dir)):
            for line in story:
                yield " " + line.text
                if line.answer is not None:
                    yield " " + line.answer
    for path in books.book_paths("train", haystack_dir):
        for para in books.paragraphs(books.read_book(path)):
            yield " " + para


def train(texts: Iterator[str], vocab_size: int = VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Byte-level BPE with the four special tokens at ids 0-3."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm2_jax.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--babi-dir", default=None, help="bAbI train files (default: vendored en)")
    parser.add_argument("--haystack-dir", default=None, help="books (default: vendored)")
    args = parser.parse_args(argv)
    tok = train(training_texts(args.babi_dir, args.haystack_dir), args.vocab_size)
    tok.save(str(args.out))
    print(f"saved {args.out} (vocabulary {tok.get_vocab_size()})")


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)

"""Background books (the PG19 stand-in of BABILong): which book serves which split, and text
cleaning into paragraphs and sentences.

Training and evaluation noise come from disjoint books, as BABILong uses PG19's train and test
splits. The package vendors two training books and one evaluation book (gzip); a directory with
more books (e.g. ``../shared/data/haystack``) can be used instead: a book whose file stem is in
``EVAL_BOOKS`` is evaluation noise, every other ``*.txt`` book is training noise.

Sentences are split with a small rule set (end punctuation, optional closing quotes, then an
upper-case start; common abbreviations kept) instead of NLTK's Punkt, to avoid a dependency and a
model download; paragraphs (blank-line separated) always end a sentence.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

from lm2_jax.errors import DataError, MissingFileError

VENDORED_BOOKS = Path(__file__).parent / "assets" / "books"
# Evaluation books of the 12-book haystack; the vendored sherlock_holmes is one of them.
EVAL_BOOKS = frozenset({"sherlock_holmes", "dracula", "wuthering_heights"})
SPLITS = ("train", "eval")

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr rev capt col gen lt sgt messrs mme mlle prof hon esq no vol ch vs etc".split()
)
# A candidate boundary: end punctuation (+ closing quotes/brackets), whitespace, then an opening
# quote/bracket or nothing, then an upper-case letter or a digit.
_BOUNDARY = re.compile(r"""([.!?]+["'\u2019\u201d)\]]*)\s+(?=["'\u2018\u201c(\[]*[A-Z0-9])""")


def book_stem(path: Path) -> str:
    return path.name.split(".", 1)[0]


def book_paths(split: str, haystack_dir: str | Path | None = None) -> list[Path]:
    """Books of a split ('train' or 'eval'), sorted by name; vendored ones if no directory."""
    if split not in SPLITS:
        raise DataError(f"unknown book split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = Path(haystack_dir) if haystack_dir is not None else VENDORED_BOOKS
    if not root.is_dir():
        raise MissingFileError(f"haystack directory not found: {root}")
    paths = sorted(p for p in root.iterdir() if p.name.endswith((".txt", ".txt.gz")))
    chosen = [p for p in paths if (book_stem(p) in EVAL_BOOKS) == (split == "eval")]
    if not chosen:
        raise MissingFileError(
            f"no {split} books in {root} (evaluation books: {', '.join(sorted(EVAL_BOOKS))}; "
            "training books: every other *.txt / *.txt.gz)"
        )
    return chosen


def read_book(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"book not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs, hard line wraps joined, whitespace collapsed to one space."""
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if para:
            yield para


def sentences(paragraph: str) -> list[str]:
    """Split one whitespace-normalised paragraph into sentences."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        words = paragraph[start:m.start(1)].rsplit(" ", 1)
        last_word = words[-1].lstrip("\"'(\u2018\u201c").lower()
        if m.group(1) == "." and (last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last_word)):
            continue  # "Mr. Holmes", "J. Smith"
        out.append(paragraph[start:m.end(1)])
        start = m.end()
    if start < len(paragraph):
        out.append(paragraph[start:])
    return out


def book_sentences(path: str | Path) -> list[str]:
    return [s for para in paragraphs(read_book(path)) for s in sentences(para)]

"""bAbI v1.2 reader: stories in the release's text format -> one QA sample per question.

Format (release README): one sentence per line, ``ID text``; IDs restart at 1 with every story;
question lines are ``ID question<TAB>answer<TAB>supporting IDs``. A sample is the non-question
sentences of the story that precede a question, the question and its answer. The answer is kept
exactly as written (qa8 lists ``apple,milk`` and qa19 pairs ``n,w`` are not split), because the
model is trained and scored on that string.

Every format problem raises :class:`BabiFormatError` naming the file, the line number and the line,
so a broken file is found at once rather than producing silently shifted samples.

``python -m lm2_jax.data.babi --count DIR`` prints the number of stories and samples per file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from lm2_jax.errors import DataError, MissingFileError

ASSETS = Path(__file__).parent / "assets"
VENDORED_BABI = ASSETS / "babi"

TASKS: dict[str, str] = {
    "qa1": "single-supporting-fact",
    "qa2": "two-supporting-facts",
    "qa3": "three-supporting-facts",
    "qa4": "two-arg-relations",
    "qa5": "three-arg-relations",
    "qa6": "yes-no-questions",
    "qa7": "counting",
    "qa8": "lists-sets",
    "qa9": "simple-negation",
    "qa10": "indefinite-knowledge",
    "qa11": "basic-coreference",
    "qa12": "conjunction",
    "qa13": "compound-coreference",
    "qa14": "time-reasoning",
    "qa15": "basic-deduction",
    "qa16": "basic-induction",
    "qa17": "positional-reasoning",
    "qa18": "size-reasoning",
    "qa19": "path-finding",
    "qa20": "agents-motivations",
}
SPLITS = ("train", "test")
_LINE = re.compile(r"(\d+) (\S.*)")


class BabiFormatError(DataError):
    """A bAbI file line that does not follow the v1.2 format."""

    def __init__(self, source: str, lineno: int, line: str, reason: str):
        super().__init__(f"{source}:{lineno}: {reason}: {line!r}")
        self.source, self.lineno, self.line, self.reason = source, lineno, line, reason


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a story: a statement, or a question with its answer and supporting IDs."""

    id: int
    text: str
    answer: str | None = None
    supporting: tuple[int, ...] = ()

    @property
    def is_question(self) -> bool:
        return self.answer is not None

    def format(self) -> str:
        """The line as the release writes it (questions: ``text<TAB>answer<TAB>ids``)."""
        if self.answer is None:
            return f"{self.id} {self.text}"
        return f"{self.id} {self.text}\t{self.answer}\t{' '.join(map(str, self.supporting))}"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question with the story statements before it.

    ``supporting`` indexes ``context`` (0-based), in the order the file lists the IDs.
    """

    task: str
    context: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]


def canonical_task(task: str) -> str:
    """``'qa1'``, ``'QA1'`` or ``'qa1_single-supporting-fact'`` -> ``'qa1'``; else ValueError."""
    name = str(task).strip().lower()
    key = name.split("_", 1)[0]
    if key in TASKS and name in (key, file_stem(key)):
        return key
    raise DataError(f"unknown bAbI task {task!r}; valid tasks: {', '.join(TASKS)}")


def expand_spec(spec: str, order: Sequence[str], canonical: Callable[[str], str], what: str,
                ranges: bool = True) -> list[str]:
    """Names from a comma-separated `spec` whose items are names or (with `ranges`) inclusive
    ranges "a-b" of `order`; `canonical` maps an item to its name (DataError if it is none).
    In order of appearance, each once; DataError for a backward range or an empty spec."""
    out = []
    for part in (p.strip() for p in str(spec).split(",") if p.strip()):
        ends = [canonical(x) for x in (part.split("-", 1) if ranges else [part])]
        a, b = order.index(ends[0]), order.index(ends[-1])
        if a > b:
            raise DataError(f"the range {part} runs backwards")
        out += list(order[a:b + 1])
    if not out:
        raise DataError(f"names no {what}")
    return list(dict.fromkeys(out))


def expand_tasks(spec: str) -> list[str]:
    """'qa1-qa5', 'qa1,qa3' or 'QA2' -> canonical task names, in order."""
    return expand_spec(spec, list(TASKS), canonical_task, "task")


def file_stem(task: str) -> str:
    """``'qa1'`` -> ``'qa1_single-supporting-fact'`` (the release's file name stem)."""
    return f"{task}_{TASKS[task]}"


def task_file(task: str, split: str, data_dir: str | Path | None = None) -> Path:
    """Path of a task's file; ``data_dir=None`` means the vendored copy inside the package.

    The vendored copies are gzip-compressed (``.txt.gz``); a directory of the release holds
    plain ``.txt``. Either is accepted in any directory.
    """
    task = canonical_task(task)
    if split not in SPLITS:
        raise DataError(f"unknown bAbI split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = Path(data_dir) if data_dir is not None else VENDORED_BABI
    name = f"{file_stem(task)}_{split}.txt"
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise MissingFileError(f"bAbI file not found: {root / name} (nor {name}.gz there)")


def read_text_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file, ``.gz`` transparently; FileNotFoundError names the path."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"bAbI file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return f.read().splitlines()


def parse_line(raw: str, source: str, lineno: int, statement_ids: set[int]) -> Line:
    """Parse one line; ``statement_ids`` are the story's earlier statement IDs (for checks)."""
    m = _LINE.fullmatch(raw)
    if m is None:
        raise BabiFormatError(source, lineno, raw, "expected 'ID text' (ID a positive integer)")
    line_id, rest = int(m.group(1)), m.group(2)
    if "\t" not in rest:
        return Line(line_id, rest.strip())
    fields = rest.split("\t")
    if len(fields) != 3:
        raise BabiFormatError(
            source, lineno, raw, f"question line needs 3 tab-separated fields, got {len(fields)}"
        )
    text, answer, ids = (field.strip() for field in fields)
    if not text or not answer:
        raise BabiFormatError(source, lineno, raw, "empty question or answer")
    if not re.fullmatch(r"\d+( \d+)*", ids):
        raise BabiFormatError(source, lineno, raw, "supporting facts must be space-separated IDs")
    supporting = tuple(int(i) for i in ids.split())
    unknown = [i for i in supporting if i not in statement_ids]
    if unknown:
        raise BabiFormatError(
            source, lineno, raw, f"supporting IDs {unknown} are not earlier statements of the story"
        )
    return Line(line_id, text, answer, supporting)


def parse_stories(lines: Iterable[str], source: str = "<string>") -> list[tuple[Line, ...]]:
    """Group lines into stories (a story starts at ID 1) and check the ID sequence."""
    stories: list[tuple[Line, ...]] = []
    current: list[Line] = []
    statement_ids: set[int] = set()
    for lineno, raw in enumerate(lines, start=1):
        if raw.strip() == "":
            raise BabiFormatError(source, lineno, raw, "blank line")
        if raw.startswith("1 ") and current:
            stories.append(tuple(current))
            current, statement_ids = [], set()
        line = parse_line(raw, source, lineno, statement_ids)
        expected = len(current) + 1
        if line.id != expected:
            raise BabiFormatError(source, lineno, raw, f"expected ID {expected} or 1, got {line.id}")
        if not line.is_question:
            statement_ids.add(line.id)
        current.append(line)
    if current:
        stories.append(tuple(current))
    return stories


def story_samples(story: Sequence[Line], task: str) -> list[Sample]:
    """One sample per question: earlier statements (earlier questions dropped) + the question."""
    samples = []
    context: list[str] = []
    index_of: dict[int, int] = {}
    for line in story:
        if line.is_question:
            assert line.answer is not None
            supporting = tuple(index_of[i] for i in line.supporting)
            samples.append(Sample(task, tuple(context), line.text, line.answer, supporting))
        else:
            index_of[line.id] = len(context)
            context.append(line.text)
    return samples


def format_story(story: Sequence[Line], task: str) -> list[str]:
    """Lines (with newline) exactly as the release writes them: questions end in ``"? "`` before
    the tab in every task but qa4."""
    space = "" if canonical_task(task) == "qa4" else " "
    return [
        (f"{line.id} {line.text}{space}\t{line.answer}\t{' '.join(map(str, line.supporting))}"
         if line.is_question else line.format()) + "\n"
        for line in story
    ]


def task_of_path(path: Path) -> str:
    """The task named by a release file name (``qa3_three-supporting-facts_test.txt`` -> qa3)."""
    return canonical_task(path.name.split("_", 1)[0])


def read_stories(path: str | Path) -> list[tuple[Line, ...]]:
    path = Path(path)
    return parse_stories(read_text_lines(path), str(path))


@functools.lru_cache(maxsize=64)
def _read_samples_cached(path: Path, mtime_ns: int) -> tuple[Sample, ...]:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    task = task_of_path(path)
    return tuple(s for story in read_stories(path) for s in story_samples(story, task))


def read_samples(path: str | Path) -> tuple[Sample, ...]:
    """All samples of a release file, in file order (cached per path and modification time)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"bAbI file not found: {path}")
    return _read_samples_cached(path.resolve(), path.stat().st_mtime_ns)


def load_task(task: str, split: str, data_dir: str | Path | None = None) -> tuple[Sample, ...]:
    """Samples of ``task`` (``'qa1'``…``'qa20'``) and ``split``; vendored files by default."""
    return read_samples(task_file(task, split, data_dir))


def count_dir(data_dir: str | Path) -> list[tuple[str, int, int]]:
    """(file name, stories, samples) for every ``qa*.txt`` / ``qa*.txt.gz`` in a directory."""
    files = sorted(Path(data_dir).glob("qa*.txt*"), key=lambda p: (int(p.name[2:].split("_")[0]), p.name))
    if not files:
        raise MissingFileError(f"no bAbI files (qa*.txt) in {data_dir}")
    rows = []
    for path in files:
        stories = read_stories(path)
        rows.append((path.name, len(stories), sum(len(story_samples(s, "")) for s in stories)))
    return rows


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm2_jax.data.babi", description=__doc__)
    parser.add_argument("--count", metavar="DIR", required=True, help="print stories/samples per file")
    args = parser.parse_args(argv)
    rows = count_dir(args.count)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'file':<{width}}  stories  samples")
    for name, n_stories, n_samples in rows:
        print(f"{name:<{width}}  {n_stories:>7}  {n_samples:>7}")


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)

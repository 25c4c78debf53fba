"""bAbI reader: the vendored files parse to 1,000 samples each; bad input fails naming file and line."""

from __future__ import annotations

import gzip

import pytest

from lm2_jax.data import babi

TASKS = [f"qa{i}" for i in range(1, 11)]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", babi.SPLITS)
def test_vendored_files_have_1000_samples(task, split):
    samples = babi.load_task(task, split)
    assert len(samples) == 1000
    for s in samples:
        assert s.task == task and s.question.endswith("?") and s.answer
        assert all(0 <= i < len(s.context) for i in s.supporting)
        assert not any("\t" in c or c != c.strip() for c in s.context)


def test_sample_is_preceding_statements_of_its_story():
    stories = babi.read_stories(babi.task_file("qa1", "test"))
    first = stories[0]
    samples = babi.story_samples(first, "qa1")
    assert len(samples) == 5
    # Sample 2 (third question of the story): all 6 statements before it, questions removed.
    assert samples[2].context == tuple(line.text for line in first[:8] if not line.is_question)
    assert len(samples[2].context) == 6
    assert (samples[0].question, samples[0].answer) == ("Where is John?", "hallway")
    assert samples[0].context[samples[0].supporting[0]] == "John travelled to the hallway."


def test_list_and_pair_answers_are_kept_as_given():
    answers = {s.answer for s in babi.load_task("qa8", "train")}
    assert "apple,milk" in answers and "milk,apple" in answers and "nothing" in answers


def test_format_story_reproduces_the_release_bytes():
    for task in ("qa1", "qa4", "qa8"):
        path = babi.task_file(task, "test")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            raw = f.read()
        written = "".join(line for story in babi.read_stories(path) for line in babi.format_story(story, task))
        assert written == raw


def test_parses_other_tasks_and_plain_text_files(tmp_path):
    # qa19 (pairs such as "n,w") and a plain .txt file in a release-style directory.
    text = ("1 The office is east of the hallway.\n2 The kitchen is north of the office.\n"
            "3 How do you go from the hallway to the kitchen?\te,n\t1 2\n")
    (tmp_path / "qa19_path-finding_test.txt").write_text(text)
    [sample] = babi.load_task("qa19", "test", tmp_path)
    assert sample.answer == "e,n" and sample.supporting == (0, 1)
    assert babi.count_dir(tmp_path) == [("qa19_path-finding_test.txt", 1, 1)]


def test_task_names():
    assert babi.canonical_task("QA3") == "qa3"
    assert babi.canonical_task("qa3_three-supporting-facts") == "qa3"
    assert babi.file_stem("qa20") == "qa20_agents-motivations"


@pytest.mark.parametrize("bad", ["qa0", "qa21", "babi1", "qa1_two-supporting-facts", ""])
def test_unknown_task_names_the_valid_choices(bad):
    with pytest.raises(ValueError, match=r"unknown bAbI task .*valid tasks: qa1, qa2, .*qa20"):
        babi.canonical_task(bad)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown bAbI split 'valid'"):
        babi.task_file("qa1", "valid")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"qa2_two-supporting-facts_train\.txt"):
        babi.load_task("qa2", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        babi.read_samples(tmp_path / "nothing.txt")
    with pytest.raises(FileNotFoundError, match="no bAbI files"):
        babi.count_dir(tmp_path)


GOOD = ["1 Mary moved to the bathroom.", "2 John went to the hallway.", "3 Where is Mary? \tbathroom\t1"]


@pytest.mark.parametrize(
    ("lineno", "line", "reason"),
    [
        (2, "John went to the hallway.", "expected 'ID text'"),
        (2, "x2 John went to the hallway.", "expected 'ID text'"),
        (2, "5 John went to the hallway.", "expected ID 2 or 1, got 5"),
        (3, "3 Where is Mary?\tbathroom", "needs 3 tab-separated fields, got 2"),
        (3, "3 Where is Mary?\t\t1", "empty question or answer"),
        (3, "3 Where is Mary?\tbathroom\tone", "supporting facts must be space-separated IDs"),
        (3, "3 Where is Mary?\tbathroom\t7", r"supporting IDs \[7\] are not earlier statements"),
        (2, "", "blank line"),
    ],
)
def test_malformed_line_names_file_line_and_content(tmp_path, lineno, line, reason):
    lines = list(GOOD)
    lines[lineno - 1] = line
    path = tmp_path / "qa1_single-supporting-fact_test.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(babi.BabiFormatError, match=reason) as err:
        babi.read_samples(path)
    assert str(err.value).startswith(f"{path}:{lineno}: ")
    assert repr(line) in str(err.value)
    assert (err.value.source, err.value.lineno, err.value.line) == (str(path), lineno, line)


def test_supporting_fact_must_not_point_at_a_question(tmp_path):
    path = tmp_path / "qa1_single-supporting-fact_test.txt"
    path.write_text("\n".join([*GOOD, "4 Where is John? \thallway\t3"]) + "\n")
    with pytest.raises(babi.BabiFormatError, match=r":4: supporting IDs \[3\]"):
        babi.read_samples(path)


def test_count_cli(capsys):
    babi._main(["--count", str(babi.VENDORED_BABI)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "stories", "samples"]
    rows = [line.split() for line in out[1:]]
    assert ["qa1_single-supporting-fact_test.txt.gz", "200", "1000"] in rows
    assert len(rows) == 20 and all(r[2] == "1000" for r in rows)

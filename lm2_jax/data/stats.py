"""Generated vs real bAbI statistics per task (qa1–qa10): sentences per sample and answers.

    python -m lm2_jax.data.stats [--real-dir DIR] [--stories N] [--seed S]

``DIR`` defaults to the vendored ``en`` train files (the first 1,000 questions of each ``en-10k``
train file); pass ``.../tasks_1-20_v1-2/en-10k`` for the full 10k files. A task missing there (qa3
in the release) falls back to the vendored file, which the ``real from`` column says.

The generator is meant to reproduce the release's story shape, so the median number of context
sentences per sample should agree within 20% (``ok`` column); the answer columns show the five most
frequent answers of each side and their total-variation distance (0 = same distribution).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path

from lm2_jax.data import babi, babi_gen


@dataclasses.dataclass(frozen=True)
class TaskStats:
    task: str
    real_from: str
    real_n: int
    gen_n: int
    real_median: float
    gen_median: float
    real_quartiles: tuple[float, float]
    gen_quartiles: tuple[float, float]
    real_answers: dict[str, float]
    gen_answers: dict[str, float]

    @property
    def median_ratio(self) -> float:
        return self.gen_median / self.real_median

    @property
    def answer_tv(self) -> float:
        keys = set(self.real_answers) | set(self.gen_answers)
        return 0.5 * sum(abs(self.real_answers.get(k, 0) - self.gen_answers.get(k, 0)) for k in keys)


def _quartiles(values: Sequence[int]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _shares(samples: Sequence[babi.Sample]) -> dict[str, float]:
    counts = collections.Counter(s.answer for s in samples)
    return {k: v / len(samples) for k, v in counts.most_common()}


def real_samples(task: str, real_dir: str | Path | None) -> tuple[str, tuple[babi.Sample, ...]]:
    """(where from, samples) of the real train file; vendored ``en`` train if ``real_dir`` lacks it."""
    if real_dir is not None:
        try:
            path = babi.task_file(task, "train", real_dir)
            return path.parent.name, babi.read_samples(path)
        except FileNotFoundError:
            pass
    return "vendored en", babi.load_task(task, "train")


def task_stats(task: str, real_dir: str | Path | None, stories: int, seed: int) -> TaskStats:
    source, real = real_samples(task, real_dir)
    gen = [s for i in range(stories) for s in babi_gen.generate_samples(task, seed, i)]
    real_len = [len(s.context) for s in real]
    gen_len = [len(s.context) for s in gen]
    return TaskStats(
        task, source, len(real), len(gen), statistics.median(real_len), statistics.median(gen_len),
        _quartiles(real_len), _quartiles(gen_len), _shares(real), _shares(gen),
    )


def _top(shares: dict[str, float], k: int = 5) -> str:
    return " ".join(f"{a}:{100 * p:.0f}%" for a, p in list(shares.items())[:k])


def format_table(rows: Sequence[TaskStats]) -> str:
    head = (f"{'task':<5} {'real median (q1-q3)':>20} {'gen median (q1-q3)':>19} {'ratio':>6} {'ok':>3} "
            f"{'ans TV':>6}  real answers | generated answers  [real from, n; generated n]")
    out = [head]
    for r in rows:
        real = f"{r.real_median:.0f} ({r.real_quartiles[0]:.0f}-{r.real_quartiles[1]:.0f})"
        gen = f"{r.gen_median:.0f} ({r.gen_quartiles[0]:.0f}-{r.gen_quartiles[1]:.0f})"
        ok = "yes" if abs(r.median_ratio - 1) <= 0.2 else "NO"
        out.append(
            f"{r.task:<5} {real:>20} {gen:>19} {r.median_ratio:>6.2f} {ok:>3} {r.answer_tv:>6.3f}  "
            f"{_top(r.real_answers)} | {_top(r.gen_answers)}  [{r.real_from}, {r.real_n}; {r.gen_n}]"
        )
    return "\n".join(out)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm2_jax.data.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-dir", default=None, help="directory of the release's train files")
    parser.add_argument("--stories", type=int, default=2000, help="generated stories per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(babi_gen.GENERATED_TASKS))
    args = parser.parse_args(argv)
    rows = [task_stats(t, args.real_dir, args.stories, args.seed) for t in args.tasks.split(",")]
    print(format_table(rows))


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)

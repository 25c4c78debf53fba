"""Curriculum training (BABILong's recipe): stages of longer and longer samples, more segments each.

    --config.train.curriculum="0k:256:300,1k:1280:300,2k:2304:0"

Each stage is `length:seq_len:steps`: the stage trains on `data.babilong_length=length` rows of
`data.seq_len=seq_len` tokens for `steps` optimizer steps (0 in the last stage: until
`train.steps`). With `train.curriculum_threshold` > 0 a stage also ends early, at an evaluation
(`train.eval_every`), once exact match on `CHECK_ROWS` held-out rows of the stage's own data
(generated with another seed) reaches the threshold. The parameters, optimizer and learning-rate
schedule run on across stages; each stage has its own data iterator (seed `data.seed` + stage).

Resuming: where each finished stage ended is written to `<workdir>/curriculum.json` before the
checkpoint of that step, and a checkpoint taken at a stage's last step holds that stage's iterator,
so a restarted run rebuilds the stage it stopped in and continues exactly.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from lm2_jax.data import babilong
from lm2_jax.errors import ConfigError
from lm2_jax.train import paths

CHECK_ROWS = 64  # held-out rows scored for the early-end threshold
CHECK_SEED = 1_000_003  # offset of the held-out rows' data seed


@dataclasses.dataclass(frozen=True)
class Stage:
    length: str
    seq_len: int
    steps: int  # 0: until train.steps (the last stage only)


def parse(spec: str) -> list[Stage]:
    """`train.curriculum` -> stages; '' -> [] (no curriculum)."""
    stages = []
    for i, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        fields = part.split(":")
        try:
            length, seq_len, steps = fields[0].strip().lower(), int(fields[1]), int(fields[2])
            ok = len(fields) == 3 and length in babilong.LENGTHS and seq_len >= 8 and steps >= 0
        except (IndexError, ValueError):
            ok = False
        if not ok:
            raise ConfigError("train.curriculum", spec, f"stage {i + 1} ({part!r}) must be length:seq_len:steps, e.g. "
                              f"1k:1280:300 (lengths {', '.join(babilong.LENGTHS)}; steps 0 = until train.steps)")
        stages.append(Stage(length, seq_len, steps))
    if any(s.steps == 0 for s in stages[:-1]):
        raise ConfigError("train.curriculum", spec, "only the last stage may have steps 0 (until train.steps)")
    return stages


def validate(config: ml_collections.ConfigDict) -> list[Stage]:
    stages = parse(config.train.curriculum)
    if stages:
        if not config.data.source.startswith("babilong"):
            raise ConfigError("train.curriculum", config.train.curriculum,
                              f"stages set data.babilong_length; data.source={config.data.source!r} is not a "
                              "babilong source")
        if config.train.curriculum_threshold > 0 and not config.train.eval_every:
            raise ConfigError("train.eval_every", 0, "train.curriculum_threshold is checked every eval_every steps")
        planned = sum(s.steps for s in stages)
        if planned > config.train.steps or (stages[-1].steps and planned != config.train.steps):
            raise ConfigError("train.curriculum", config.train.curriculum,
                              f"its stages take {planned} steps; train.steps={config.train.steps} (end the last "
                              "stage with steps 0 to run it until train.steps)")
    return stages


def stage_data(config: ml_collections.ConfigDict, stages: list[Stage], index: int, held_out: bool = False):
    """The data section of stage `index` (its held-out check rows with `held_out`)."""
    data = config.data.copy_and_resolve_references()
    data.babilong_length, data.seq_len = stages[index].length, stages[index].seq_len
    data.seed = config.data.seed + index + (CHECK_SEED if held_out else 0)
    return data


class Schedule:
    """Which stage each step belongs to; stage ends that came early (the threshold) are kept in
    `<workdir>/curriculum.json` so a restart puts every step in the same stage."""

    def __init__(self, stages: list[Stage], total_steps: int, workdir: str):
        self.stages, self.total, self.path = stages, total_steps, paths.workdir_path(workdir) / "curriculum.json"
        self.early: dict[int, int] = {}
        if self.path.is_file():
            self.early = {int(k): int(v) for k, v in json.loads(self.path.read_text())["early_ends"].items()}

    def end(self, index: int) -> int:
        """The last step of stage `index`."""
        start = 0 if index == 0 else self.end(index - 1)
        if index in self.early:
            return self.early[index]
        steps = self.stages[index].steps
        return self.total if steps == 0 or index == len(self.stages) - 1 else min(start + steps, self.total)

    def stage_of(self, step: int) -> int:
        """The stage whose iterator produced the batch of `step` (1-based; 0 -> the first stage)."""
        for i in range(len(self.stages)):
            if step <= self.end(i):
                return i
        return len(self.stages) - 1

    def end_early(self, index: int, step: int, lead: bool) -> None:
        self.early[index] = step
        if lead:
            self.path.write_text(json.dumps({"early_ends": {str(k): v for k, v in self.early.items()}}))

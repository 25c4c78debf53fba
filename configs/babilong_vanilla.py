"""The vanilla model of the BABILong comparison (`lm2_jax.experiments.babilong`), trained alone:

    python -m lm2_jax.train --config=configs/babilong_vanilla.py --workdir=runs/babilong/vanilla

The backbone, data and curriculum are the experiment's (`babilong.model_config("vanilla")`, tasks
qa1-qa5 mixed, curriculum 0k -> 1k -> 2k with 4M training tokens in equal shares);
`python -m lm2_jax.experiments.babilong` trains all three this way and evaluates them. Its
figures, measured on 2 CPU cores on 2026-12-01 (docs/results/babilong_cpu.md):
average exact match over qa1-qa5 7.2 / 12.0 / 12.0 % at 0k / 1k / 2k with full attention and
7.2 / 12.0 / 12.0 / 12.0 / 12.0 / 8.0 % at 0k..16k in segments of 128 without memory (16.0 min of training).
At this budget all three models stay at chance (the README's Results say why).
"""

from lm2_jax.data import babi
from lm2_jax.experiments import babilong


def get_config():
    return babilong.comparison_config("vanilla", babi.expand_tasks("qa1-qa5"),
                                      babilong.parse_train_lengths("0k-2k"), 4e6)

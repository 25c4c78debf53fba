"""The rmt model of the BABILong comparison (`lm2_jax.experiments.babilong`), trained alone:

    python -m lm2_jax.train --config=configs/babilong_rmt.py --workdir=runs/babilong/rmt

The backbone, data and curriculum are the experiment's (`babilong.model_config("rmt")`, tasks
qa1-qa5 mixed, curriculum 0k -> 1k -> 2k with 4M training tokens in equal shares);
`python -m lm2_jax.experiments.babilong` trains all three this way and evaluates them. Its
figures, measured on 2 CPU cores on 2026-12-01 (docs/results/babilong_cpu.md):
average exact match over qa1-qa5 14.4 / 14.4 / 14.4 / 14.4 / 14.4 / 13.6 % at 0k / 1k / 2k / 4k / 8k / 16k
(12.9 min of training; qa1 0k test 0.160 at the end of training).
At this budget all three models stay at chance (the README's Results say why).
"""

from lm2_jax.data import babi
from lm2_jax.experiments import babilong


def get_config():
    return babilong.comparison_config("rmt", babi.expand_tasks("qa1-qa5"),
                                      babilong.parse_train_lengths("0k-2k"), 4e6)

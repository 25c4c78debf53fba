"""The rmt model of the BABILong comparison (`lm2_jax.experiments.babilong`), trained alone:

    python -m lm2_jax.train --config=configs/babilong_rmt.py --workdir=runs/babilong/rmt

The backbone, data and curriculum are the experiment's (`babilong.model_config("rmt")`, tasks
qa1-qa5 mixed, curriculum 0k -> 1k -> 2k with 4M training tokens in equal shares);
`python -m lm2_jax.experiments.babilong` trains all three this way and evaluates them. Its
figures, measured on 2 CPU cores: docs/results/babilong_cpu.md.
"""

from lm2_jax.experiments import babilong


def get_config():
    config = babilong.model_config("rmt")
    config.data.task = "qa1-qa5"
    config.train.curriculum, config.train.steps = babilong.curriculum(
        babilong.parse_train_lengths("0k-2k"), 4e6, config.data.batch_size, babilong.SEGMENT)
    return config

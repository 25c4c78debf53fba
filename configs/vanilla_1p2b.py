"""Vanilla Llama-3.2-1B (L_m = 0): the paper's baseline, loadable from Hugging Face weights.

    python -m lm2_jax.model.summary --config=configs/vanilla_1p2b.py

prints a per-module parameter table ending in `total ... 1.24B`.
"""

from lm2_jax import config as cfglib


def get_config():
    config = cfglib.defaults()
    cfglib.llama32_1b_backbone(config.model)
    config.model.memory.layers = 0
    return config

"""The paper's LM2-1.7B: the Llama-3.2-1B backbone with memory in all 16 blocks and N = 2048 slots.

    python -m lm2_jax.model.summary --config=configs/lm2_1p7b.py

prints a per-module parameter table ending in `total ... 1.71B` (1.24B backbone + 0.47B memory:
seven 2048 x 2048 matrices in each of the 16 blocks).
"""

from lm2_jax import config as cfglib


def get_config():
    config = cfglib.defaults()
    cfglib.llama32_1b_backbone(config.model)
    mem = config.model.memory
    mem.layers, mem.slots, mem.heads, mem.segment_len = 16, 2048, 32, 1024
    return config

"""Tiny LM2: the CPU default (2 layers, D=128, memory in block 1, 16 slots, segments of 64).

Print its parameter table:
    python -m lm2_jax.model.summary --config=configs/tiny.py
which should end with `total  1,557,376  1.56M` (two thirds of it the 8192 x 128 tied embedding).
"""

from lm2_jax import config as cfglib


def get_config():
    config = cfglib.defaults()
    m = config.model
    m.vocab_size = 8192
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 128, 2, 4, 2, 384
    m.memory.layers, m.memory.slots, m.memory.heads, m.memory.segment_len = 1, 16, 4, 64
    return config

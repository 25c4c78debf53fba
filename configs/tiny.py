"""Tiny LM2, the CPU default: trains on generated bAbI qa1 stories, scores on the real qa1 test file.

    python -m lm2_jax.train                      # = --config=configs/tiny.py --workdir=runs/tiny

runs in 6 to 9 minutes on 2 CPU cores and ends with a line (measured 2026-11-23)
`final: step 800  train loss 0.6961  qa1 test answer loss 0.6494  exact-match accuracy 0.443 (1000 samples)`
(chance is about 1/6: qa1 answers are one of six rooms).

The model: 2 blocks, D=128, memory in block 1 (16 slots), segments of 40 tokens so a qa1 sample
(45 tokens median, 74 max) spans two segments and facts reach the question through the memory or
the local attention. `python -m lm2_jax.model.summary` prints its table (1.56M parameters, two
thirds of them the 8192 x 128 tied embedding).
"""

from lm2_jax import config as cfglib


def get_config():
    config = cfglib.defaults()
    m = config.model
    m.vocab_size = 8192
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 128, 2, 4, 2, 384
    m.memory.layers, m.memory.slots, m.memory.heads, m.memory.segment_len = 1, 16, 4, 40

    d = config.data
    d.source, d.task, d.seq_len, d.batch_size = "babi_generated", "qa1", 80, 32

    t = config.train
    t.steps, t.lr, t.warmup_steps = 800, 3e-3, 50
    t.checkpoint_every, t.log_every = 200, 10
    t.eval_task, t.eval_samples = "qa1", 1000
    return config

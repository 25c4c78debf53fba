"""The paper's LM2-1.7B: the Llama-3.2-1B backbone with memory in all 16 blocks and N = 2048 slots.

    python -m lm2_jax.model.summary --config=configs/lm2_1p7b.py

prints a per-module parameter table ending in `total ... 1.71B` (1.24B backbone + 0.47B memory:
seven 2048 x 2048 matrices in each of the 16 blocks).

Starting from Llama-3.2-1B weights you have (the paper's backbone; set `data.tokenizer` to its
tokenizer.json):

    python -m lm2_jax.export --from_hf=path/to/Llama-3.2-1B --config=configs/lm2_1p7b.py --workdir=runs/init
    python -m lm2_jax.train --config=configs/lm2_1p7b.py --config.train.init_from=runs/init --workdir=runs/lm2

On a random folder with Llama-3.2-1B's shapes (2 cores, 2026-12-01), with
`--config.model.dtype=float32 --config.model.memory.segment_len=16` added, the import printed
`/tmp/big/init/checkpoints/0: LM2, memory in 16 of 16 blocks, 2048 slots, segments of 16; 11 arrays
from /tmp/big/llama, 9 freshly initialised (seed 0)` after 55 s (README "Take it to PyTorch").
"""

from lm2_jax import config as cfglib


def get_config():
    config = cfglib.defaults()
    cfglib.llama32_1b_backbone(config.model)
    mem = config.model.memory
    mem.layers, mem.slots, mem.heads, mem.segment_len = 16, 2048, 32, 1024
    return config

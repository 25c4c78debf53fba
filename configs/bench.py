"""The benchmark model of `python -m lm2_jax.bench` (docs/design.md §7): D=512, 8 layers, 8 heads,
4 KV heads, FFN 1536, vocab 8192, batches of 8 x 1024 tokens, float32.

    python -m lm2_jax.bench                                   # times LM2 and its vanilla peer, JSON lines
    python -m lm2_jax.bench --config.model.d_model=256        # both variants with the override
    python -m lm2_jax.train --config=configs/bench.py         # trains the LM2 variant (slow on a CPU)
    python -m lm2_jax.train --config=configs/bench.py:vanilla # trains the vanilla one

`get_config()` (`:lm2`) puts memory (128 slots, 8 heads) in all 8 blocks and processes the 1024
tokens as two 512-token segments. Segments are not rematerialised: the activations of two segments
fit, and recomputing them would cost a third forward pass that MFU does not credit; the two are
unrolled (`memory.unroll_segments=2`: a scan copied their saved activations into stacked buffers,
a fifth of the step). The bench
takes this config and derives the vanilla Llama from it (`lm2_jax.bench.cases.vanilla_of`: L_m = 0
and full 1024-token attention, everything else, overrides included, unchanged); `:vanilla` here is
the same model, for training it (tests/test_bench_cli.py checks the two agree).
"""

from lm2_jax import config as cfglib


def get_config(variant: str = "lm2"):
    if variant not in ("lm2", "vanilla"):
        raise cfglib.ConfigError("configs/bench.py variant", variant, "must be 'lm2' or 'vanilla'")
    config = cfglib.defaults()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 8192, 512, 8, 8, 4, 1536
    if variant == "lm2":
        m.memory.layers, m.memory.slots, m.memory.heads, m.memory.segment_len = 8, 128, 8, 512
        m.memory.remat_segments = False
        m.memory.unroll_segments = 2
    d = config.data
    d.source, d.mode, d.seq_len, d.batch_size = "babi_generated", "pack", 1024, 8
    return config

"""Benchmarks: `python -m lm2_jax.bench` (see `__main__`), the FLOP counter, the PyTorch peer."""

"""lm2-jax: LM2 (Large Memory Models) in JAX/Flax."""

__version__ = "0.1.0"

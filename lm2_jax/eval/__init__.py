"""Evaluation: BABILong by generation, memory maps, plots, MMLU-format multiple choice, perplexity."""

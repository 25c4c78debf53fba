"""`python -m lm2_jax.train`: train LM2 from an ml_collections config.

    python -m lm2_jax.train                                   # configs/tiny.py, workdir runs/tiny
    python -m lm2_jax.train --config=configs/tiny.py --config.train.steps=200 --workdir=runs/x

Re-running the same command resumes from the newest checkpoint in the workdir. On Linux the
process re-executes itself once with huge-page malloc for XLA's temporaries (`lm2_jax.runtime`;
`LM2_NO_MALLOC_TUNING=1` turns that off).
"""

from __future__ import annotations

from absl import flags

from lm2_jax import cli
from lm2_jax.config import checkout_config

_CONFIG = cli.config_flag(checkout_config("tiny.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints, metrics.jsonl and TensorBoard events go here.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 for multi-process runs "
                                   "(or LM2_COORDINATOR); TPU pods and SLURM are detected without it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (or LM2_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (or LM2_PROCESS_ID).")


def final_lines(config, result: dict) -> str:
    """The run's last two lines: where the test facts sit relative to the segments, then the score
    with the model named, so a reader knows what scored what."""
    from lm2_jax import config as cfglib
    from lm2_jax.data import tokenizer as toklib
    from lm2_jax.train import evaluate

    t, S = config.train, config.model.memory.segment_len
    if S:
        whole, part = evaluate.fact_share(t.eval_task, toklib.load_tokenizer(config.data.tokenizer or None), S,
                                          t.eval_samples)
        where = (f"{t.eval_task} test: the supporting facts lie wholly in an earlier segment than the answer "
                 f"for {whole:.1%} of questions (partly for {part:.1%})")
    else:
        where = f"{t.eval_task} test: one segment, every fact is in the answer's segment"
    return (f"{where}\nfinal: {cfglib.describe_model(config.model)}: step {result['step']}  "
            f"train loss {result.get('loss', float('nan')):.4f}  {t.eval_task} test answer loss "
            f"{result['eval_loss']:.4f}  exact-match accuracy {result['exact_match']:.3f} "
            f"({result['samples']} samples){_split(result)}")


def heldout_line(config, result: dict) -> str:
    """The last line of a run with a held-out set (data.eval_paths): its loss and perplexity."""
    from lm2_jax import config as cfglib

    return (f"final: {cfglib.describe_model(config.model)}: step {result['step']}  train loss "
            f"{result.get('loss', float('nan')):.4f}  held-out loss {result['heldout_loss']:.4f}  perplexity "
            f"{result['heldout_perplexity']:.2f} ({result['heldout_rows']} rows of {config.data.seq_len} tokens)")


def _split(result: dict) -> str:
    if "exact_match_earlier" not in result:
        return ""
    parts = [f"{result['exact_match_earlier']:.3f} on the {result['samples_earlier']} questions whose facts lie "
             "wholly in earlier segments"]
    for name, where in (("straddling", "straddle a segment boundary"), ("inside", "lie inside the answer's segment")):
        if f"exact_match_{name}" in result:
            parts.append(f"{result[f'exact_match_{name}']:.3f} on the {result[f'samples_{name}']} whose facts {where}")
    return "\nmemory: exact match " + ", ".join(parts)


def main(argv) -> int:
    cli.no_extra_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    from lm2_jax import parallel
    from lm2_jax.train import loop

    # Before anything touches a JAX backend: multi-process runs must initialise first.
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = loop.train(_CONFIG.value, _WORKDIR.value)
    import jax

    if jax.process_index() == 0:
        if "exact_match" in result:
            print(final_lines(_CONFIG.value, result))
        if "heldout_perplexity" in result:
            print(heldout_line(_CONFIG.value, result))
    return 0


if __name__ == "__main__":
    from lm2_jax import runtime

    runtime.reexec_with_hugepage_malloc("lm2_jax.train")
    cli.run(main)

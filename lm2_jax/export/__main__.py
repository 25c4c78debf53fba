"""`python -m lm2_jax.export`: hand a trained model to PyTorch, or start LM2 from Llama weights.

    python -m lm2_jax.export --workdir=runs/tiny --out=export/tiny [--step=K] [--dtype=bfloat16]
        [--max_shard_size=5GB] [--overwrite]
    python -m lm2_jax.export --from_hf=path/to/Llama-3.2-1B --config=configs/lm2_1p7b.py --workdir=runs/init
    python -m lm2_jax.train --config=configs/lm2_1p7b.py --config.train.init_from=runs/init --workdir=runs/lm2

The first writes a Hugging Face folder (`lm2_jax.export.to_hf`); a vanilla Llama loads with
`transformers.LlamaForCausalLM.from_pretrained(out)`, LM2 and RMT with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`. The second writes a step-0
workdir whose backbone is the Llama folder's and whose memory is fresh (`lm2_jax.export.from_hf`).
Nothing is downloaded: the Llama folder is one you already have.
"""

from __future__ import annotations

import sys

from absl import flags

from lm2_jax import cli

_CONFIG = cli.config_flag(None, "With --from_hf: the model config the Llama weights start (e.g. configs/lm2_1p7b.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir to export; with --from_hf, the workdir to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face folder to write.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the exported weights.")
_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file (e.g. 5GB, 500MB); larger "
                             "exports are sharded with a model.safetensors.index.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (or --from_hf's workdir checkpoints).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "A Hugging Face Llama folder (config.json + safetensors) to import.")


def main(argv) -> int:
    from absl import logging as absl_logging

    from lm2_jax import config as cfglib
    from lm2_jax.errors import UsageError

    cli.no_extra_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    if not _WORKDIR.value:
        raise UsageError("--workdir is required (the workdir to export, or with --from_hf the one to write)")
    if _FROM_HF.value:
        from lm2_jax.export import from_hf

        if _CONFIG.value is None:
            raise UsageError("--from_hf needs --config (the model the Llama weights start, e.g. configs/lm2_1p7b.py)")
        if _OUT.value or _STEP.value is not None:
            raise UsageError("--out and --step belong to exporting a workdir, not to --from_hf")
        config = cfglib.validate(_CONFIG.value)
        got = from_hf.import_hf(_FROM_HF.value, config, _WORKDIR.value, overwrite=_OVERWRITE.value)
        print(f"{got['checkpoint']}: {cfglib.describe_model(config.model)}; {got['from_hf']} arrays from "
              f"{_FROM_HF.value}, {got['fresh']} freshly initialised (seed {config.train.seed})")
        print(f"train from it: python -m lm2_jax.train --config=<the same config> "
              f"--config.train.init_from={_WORKDIR.value} --workdir=<a new workdir>")
        return 0
    from lm2_jax.export import to_hf

    if _CONFIG.value is not None:
        raise UsageError("--config belongs to --from_hf; an export reads the workdir's own config.json")
    if not _OUT.value:
        raise UsageError("--out is required: the Hugging Face folder to write")
    got = to_hf.export(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value, _SHARD.value, _OVERWRITE.value)
    loader = ("AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)" if got["remote_code"]
              else "LlamaForCausalLM.from_pretrained(out)")
    print(f"{got['out']}: step {got['step']}, {got['bytes'] / 1e6:.1f} MB of {_DTYPE.value} weights in "
          f"{sum(f.endswith('.safetensors') for f in got['files'])} file(s); load with {loader}")
    return 0


if __name__ == "__main__":
    cli.run(main)
    sys.exit(0)

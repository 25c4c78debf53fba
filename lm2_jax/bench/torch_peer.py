"""The PyTorch peer: Hugging Face `LlamaForCausalLM` + `torch.optim.AdamW`, one train step timed.

Run by `python -m lm2_jax.bench` in a child process (so PyTorch's and XLA's thread pools never
share one), given the vanilla model section as JSON; it takes no config file. By hand:

    python -m lm2_jax.bench.torch_peer --batch=8 --seq_len=1024       # configs/bench.py's vanilla model
    python -m lm2_jax.bench.torch_peer --model_json='{"vocab_size": 8192, ...}' --steps=3

prints one JSON object: seconds per step (best of the timed steps), tokens/s, thread count.
`--model_json` is a `model` section as `config.model.to_json()` writes it (the fields
`lm2_jax.export.hf.hf_config` reads); the model is built from it by `hf_config`, so both sides
have the same shapes; attention is PyTorch's fused `sdpa` (causal), the loss the mean next-token
cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lm2_jax.errors import UsageError


def step_time(model_cfg, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    try:
        import torch
        import transformers
    except ImportError as e:  # the benchmark reports this as the figure's error
        raise SystemExit(f"torch_peer needs PyTorch and transformers: pip install -e '.[bench]' ({e})") from e
    from lm2_jax.export import hf

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = transformers.LlamaConfig(**hf.hf_config(model_cfg), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(4, model_cfg.vocab_size, (batch, seq_len))

    def one():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    one()  # warm-up: allocator, optimizer state
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"step_s": best, "tokens_per_s": batch * seq_len / best, "times": times, "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _default_model():
    """The vanilla model section of the checkout's `configs/bench.py`."""
    import importlib.util

    from lm2_jax.bench import cases
    from lm2_jax.config import checkout_config

    spec = importlib.util.spec_from_file_location("_bench_config", checkout_config("bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cases.vanilla_of(module.get_config()).model


def main(argv=None) -> int:
    import ml_collections

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_json", default="", help="the model section as JSON (default: configs/bench.py's vanilla)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    if a.model_json:
        try:
            model_cfg = ml_collections.ConfigDict(json.loads(a.model_json))
        except json.JSONDecodeError as e:
            raise UsageError(f"--model_json: not JSON ({e})") from e
    else:
        model_cfg = _default_model()
    try:
        result = step_time(model_cfg, a.batch, a.seq_len, a.steps, a.threads)
    except SystemExit as e:  # missing PyTorch: the benchmark prints this as the figure's error
        result = {"error": str(e)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(main)

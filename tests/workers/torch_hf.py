"""Loads exported folders the way a PyTorch user would, in its own process (run with
HF_HUB_OFFLINE=1, a private HF_MODULES_CACHE and a working directory outside the checkout; it
imports neither jax nor lm2_jax), and saves what they compute.

    python tests/workers/torch_hf.py spec.json

spec.json: [{"dir", "loader": "auto" | "llama", "tokens": a .npy of (B, T) ids, "out": a .npz path,
"prompts": [[ids...], ...] (optional, greedy `generate` per prompt), "max_new_tokens",
"left_padded_batch": bool (also generate all prompts as one left-padded batch)}].
The .npz holds logits, memory (LM2/RMT), gen_<i> per prompt and batch_<i> per row.
"""

import json
import sys

import numpy as np
import torch
import transformers


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    for case in spec:
        if case["loader"] == "llama":
            model = transformers.LlamaForCausalLM.from_pretrained(case["dir"], dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True,
                                                                      dtype=torch.float32)
        model.eval()
        out = {"class": np.array(type(model).__module__ + "." + type(model).__name__)}
        with torch.no_grad():
            result = model(torch.as_tensor(np.load(case["tokens"])))
            out["logits"] = result.logits.float().numpy()
            if getattr(result, "memory", None) is not None:
                out["memory"] = result.memory.numpy()
            for i, prompt in enumerate(case.get("prompts", [])):
                ids = torch.as_tensor([prompt])
                gen = model.generate(ids, max_new_tokens=case["max_new_tokens"], do_sample=False)
                out[f"gen_{i}"] = gen[0, len(prompt):].numpy()
            if case.get("left_padded_batch"):
                prompts = case["prompts"]
                L = max(map(len, prompts))
                ids = torch.zeros((len(prompts), L), dtype=torch.long)
                mask = torch.zeros((len(prompts), L), dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, L - len(p):], mask[i, L - len(p):] = torch.as_tensor(p), 1
                gen = model.generate(ids, attention_mask=mask, max_new_tokens=case["max_new_tokens"], do_sample=False)
                for i in range(len(prompts)):
                    out[f"batch_{i}"] = gen[i, L:].numpy()
        np.savez(case["out"], **out)
    assert "jax" not in sys.modules and "lm2_jax" not in sys.modules, "the PyTorch side imported jax"
    print(json.dumps({"transformers": transformers.__version__, "cases": len(spec)}))


if __name__ == "__main__":
    main(sys.argv[1])

"""The paper's LM2-1.7B (configs/lm2_1p7b.py) pretrained on token shards: the pod-scale input path.

Tokenise the corpus once (SmolLM-Corpus in the paper; any txt / jsonl / parquet files) with the
Llama-3 tokenizer, a training and a held-out set:

    python -m lm2_jax.data.prepare --input='gs://B/smollm/train-*.parquet' --tokenizer=llama3/tokenizer.json \\
        --out=gs://B/smollm-llama3/train --workers=32
    python -m lm2_jax.data.prepare --input='gs://B/smollm/heldout-*.parquet' --tokenizer=llama3/tokenizer.json \\
        --out=gs://B/smollm-llama3/heldout

then train on a pod with the bucket mounted by gcsfuse at /gcs/B on every host (array_record reads
files; every host streams its own records; the iterator position is in the checkpoint):

    launch/tpu_pod.sh --name lm2 --zone us-east5-a --type v5p-128 --create --workdir gs://B/runs/lm2-pretrain \\
        -- --config=configs/lm2_1p7b_pretrain.py --config.data.tokenizer=llama3/tokenizer.json \\
           --config.data.paths=/gcs/B/smollm-llama3/train --config.data.eval_paths=/gcs/B/smollm-llama3/heldout

`data.paths` / `data.eval_paths` below are placeholders to override; `data.tokenizer` must be the
file the shards were prepared with (its sha256 is checked). The run logs the held-out loss and
perplexity every `train.eval_every` steps and ends with
`final: LM2, memory in 16 of 16 blocks, ...  held-out loss ...  perplexity ...`.
Not run at this scale by this project (no TPU pod); the pipeline is tested on CPU
(tests/test_data_shards.py) and the step compiles for TPU slices (`python -m lm2_jax.aot`).
"""

from lm2_jax.config import checkout_config


def get_config():
    import runpy

    config = runpy.run_path(checkout_config("lm2_1p7b.py"))["get_config"]()
    d = config.data
    d.source, d.mode = "array_record", "pack"
    d.paths, d.eval_paths = "/gcs/YOUR_BUCKET/smollm-llama3/train", "/gcs/YOUR_BUCKET/smollm-llama3/heldout"
    d.seq_len, d.batch_size = 2048, 512  # 1M tokens per step; two memory segments of 1,024 per row
    d.worker_count = 4  # tokens are already ids: workers only read, decode and pack
    t = config.train
    t.steps, t.warmup_steps, t.lr, t.end_lr_frac = 240_000, 2_000, 3e-4, 0.1  # ~248B tokens, one pass
    t.eval_task, t.eval_every, t.eval_samples = "", 2_000, 512
    t.checkpoint_every, t.log_every = 1_000, 50
    return config

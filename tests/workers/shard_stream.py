"""Stream every row of a token-shard dataset once; print the rows, tokens and peak RSS (KiB).

    python -m tests.workers.shard_stream DATASET TOKENIZER
"""

import resource
import sys

from lm2_jax.data import options, pipeline, tokenizer as toklib


def main(dataset, tokenizer):
    cfg = options.defaults()
    cfg.update(source="array_record", paths=dataset, mode="pack", seq_len=1024, batch_size=8, num_epochs=1,
               tokenizer=tokenizer)
    rows = tokens = 0
    for b in pipeline.make_train_dataset(cfg, toklib.Tokenizer.load(tokenizer), process_index=0, process_count=1):
        rows, tokens = rows + len(b["tokens"]), tokens + int((b["doc_ids"] > 0).sum())
    print(f"RESULT {rows} {tokens} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")


if __name__ == "__main__":
    main(*sys.argv[1:])

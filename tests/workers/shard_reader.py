"""One of two hosts reading a token-shard dataset for one epoch through the training pipeline.

    python -m tests.workers.shard_reader COORDINATOR PROCESS_ID DATASET OUT_JSON

Joins a 2-process JAX cluster (4 CPU devices each), builds `data.source=array_record` with the
host sharding it uses in training (`ShardByJaxProcess`), and writes the records it saw: its rows
concatenated in order, cut at [bos] (each record of the test corpus is a whole document).
"""

import json
import sys

import jax


def main(coordinator, process_id, dataset, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=2, process_id=int(process_id))
    from lm2_jax.data import options, pipeline, shards, tokenizer as toklib

    tok = toklib.Tokenizer.load(shards.read_meta(dataset)["tokenizer"]["name"])
    cfg = options.defaults()
    cfg.update(source="array_record", paths=dataset, mode="pack", seq_len=64, batch_size=2, num_epochs=1, seed=3)
    stream = [t for b in pipeline.make_train_dataset(cfg, tok) for t in b["tokens"][b["doc_ids"] > 0].tolist()]
    starts = [i for i, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
    records = [stream[a:b] for a, b in zip(starts, starts[1:])]
    with open(out, "w") as f:
        json.dump({"records": records, "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

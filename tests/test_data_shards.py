"""Token shards end to end: `python -m lm2_jax.data.prepare` on a small txt + jsonl corpus with a
tokenizer built here, its resume and workers, the rows `data.source=array_record` packs from it,
training from it (exact resume after SIGKILL), two hosts reading disjoint records, a Llama-3-shaped
tokenizer (ids past 65,535), and the errors for bad input."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lm2_jax.data import options, pipeline, prepare, shards, tokenizer as toklib
from lm2_jax.errors import DataError, MissingFileError
from tests.conftest import ROOT, run_module, step_losses

WORDS = "the a memory slot segment fact room garden kitchen hallway moved went John Mary Sandra Daniel".split()


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 120)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three txt files (one document each) and a jsonl file of 60 documents; a BPE built on them."""
    d = tmp_path_factory.mktemp("corpus")
    txt = _texts(3, 0)
    for i, t in enumerate(txt):
        (d / f"doc{i}.txt").write_text(t)
    lines = _texts(60, 1)
    with open(d / "part.jsonl", "w") as f:
        for i, t in enumerate(lines):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped
    tok_path = d / "tokenizer.json"
    toklib.train(iter(txt + lines), vocab_size=400).save(str(tok_path))
    return {"dir": d, "docs": txt + lines, "tokenizer": str(tok_path), "input": f"{d}/*.txt,{d}/part.jsonl"}


def _prepare(corpus, out, **kw):
    return prepare.prepare(corpus["input"], corpus["tokenizer"], str(out), shard_size=kw.pop("shard_size", 2000),
                           progress=False, **kw)


def _records(out):
    meta = shards.read_meta(str(out))
    tok = toklib.Tokenizer.load(meta["tokenizer"]["name"])
    src = shards.TokenRecords(shards.open_dataset(str(out), tok))
    return [src[i][1].tolist() for i in range(len(src))]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    meta = _prepare(corpus, out)
    return out, meta


def test_prepare_writes_every_document_in_order(corpus, prepared):
    out, meta = prepared
    tok = toklib.Tokenizer.load(corpus["tokenizer"])
    want = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in corpus["docs"]]
    assert _records(out) == want
    assert meta["complete"] and len(meta["shards"]) > 2  # shard_size 2000 bytes of uint16 ids
    assert meta["tokens"] == sum(map(len, want)) and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert sorted(os.listdir(out)) == sorted([s["file"] for s in meta["shards"]] + ["dataset.json"])


def test_interrupted_prepare_resumes_to_the_same_shards_and_workers_change_nothing(corpus, prepared, tmp_path,
                                                                                   monkeypatch):
    ref, _ = prepared
    out = tmp_path / "ds"
    close, calls = prepare._ShardWriter.close, [0]

    def crash_after_two(self, position):
        calls[0] += 1
        if calls[0] == 3:  # two shards finished, the third half-written: the process dies here
            self.writer.close()
            raise KeyboardInterrupt
        close(self, position)

    monkeypatch.setattr(prepare._ShardWriter, "close", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus, out)
    assert not shards.read_meta(str(out))["complete"] and len(shards.read_meta(str(out))["shards"]) == 2
    monkeypatch.setattr(prepare._ShardWriter, "close", close)
    _prepare(corpus, out)  # the same call finishes the job, redoing only the unfinished shard
    for name in sorted(os.listdir(ref)):
        if name != "dataset.json":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _records(out) == _records(ref)
    two = tmp_path / "two"
    _prepare(corpus, two, workers=2)
    assert _records(two) == _records(ref)


def _cfg(paths, **kw):
    cfg = options.defaults()
    cfg.update({"source": "array_record", "paths": str(paths), "mode": "pack", "seq_len": 64, "batch_size": 4,
                "shuffle": False, "num_epochs": 1, **kw})
    return cfg


def test_rows_are_fully_packed_and_documents_keep_their_ids(corpus, prepared):
    out, meta = prepared
    tok = toklib.Tokenizer.load(corpus["tokenizer"])
    rows = [r for b in pipeline.make_train_dataset(_cfg(out, batch_size=1), tok, process_index=0, process_count=1)
            for r in zip(*(b[k] for k in pipeline.FEATURES))]
    tokens, mask, doc, pos = (np.stack(x) for x in zip(*rows))
    assert (doc[:-1] > 0).all()  # every row but the stream's last is full: no padding
    assert (mask[:, -1] == 0).all()  # a row's last target lies in the next row
    # Concatenated, the rows are the records in order; each document's positions count from 0 in
    # its row (restarting where it continues), and its ids change exactly where a document starts.
    valid = doc > 0
    assert tokens[valid].tolist() == [t for r in _records(out) for t in r]
    for t, d, p in zip(tokens, doc, pos):
        for i in range(1, len(t)):
            if d[i] and d[i] == d[i - 1]:
                assert p[i] == p[i - 1] + 1 and t[i] != tok.bos_id
            elif d[i]:
                assert p[i] == 0 and d[i] == d[i - 1] + 1
    # within a document, every next token counts but the last (eos -> next document's bos)
    eos = (tokens == tok.eos_id) & valid
    assert (mask[eos] == 0).all()


def _train(workdir, out, *extra, faults=()):
    module = "tests.workers.faulty_train" if faults else "lm2_jax.train"
    return run_module(module, f"--workdir={workdir}", "--config.model.d_model=64", "--config.model.d_ff=128",
                      "--config.model.vocab_size=512", "--config.data.source=array_record",
                      f"--config.data.paths={out}", "--config.data.mode=pack", "--config.data.seq_len=64",
                      "--config.data.batch_size=4",
                      f"--config.data.tokenizer={shards.read_meta(str(out))['tokenizer']['name']}",
                      f"--config.data.eval_paths={out}", "--config.train.eval_task=", "--config.train.eval_samples=8",
                      "--config.train.eval_batch_size=8", "--config.train.loss_positions=0",
                      "--config.data.extra_questions=0",
                      "--config.train.steps=10", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
                      "--config.train.warmup_steps=2", "--config.train.async_checkpoint=False", *extra, *faults,
                      check=not faults)


@pytest.mark.slow
def test_training_from_shards_resumes_exactly_after_sigkill(prepared, tmp_path):
    out, _ = prepared
    ref = tmp_path / "ref"
    proc = _train(ref, out)
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith("final: LM2") and "held-out loss" in final and final.endswith("(8 rows of 64 tokens)")
    reference = step_losses(str(ref))
    assert sorted(reference) == list(range(1, 11))
    killed = _train(tmp_path / "k", out, faults=["--kill_at_step=7"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _train(tmp_path / "k", out)
    assert step_losses(str(tmp_path / "k")) == reference  # the same losses and batches (CRC) after resume


@pytest.mark.slow
def test_two_hosts_read_disjoint_records_that_cover_the_epoch(prepared, tmp_path):
    out, _ = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.workers.shard_reader", f"127.0.0.1:{port}", str(i),
                               str(out), str(tmp_path / f"host{i}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    seen = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    assert all(h["devices"] == 8 and h["local_devices"] == 4 for h in seen)
    records = [tuple(r) for r in _records(out)]
    got = [tuple(r) for h in seen for r in h["records"]]
    usable = len(records) - len(records) % 2  # every host runs the same number of records
    assert len(got) == usable and len(set(got)) == usable  # each record once
    assert set(got) <= set(records)
    assert not {tuple(r) for r in seen[0]["records"]} & {tuple(r) for r in seen[1]["records"]}
    assert len(seen[0]["records"]) == len(seen[1]["records"]) == usable // 2


def _llama3_like_tokenizer(path):
    """A byte-level BPE with Llama-3's layout: 128,000 ordinary tokens (the 256 bytes last, so every
    id of plain text is above 65,535) and its 256 special tokens from 128,000 on."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {f"<unused{i}>": i for i in range(128_000 - len(alphabet))}
    vocab.update({ch: 128_000 - len(alphabet) + i for i, ch in enumerate(sorted(alphabet))})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>"]
    special += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(special))]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in special])
    tok.save(str(path))


def test_llama3_tokenizer_end_to_end(corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    _llama3_like_tokenizer(path)
    tok = toklib.Tokenizer.load(path)
    assert tok.vocab_size == 128_256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128_000, 128_001, 128_004)
    out = tmp_path / "ds"
    meta = prepare.prepare(f"{corpus['dir']}/doc0.txt", str(path), str(out), progress=False)
    assert meta["dtype"] == "uint32"
    (record,) = _records(out)
    assert record == [128_000, *tok.encode(corpus["docs"][0]), 128_001] and min(record) > 65_535
    assert tok.decode(record) == corpus["docs"][0]


def test_bad_input_is_named(corpus, prepared, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'text' field"):
        prepare.prepare(str(bad), corpus["tokenizer"], str(tmp_path / "o1"), progress=False)
    with pytest.raises(MissingFileError, match=r"'/nowhere/\*\.jsonl' matches no file"):
        prepare.prepare("/nowhere/*.jsonl", corpus["tokenizer"], str(tmp_path / "o2"), progress=False)
    # another tokenizer: refused by prepare (resuming into the dataset) and by training, both hashes named
    other = tmp_path / "other.json"
    toklib.train(iter(corpus["docs"]), vocab_size=300).save(str(other))
    out, _ = prepared
    ours, theirs = toklib.Tokenizer.load(corpus["tokenizer"]).fingerprint, toklib.Tokenizer.load(other).fingerprint
    with pytest.raises(DataError, match=f"sha256 {ours}.*sha256 {theirs}"):
        prepare.prepare(corpus["input"], str(other), str(out), shard_size=2000, progress=False)
    with pytest.raises(DataError, match=f"sha256 {ours}.*sha256 {theirs}"):
        pipeline.make_train_dataset(_cfg(out), toklib.Tokenizer.load(other), process_index=0, process_count=1)
    with pytest.raises(MissingFileError, match="matches no"):
        shards.open_dataset(str(tmp_path / "none-*.array_record"), toklib.Tokenizer.load(other))
    cfg = _cfg(out, mode="pad")
    with pytest.raises(ValueError, match="data.mode"):
        options.validate(cfg)
    proc = run_module("lm2_jax.data.prepare", f"--input={tmp_path}/*.parquet", f"--tokenizer={corpus['tokenizer']}",
                      f"--out={tmp_path / 'o3'}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --input:") and "*.parquet" in proc.stderr


def _random_dataset(out, tokenizer_path, documents, seed):
    """A dataset of random ids written directly (no tokenising), as prepare lays it out."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = toklib.Tokenizer.load(tokenizer_path)
    out.mkdir()
    rng = np.random.default_rng(seed)
    meta = {"format": shards.FORMAT, "tokenizer": shards.tokenizer_record(tok), "dtype": "uint16",
            "sources": [], "options": {}, "shards": [], "next": [0, 0], "complete": True}
    for s in range(-(-documents // 2000)):
        w = ArrayRecordWriter(str(out / shards.shard_name(s)), "group_size:1")
        n = tokens = 0
        for _ in range(min(2000, documents - 2000 * s)):
            doc = rng.integers(4, tok.vocab_size, size=int(rng.integers(200, 1800)), dtype=np.uint16)
            w.write(doc.tobytes())
            n, tokens = n + 1, tokens + len(doc)
        w.close()
        meta["shards"].append({"file": shards.shard_name(s), "records": n, "tokens": tokens})
    shards.write_meta(str(out), meta)
    return sum(s["tokens"] for s in meta["shards"])


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_corpus(corpus, tmp_path):
    """Streaming 20x the tokens (20M, 40 MB of ids: 80 MB were they held as int32) costs the host
    no more than 10% more peak memory."""
    small, large = tmp_path / "small", tmp_path / "large"
    sizes = [_random_dataset(ds, corpus["tokenizer"], docs, seed) for ds, docs, seed in ((small, 1000, 0),
                                                                                        (large, 20_000, 1))]
    peaks = []
    for ds, n in zip((small, large), sizes):
        proc = run_module("tests.workers.shard_stream", str(ds), corpus["tokenizer"])
        rows, tokens, rss_kib = map(int, proc.stdout.split("RESULT ")[-1].split())
        assert tokens > 0.99 * n  # it did stream (nearly) all of it: only the last partial batch is dropped
        peaks.append(rss_kib)
    assert sizes[1] > 19 * sizes[0]
    print(f"streamed {sizes} tokens: peak RSS {peaks} KiB")
    assert peaks[1] <= 1.10 * peaks[0], peaks


@pytest.mark.slow
def test_prepare_to_gs_uploads_the_same_shards(corpus, prepared, gcs, monkeypatch):
    """A gs:// --out (a local GCS emulator): every finished shard is uploaded whole, byte-identical to
    a local run's, and the dataset opens from its gs:// path. (Reading records straight from gs://
    goes through array_record's own GCS client, which does not talk to the emulator: on a pod,
    read through a gcsfuse mount; README.)"""
    from etils import epath

    out = "gs://lm2-test/datasets/corpus"
    proc = subprocess.run([sys.executable, "-m", "lm2_jax.data.prepare", f"--input={corpus['input']}",
                           f"--tokenizer={corpus['tokenizer']}", f"--out={out}", "--shard_size=2000"], cwd=ROOT,
                          text=True, capture_output=True, timeout=300, env=gcs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "NO_GCE_CHECK"):
        monkeypatch.setenv(key, gcs[key])
    ref, meta = prepared
    remote = epath.Path(out)
    for s in meta["shards"]:
        assert (remote / s["file"]).read_bytes() == (ref / s["file"]).read_bytes(), s["file"]
    ds = shards.open_dataset(out, toklib.Tokenizer.load(corpus["tokenizer"]))
    assert ds.files == tuple(f"{out}/{s['file']}" for s in meta["shards"]) and ds.tokens == meta["tokens"]

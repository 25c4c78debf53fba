"""`python -m lm2_jax.data.prepare`: tokenise a text corpus into ArrayRecord token shards.

    python -m lm2_jax.data.prepare --input='corpus/*.jsonl' --tokenizer=llama3/tokenizer.json \\
        --out=gs://bucket/corpus-llama3 [--format=jsonl] [--text_field=text] [--shard_size=100MB] [--workers=8]

Documents: a ``.txt`` / ``.txt.gz`` file is one document; a ``.jsonl`` (``.jsonl.gz``) line and a
``.parquet`` row are one document, its text in ``--text_field``. Each is written as ``[bos] ids [eos]``
(pieces of at most ``--max_record_tokens``) to shards of about ``--shard_size`` bytes of tokens, in
input order; the format is in ``lm2_jax.data.shards``. Train on the result with
``--config.data.source=array_record --config.data.paths=OUT``.

Interrupted, the same command resumes: ``dataset.json`` lists the finished shards and the input
position after them; a shard that was being written is discarded and redone from there. The output
is the same for any ``--workers`` and however often it was interrupted. A ``gs://`` ``--out`` gets
each shard uploaded whole once it is finished (through etils.epath / gcsfs). An ``--out`` prepared with
another tokenizer, from other inputs or with other options is refused.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from etils import epath
from tqdm import tqdm

from lm2_jax.data import shards
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.errors import DataError, MissingFileError, UsageError

FORMATS = ("txt", "jsonl", "parquet")
_EXT = {".txt": "txt", ".txt.gz": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl",
        ".parquet": "parquet"}
BATCH_DOCS = 256  # documents tokenised per call (and per worker task)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--shard_size={text!r}: expected a size like 100MB, 1GB or 65536")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[unit])


def format_of(path: str, given: str) -> str:
    if given:
        return given
    for ext, fmt in sorted(_EXT.items(), key=lambda kv: -len(kv[0])):
        if path.endswith(ext):
            return fmt
    raise UsageError(f"{path}: cannot tell its format from the name; pass --format ({', '.join(FORMATS)})")


def input_files(spec: str, given_format: str) -> list[str]:
    """The files of ``--input`` (comma-separated paths, directories or globs), each pattern checked."""
    files = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = epath.Path(part)
        if not any(c in part for c in "*?[") and path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if any(str(p).endswith(e) for e in _EXT))
        else:
            found = [f for f in shards.expand(part) if not epath.Path(f).is_dir()]
        if not found:
            raise MissingFileError(f"--input: {part!r} matches no file")
        files += found
    if not files:
        raise MissingFileError(f"--input={spec!r}: names no file")
    for f in files:
        format_of(f, given_format)  # every file's format is known before any work
    return files


def _text_stream(path: str):
    raw = epath.Path(path).open("rb")
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw, encoding="utf-8")


def documents(path: str, fmt: str, field: str) -> Iterator[str]:
    """The texts of one input file, in order."""
    if fmt == "txt":
        with _text_stream(path) as f:
            yield f.read()
    elif fmt == "jsonl":
        with _text_stream(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    why = "no" if not isinstance(obj, dict) or field not in obj else "a non-string"
                    raise DataError(f"{path}:{line_no}: {why} {field!r} field (--text_field)")
                yield text
    else:
        import pyarrow.parquet as pq  # noqa: PLC0415 (only parquet inputs need it)

        with epath.Path(path).open("rb") as raw:
            pf = pq.ParquetFile(raw)
            if field not in pf.schema_arrow.names:
                raise DataError(f"{path}: no column {field!r} (--text_field); columns: {pf.schema_arrow.names}")
            row = 0
            for batch in pf.iter_batches(columns=[field], batch_size=BATCH_DOCS):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if not isinstance(text, str):
                        raise DataError(f"{path}: row {row}: {field!r} is not a string")
                    yield text


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.load(path)


def _encode_with(tok: Tokenizer, batch):
    texts, where = batch
    return tok.encode_batch(texts), where


def _encode(batch):
    return _encode_with(_WORKER_TOKENIZER, batch)


def _batches(files, fmt, field, start) -> Iterator[tuple[list[str], list[tuple[int, int]]]]:
    """(texts, their (file, document) positions) from ``start`` on, in order."""
    texts, where = [], []
    for fi in range(start[0], len(files)):
        for dj, text in enumerate(documents(files[fi], format_of(files[fi], fmt), field)):
            if fi == start[0] and dj < start[1]:
                continue
            texts.append(text)
            where.append((fi, dj))
            if len(texts) == BATCH_DOCS:
                yield texts, where
                texts, where = [], []
    if texts:
        yield texts, where


class _ShardWriter:
    """Writes records to the current shard and closes it once it holds ``limit`` bytes of tokens."""

    def __init__(self, out: str, meta: dict, limit: int):
        self.out, self.meta, self.limit = out, meta, limit
        self.writer, self.records, self.tokens, self.bytes = None, 0, 0, 0

    def write(self, record: np.ndarray) -> None:
        if self.writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self.name = shards.shard_name(len(self.meta["shards"]))
            self.local = f"{self.out}/{self.name}"
            if shards.is_remote(self.out):  # written locally, uploaded whole once finished (`close`)
                self.local = os.path.join(tempfile.mkdtemp(prefix="lm2_prepare_"), self.name)
            # group_size:1 keeps every record a random-access read of its own (Grain's global shuffle)
            self.writer = ArrayRecordWriter(self.local, "group_size:1")
        payload = record.astype(np.dtype(self.meta["dtype"]).newbyteorder("<")).tobytes()
        self.writer.write(payload)
        self.records, self.tokens, self.bytes = self.records + 1, self.tokens + len(record), self.bytes + len(payload)

    def full(self) -> bool:
        return self.bytes >= self.limit

    def close(self, next_position: tuple[int, int]) -> None:
        """Finish the shard and record it with the input position after it (the resume point)."""
        if self.writer is not None:
            self.writer.close()
            if shards.is_remote(self.out):
                with open(self.local, "rb") as src, (epath.Path(self.out) / self.name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
                shutil.rmtree(os.path.dirname(self.local))
            self.meta["shards"].append({"file": self.name, "records": self.records, "tokens": self.tokens})
        self.meta["next"] = list(next_position)
        shards.write_meta(self.out, self.meta)
        self.writer, self.records, self.tokens, self.bytes = None, 0, 0, 0


def prepare(input_spec: str, tokenizer_path: str, out: str, fmt: str = "", text_field: str = "text",
            shard_size: int = 100 << 20, workers: int = 1, max_record_tokens: int = 65536,
            progress: bool = True) -> dict:
    """Tokenise ``input_spec`` into ``out`` (see module doc); returns the final ``dataset.json``."""
    if fmt and fmt not in FORMATS:
        raise UsageError(f"--format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if max_record_tokens < 2:
        raise UsageError(f"--max_record_tokens={max_record_tokens}: must be at least 2")
    tok = Tokenizer.load(tokenizer_path)
    files = input_files(input_spec, fmt)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    options = {"format": fmt, "text_field": text_field, "max_record_tokens": max_record_tokens}
    meta = shards.read_meta(out)
    if meta is None:
        meta = {"format": shards.FORMAT, "tokenizer": shards.tokenizer_record(tok),
                "dtype": shards.token_dtype(tok.vocab_size), "sources": files, "options": options,
                "shards": [], "next": [0, 0], "complete": False}
        shards.write_meta(out, meta)
    else:
        shards.check_tokenizer(meta, tok, f"--out={out}", "--tokenizer")
        if meta["sources"] != files:
            raise DataError(f"--out={out} was prepared from other inputs ({len(meta['sources'])} files, the first "
                            f"{meta['sources'][0]!r}); use a new --out for {input_spec!r}")
        if meta["options"] != options:
            raise DataError(f"--out={out} was prepared with options {meta['options']}, not {options}")
        if meta["complete"]:
            print(f"{out}: already complete ({len(meta['shards'])} shards, {meta['tokens']} tokens)")
            return meta
    finished = {s["file"] for s in meta["shards"]}
    for stale in epath.Path(out).glob(shards.SHARD_GLOB):  # a shard an interruption left half-written
        if stale.name not in finished:
            stale.unlink()

    start = tuple(meta["next"])
    writer = _ShardWriter(out, meta, shard_size)
    # files done, with the tokens written as the postfix (a file's size says little once it is gzipped)
    bar = tqdm(total=len(files), initial=start[0], unit="file", desc="prepare", disable=not progress,
               dynamic_ncols=True)
    t0, new_tokens = time.perf_counter(), 0
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) if workers > 1 else None
    try:
        batches = _batches(files, fmt, text_field, start)
        # imap keeps the input order, so the shards do not depend on --workers
        encoded = pool.imap(_encode, batches) if pool else (_encode_with(tok, b) for b in batches)
        for ids_list, where in encoded:
            for ids, (fi, dj) in zip(ids_list, where):
                doc = np.asarray([tok.bos_id, *ids, tok.eos_id], np.int64)
                for i in range(0, len(doc), max_record_tokens):
                    writer.write(doc[i:i + max_record_tokens])
                new_tokens += len(doc)
                if writer.full():
                    writer.close((fi, dj + 1))
            bar.update(where[-1][0] - bar.n)
            bar.set_postfix(tokens=new_tokens, shards=len(meta["shards"]),
                            tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        if pool:
            pool.terminate()
        bar.close()
    bar.update(len(files) - bar.n)
    writer.close((len(files), 0))
    meta.update(complete=True, records=sum(s["records"] for s in meta["shards"]),
                tokens=sum(s["tokens"] for s in meta["shards"]))
    shards.write_meta(out, meta)
    dt = time.perf_counter() - t0
    print(f"{out}: {len(meta['shards'])} shards, {meta['records']} records, {meta['tokens']} tokens "
          f"({new_tokens} this run in {dt:.1f} s, {new_tokens / max(dt, 1e-9):.0f} tokens/s)")
    return meta


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm2_jax.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="file, directory or glob (local or gs://); comma-separated")
    p.add_argument("--format", default="", choices=("", *FORMATS), help="default: from each file's extension")
    p.add_argument("--text_field", default="text", help="the text of a jsonl line / parquet row")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (Hugging Face) or SentencePiece .model")
    p.add_argument("--out", required=True, help="dataset directory (local or gs://)")
    p.add_argument("--shard_size", default="100MB", help="bytes of tokens per shard (100MB, 1GB, 65536)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes")
    p.add_argument("--max_record_tokens", type=int, default=65536, help="longer documents are split into records")
    a = p.parse_args(argv)
    if a.workers < 1:
        raise UsageError(f"--workers={a.workers}: must be at least 1")
    prepare(a.input, a.tokenizer, a.out, a.format, a.text_field, parse_size(a.shard_size), a.workers,
            a.max_record_tokens)
    return 0


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)

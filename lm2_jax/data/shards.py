"""Token shards: a corpus tokenised once into ArrayRecord files, read per host by Grain.

A dataset is a directory (local or ``gs://``) written by ``python -m lm2_jax.data.prepare``:

- ``tokens-00000.array_record``, ...: one record per document (or per piece of a document longer
  than ``max_record_tokens``), its token ids as little-endian ``uint16`` (vocabularies up to 65,536)
  or ``uint32``; a document's first piece starts with ``[bos]``, its last ends with ``[eos]``;
- ``dataset.json``: the tokenizer (name, sha256 fingerprint, vocabulary size, special ids), the
  dtype, the source files, and per finished shard its file, records and tokens; ``complete`` is
  false while ``prepare`` is still writing (``next`` is where it resumes).

``data.source = "array_record"`` reads ``data.paths``: comma-separated dataset directories, or globs of
``*.array_record`` files inside them. Every dataset named must be complete and prepared with
``data.tokenizer``; the records are then one random-access source (``grain.sources.ArrayRecordDataSource``,
which reads a record's bytes on demand, so host memory does not grow with the corpus).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json

import grain
import numpy as np
from etils import epath

from lm2_jax.errors import DataError, MissingFileError

META = "dataset.json"
FORMAT = "lm2_jax token shards v1"
SHARD_GLOB = "tokens-*.array_record"


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_record(tokenizer) -> dict:
    """What ``dataset.json`` records of the tokenizer; the fingerprint is what is compared."""
    return {"name": str(tokenizer.name), "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def is_remote(path: str) -> bool:
    return "://" in path


def expand(pattern: str) -> list[str]:
    """Sorted matches of one path or glob, local or ``gs://`` (through etils.epath)."""
    if not any(c in pattern for c in "*?["):
        return [pattern] if epath.Path(pattern).exists() else []
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern, recursive=True))
    head, _, tail = pattern.partition("*")
    parent = head.rsplit("/", 1)[0]  # the deepest directory before the first wildcard
    rest = pattern[len(parent) + 1:]
    return sorted(str(p) for p in epath.Path(parent).glob(rest))


def read_meta(directory: str) -> dict | None:
    path = epath.Path(directory) / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a token-shard dataset of this version (format {meta.get('format')!r})")
    return meta


def write_meta(directory: str, meta: dict) -> None:
    """Atomically: a crash leaves the previous ``dataset.json`` or the new one, never half of one."""
    d = epath.Path(directory)
    if is_remote(directory):  # an object upload is atomic already (and a rename is a slow copy)
        (d / META).write_text(json.dumps(meta, indent=1))
        return
    tmp = d / f"{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(d / META)


def check_tokenizer(meta: dict, tokenizer, where: str, field: str) -> None:
    theirs, ours = meta["tokenizer"]["fingerprint"], tokenizer.fingerprint
    if theirs != ours:
        raise DataError(f"{where} was prepared with tokenizer {meta['tokenizer']['name']!r} (sha256 {theirs}), "
                        f"not {field}={tokenizer.name!r} (sha256 {ours}): one dataset, one tokenizer")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The shard files named by ``data.paths`` (in order) and the dtype of their records."""

    files: tuple[str, ...]
    dtype: str
    records: int
    tokens: int


def open_dataset(paths: str, tokenizer, field: str = "data.paths") -> Dataset:
    """The complete, same-tokenizer datasets named by ``paths`` (see module doc)."""
    files, dtypes, records, tokens = [], set(), 0, 0
    for part in (p.strip() for p in paths.split(",") if p.strip()):
        if part.endswith(".array_record") or any(c in part for c in "*?["):
            matched = [f for f in expand(part) if f.endswith(".array_record")]
            if not matched:
                raise MissingFileError(f"{field}: {part!r} matches no *.array_record file")
            groups: dict[str, list[str]] = {}
            for f in matched:
                groups.setdefault(f.rsplit("/", 1)[0] if "/" in f else ".", []).append(f)
        else:
            if not epath.Path(part).is_dir():
                raise MissingFileError(f"{field}: {part!r} is not a directory (a dataset from lm2_jax.data.prepare)")
            groups = {part: None}
        for directory, chosen in groups.items():
            meta = read_meta(directory)
            if meta is None:
                raise MissingFileError(f"{field}: {directory} has no {META} (prepare it with python -m "
                                       f"lm2_jax.data.prepare --out={directory})")
            if not meta.get("complete"):
                raise DataError(f"{field}: {directory} is still being prepared (or was interrupted): run "
                                "python -m lm2_jax.data.prepare again with the same arguments to finish it")
            check_tokenizer(meta, tokenizer, directory, "data.tokenizer")
            done = {s["file"]: s for s in meta["shards"]}
            names = [f.rsplit("/", 1)[-1] for f in chosen] if chosen else list(done)
            for name in names:
                if name not in done:
                    raise DataError(f"{field}: {directory}/{name} is not a finished shard of that dataset")
                files.append(f"{directory.rstrip('/')}/{name}")
                records, tokens = records + done[name]["records"], tokens + done[name]["tokens"]
            dtypes.add(meta["dtype"])
    if not files:
        raise MissingFileError(f"{field}={paths!r}: names no dataset")
    if len(dtypes) > 1:
        raise DataError(f"{field}: the datasets store tokens as {sorted(dtypes)}; prepare them alike")
    return Dataset(tuple(files), dtypes.pop(), records, tokens)


@dataclasses.dataclass
class TokenRecords:
    """Random access to the records of a ``Dataset``: ``(name, int32 token ids)``."""

    dataset: Dataset

    def __post_init__(self):
        self._source = grain.sources.ArrayRecordDataSource(list(self.dataset.files))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        ids = np.frombuffer(self._source[index], dtype=np.dtype(self.dataset.dtype).newbyteorder("<"))
        return f"token record {index}", ids.astype(np.int32)

    def __getstate__(self):  # grain's worker processes get the file list, and open the files themselves
        return {"dataset": self.dataset}

    def __setstate__(self, state):
        self.dataset = state["dataset"]
        self.__post_init__()

"""Grain input pipeline: records -> tokens -> padded or packed rows -> per-host batches.

Order of operations (``make_train_dataset``):

1. a random-access source of records (generated bAbI samples, a bAbI file, generated samples
   hidden in the training books (BABILong on the fly), a built TFDS ``babilong`` split read with
   ``tfds.data_source``, documents of plain-text files, or the records of prepared token shards
   (``shards.py``, read on demand)), one per component of the mix
   (``options.components``: each task of ``data.task``, times each ``data.babilong_length``);
2. per component, a global shuffle with ``data.seed`` + its index (reshuffled every epoch), then
   this host's shard: records ``i ≡ process_index (mod process_count)`` of the shuffled order
   (``ShardByJaxProcess`` unless the index/count are given), the remainder of ``len % count``
   dropped so that every host runs the same number of steps; then ``num_epochs`` repeats (0 =
   forever); several components are mixed by ``grain.MapDataset.mix`` with ``data.mix_weights``;
3. tokenise (QA: ``[bos] context question [ans] answer [eos]``, see ``qa.py``, for a share
   ``data.extra_questions`` of the bAbI samples followed by more questions the context answers;
   text: ``[bos] document [eos]``, documents longer than a row split into consecutive windows, no
   token lost);
   a QA row longer than ``seq_len`` is an error naming the sample, or loses its oldest context
   tokens if ``data.truncate='left'``;
4. ``pad``: one row per sample, right-padded; ``pack``: first-fit packing of several documents per
   row (grain ``FirstFitPackIterDataset``); token shards: concatenated and cut into full rows
   (``ConcatThenSplitIterDataset``; a document cut at a row's end continues in the next row);
5. batches of ``batch_size / process_count`` rows. Records are read and tokenised ahead by
   ``read_threads`` threads and, if ``worker_count > 0``, by that many processes (before packing
   and batching, so the batches are the same for any ``worker_count``; a saved state must be
   restored with the same ``worker_count``).

A batch is a dict of int32 numpy arrays of shape ``[B, T]``:

- ``tokens``: inputs; the target at position ``t`` is ``tokens[:, t + 1]``;
- ``loss_mask``: 1 where the target ``tokens[:, t + 1]`` counts (QA: answer tokens and the final
  ``[eos]``; text: every next token of the same document); 0 at the last position of every
  document and on padding;
- ``doc_ids``: 0 on padding, else the 1-based index of the document within the row (pad mode: 1);
- ``positions``: position within the document, restarting at 0 for each packed document (0 on
  padding).

The returned ``grain.DatasetIterator`` is checkpointable: ``get_state()``/``set_state()``, or
inside an Orbax ``CheckpointManager`` with ``grain.checkpoint.CheckpointSave(iterator)`` /
``CheckpointRestore(iterator)``; a restored iterator yields exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import grain
import ml_collections
import numpy as np
from absl import flags

from lm2_jax.data import babi, babi_gen, babilong, books, options, qa, shards
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.errors import DataError, MissingFileError

FEATURES = ("tokens", "loss_mask", "doc_ids", "positions")


# -- sources: random access, each record carries its index for error messages -------------------
@dataclasses.dataclass(frozen=True)
class GeneratedBabi:
    """Sample ``i`` of the unlimited generated stream of ``(task, seed)``."""

    task: str
    seed: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[str, babi.Sample]:
        name = f"{self.task} generated sample {index} (seed {self.seed})"
        return name, babi_gen.generated_sample(self.task, self.seed, index)


@dataclasses.dataclass(frozen=True)
class GeneratedBabilong:
    """Sample ``i`` of the generated stream of ``(task, seed)`` with its facts hidden in the training
    books at ``length`` (``babilong.mix``). A story whose facts alone exceed the length is replaced
    by the same index of the next seed (deterministically), as BABILong drops such stories."""

    task: str
    seed: int
    length: str
    records: int
    hay: babilong.Haystack
    tokenizer: Tokenizer

    def __len__(self) -> int:
        return self.records

    def __getitem__(self, index: int) -> tuple[str, babilong.BabilongSample]:
        for attempt in range(64):
            seed = self.seed + attempt * 1_000_003
            name = f"{self.task}@{self.length} generated sample {index} (seed {seed})"
            try:
                return name, babilong.mix(babi_gen.generated_sample(self.task, seed, index), self.length, self.hay,
                                          self.tokenizer, seed=seed, index=index, name=name)
            except babilong.FactsTooLongError:
                continue
        raise DataError(f"{self.task}@{self.length}: 64 generated stories in a row have facts longer than the length")


@dataclasses.dataclass(frozen=True)
class Indexed:
    """A sequence of records paired with names ``'{prefix} {index}'``."""

    prefix: str
    records: object

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return f"{self.prefix} {index}", self.records[index]


def text_documents(paths: str, tokenizer: Tokenizer, window: int) -> list[np.ndarray]:
    """Paragraphs of the ``*.txt`` / ``*.txt.gz`` files (or directories of them) in ``paths``
    (comma-separated) as ``[bos] ids [eos]``, each split into windows of at most ``window`` ids."""
    files: list[Path] = []
    for part in (p.strip() for p in paths.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.name.endswith((".txt", ".txt.gz")))
        elif path.is_file():
            files.append(path)
        else:
            raise MissingFileError(f"data.text_paths: {path} is neither a file nor a directory")
    if not files:
        raise MissingFileError(f"data.text_paths={paths!r}: no *.txt / *.txt.gz files")
    docs = []
    for path in files:
        paras = list(books.paragraphs(books.read_book(path)))
        for ids in tokenizer.encode_batch(paras):
            doc = np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)
            docs += [doc[i:i + window] for i in range(0, len(doc), window)]
    return docs


def make_source(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, task: str | None = None,
                length: str | None = None):
    """The random-access source of ``(name, record)`` pairs for ``cfg.source`` and one component
    (``options.components``) of the mix: ``task`` and, for the babilong sources, ``length``
    (default: the first)."""
    if cfg.source != "text":
        task = task or options.tasks(cfg)[0]
    length = length or (options.lengths(cfg)[0] if cfg.source.startswith("babilong") else None)
    if cfg.source == "babi_generated":
        return GeneratedBabi(task, cfg.seed, cfg.generated_records)
    if cfg.source == "babi_file":
        return Indexed(f"{task} {cfg.split} sample", babi.load_task(task, cfg.split, cfg.babi_dir or None))
    if cfg.source == "babilong_generated":
        hay = babilong.haystack(babilong.BOOK_SPLIT["train"], tokenizer)
        return GeneratedBabilong(task, cfg.seed, length, cfg.generated_records, hay, tokenizer)
    if cfg.source == "babilong_tfds":
        from lm2_jax.data import tfds_babilong  # noqa: PLC0415 (TFDS is slow to import)

        source = tfds_babilong.data_source(task, length, cfg.split, cfg.tfds_data_dir)
        built = tfds_babilong.built_metadata(task, length, cfg.tfds_data_dir)
        if built["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise DataError(f"babilong/{task}_{length} in data.tfds_data_dir={cfg.tfds_data_dir!r} "
                             f"was built with another tokenizer than data.tokenizer={cfg.tokenizer!r}")
        return Indexed(f"babilong/{task}_{length} {cfg.split} record", source)
    if cfg.source == "array_record":
        return shards.TokenRecords(shards.open_dataset(cfg.paths, tokenizer))
    return Indexed("text document", text_documents(cfg.text_paths, tokenizer, cfg.seq_len))


# -- records -> rows -------------------------------------------------------------------------
def to_example(name: str, record, tokenizer: Tokenizer) -> qa.QAExample:
    """A bAbI sample or a TFDS babilong record as ids."""
    if isinstance(record, babi.Sample):
        return qa.encode_sample(record, tokenizer, name)
    if isinstance(record, babilong.BabilongSample):
        return qa.QAExample(name, record.context_ids, record.question_ids, record.answer_ids)
    return qa.QAExample(name, np.asarray(record["context_ids"], np.int32),
                        np.asarray(record["question_ids"], np.int32), np.asarray(record["answer_ids"], np.int32))


@dataclasses.dataclass(frozen=True)
class Featurize(grain.transforms.Map):
    """``(name, record)`` -> ``{'tokens', 'loss_mask'}`` of one document (variable length)."""

    tokenizer: Tokenizer
    seq_len: int
    truncate: str
    extra_questions: float = 0.0  # the share of bAbI samples whose row gets more questions (qa.questions_tokens)

    def map(self, element):
        name, record = element
        if isinstance(record, np.ndarray):  # a text window: next-token loss inside the document
            mask = np.ones(len(record), np.int32)
            mask[-1] = 0
            return {"tokens": record, "loss_mask": mask}
        if (self.extra_questions and isinstance(record, babi.Sample)
                and zlib.crc32(name.encode()) < self.extra_questions * 2**32):
            tokens, mask = qa.questions_tokens(record, self.tokenizer, self.seq_len)
            if len(tokens) <= self.seq_len:  # else the one-question row's error or truncation below
                return {"tokens": tokens, "loss_mask": mask}
        example = to_example(name, record, self.tokenizer)
        tokens, mask = qa.fit_qa(example, self.tokenizer, self.seq_len, self.truncate)
        return {"tokens": tokens, "loss_mask": mask}


@dataclasses.dataclass(frozen=True)
class PadRow(grain.transforms.Map):
    """One document -> one right-padded row with ``doc_ids`` 1 and ``positions`` 0..n-1."""

    seq_len: int
    pad_id: int

    def map(self, doc):
        n = len(doc["tokens"])
        row = {k: np.zeros(self.seq_len, np.int32) for k in FEATURES}
        row["tokens"][:] = self.pad_id
        row["tokens"][:n], row["loss_mask"][:n] = doc["tokens"], doc["loss_mask"]
        row["doc_ids"][:n], row["positions"][:n] = 1, np.arange(n)
        return row


@dataclasses.dataclass(frozen=True)
class PackedRow(grain.transforms.Map):
    """Rename grain's packing outputs to ``doc_ids`` / ``positions``. ``split``: rows of
    concat-then-split packing, where a document can run past the row's end: its last token's target
    is in the next row, so it does not count here."""

    split: bool = False

    def map(self, packed):
        mask = packed["loss_mask"].astype(np.int32)
        if self.split:
            mask[-1] = 0
        return {"tokens": packed["tokens"].astype(np.int32), "loss_mask": mask,
                "doc_ids": packed["tokens_segment_ids"].astype(np.int32),
                "positions": packed["tokens_positions"].astype(np.int32)}


def shard_options(process_index: int | None, process_count: int | None) -> grain.sharding.ShardOptions:
    """This host's shard: ``ShardByJaxProcess`` unless an index and count are given (tests)."""
    if process_index is None and process_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if process_index is None or process_count is None or not 0 <= process_index < process_count:
        raise DataError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)


def make_train_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """The training pipeline of this host as a grain ``IterDataset`` (see module doc)."""
    shard = shard_options(process_index, process_count)
    options.validate(cfg, shard.shard_count)
    per_host = cfg.batch_size // shard.shard_count
    parts = []
    for i, (task, length) in enumerate(options.components(cfg)):
        ds = grain.MapDataset.source(make_source(cfg, tokenizer, task, length))
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + i)  # the first component keeps the single-source order
        usable = len(ds) - len(ds) % shard.shard_count if shard.drop_remainder else len(ds)
        if usable < shard.shard_count:
            raise DataError(f"data.source={cfg.source!r} ({task}) has {len(ds)} records, "
                             f"fewer than the {shard.shard_count} hosts")
        ds = ds[shard.shard_index:usable:shard.shard_count]
        parts.append(ds.repeat(None if cfg.num_epochs == 0 else cfg.num_epochs))
    # A mix of random-access datasets is itself random access (element i comes from a fixed component
    # and index), so the iterator's state is still one position and resumes exactly.
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, options.mix_weights(cfg))
    ds = ds.map(Featurize(tokenizer, cfg.seq_len, cfg.truncate, cfg.extra_questions))
    if cfg.mode == "pad":
        ds = ds.map(PadRow(cfg.seq_len, tokenizer.pad_id))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
    it = ds.to_iter_dataset(read)
    if cfg.worker_count > 0:  # before packing and batching, so the batches do not depend on it
        if not flags.FLAGS.is_parsed():
            # grain 0.2.x reads an absl flag in its workers and fails if flags were never parsed
            # (google/grain#1355); programs without absl.app get the flags' defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    lengths = {"tokens": cfg.seq_len, "loss_mask": cfg.seq_len}
    if cfg.source == "array_record":
        # Pretraining rows: documents concatenated and cut at seq_len, every row full (a document
        # continues in the next row, its positions restarting there), no padding but the stream's end.
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths).map(PackedRow(split=True))
    elif cfg.mode == "pack":
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=lengths, num_packing_bins=per_host, shuffle_bins=False,
            padding_struct={"tokens": tokenizer.pad_id, "loss_mask": 0},
        ).map(PackedRow())
    return it.batch(per_host, drop_remainder=True)


def make_heldout_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> grain.DatasetIterator:
    """The rows of ``cfg.eval_paths`` in order, one epoch, the whole dataset on every host
    (evaluation batches are global): the held-out set of a pretraining run (perplexity)."""
    held = ml_collections.ConfigDict({**cfg.to_dict(), "source": "array_record", "paths": cfg.eval_paths,
                                      "shuffle": False, "num_epochs": 1, "worker_count": 0, "batch_size": 1,
                                      "mode": "pack", "extra_questions": 0.0})
    return make_train_iterator(held, tokenizer, process_index=0, process_count=1)


def make_train_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over this host's training batches (see module doc)."""
    return iter(make_train_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count))


"""The ``data`` section of the config: its defaults and its validation.

Every field is read by ``pipeline.make_train_iterator``; ``validate`` turns an impossible value
into one ``ValueError`` naming the field (``data.seq_len``) and the value, before any data is read.
"""

from __future__ import annotations

import os

import ml_collections

from lm2_jax.data import babi, babi_gen, babilong, qa
from lm2_jax.errors import ConfigError, DataError

SOURCES = ("babi_generated", "babi_file", "babilong_generated", "babilong_tfds", "text", "array_record")
MODES = ("pad", "pack")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # babi_generated: fresh stories from the generator, record i = sample i of an unlimited
        #   stream for (task, seed); babi_file: a bAbI file (``babi_dir``, ``split``);
        #   babilong_generated: generated samples hidden in the training books at
        #   ``babilong_length`` (BABILong built on the fly; never the evaluation books);
        #   babilong_tfds: a built ``babilong/{task}_{babilong_length}`` (``tfds_data_dir``);
        #   text: plain-text files (``text_paths``) for language modelling, read into memory;
        #   array_record: token shards (``paths``) from ``python -m lm2_jax.data.prepare``, streamed
        #   (the pod-scale path: lm2_jax/data/shards.py), concatenated and split into full rows.
        source="babi_generated",
        # One task, or several ("qa1,qa2" or "qa1-qa5"): a mix of every task (x every
        # babilong_length of the babilong sources), drawn in proportion to ``mix_weights``.
        task="qa1",
        mix_weights="",  # empty = uniform; else one weight per component, tasks outer, lengths inner
        seq_len=256,
        batch_size=32,  # global; each of the jax.process_count() hosts loads batch_size / count
        mode="pad",  # pad: one sample per row, right-padded; pack: several documents per row
        # The share of bAbI samples (chosen by a hash of the record) whose row continues, after its
        #   answer, with other questions its context answers and their answers, as many as fit in
        #   seq_len (qa1; qa.questions_tokens): more targets on what would be padding.
        extra_questions=0.0,
        truncate="error",  # a sample longer than seq_len: 'error' names it, 'left' drops old context
        seed=0,
        shuffle=True,  # global shuffle of the records (new order every epoch)
        num_epochs=0,  # 0 = repeat forever
        read_threads=2,  # threads reading and tokenising records (grain.ReadOptions)
        prefetch_buffer=16,  # records read ahead per thread
        worker_count=0,  # processes for grain mp_prefetch; 0 = none (threads only)
        tokenizer="",  # '' = vendored byte-level BPE; else a tokenizer.json / SentencePiece .model
        babi_dir="",  # '' = vendored bAbI files (source babi_file)
        split="train",  # split of babi_file / babilong_tfds used for training
        generated_records=1 << 30,  # length of the babi_generated stream (effectively unlimited)
        tfds_data_dir="",  # where babilong_tfds datasets were built
        babilong_length="1k",  # one length, or several to mix ("0k,1k,2k")
        text_paths="",  # comma-separated files or directories of *.txt / *.txt.gz (source text)
        paths="",  # comma-separated prepared datasets or globs of their *.array_record (local or gs://)
        # a held-out prepared dataset: the held-out loss and perplexity of its first
        # train.eval_samples rows are evaluated every train.eval_every steps and at the end
        eval_paths="",
    ))


def _fail(field: str, value, why: str) -> None:
    raise ConfigError(f"data.{field}", value, why)


def _int(cfg, field: str, minimum: int, maximum: int | None = None) -> None:
    value = cfg[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        _fail(field, value, f"must be an integer >= {minimum}{bound}")


def _choice(cfg, field: str, choices) -> None:
    if cfg[field] not in choices:
        _fail(field, cfg[field], f"must be one of {', '.join(map(str, choices))}")


def tasks(cfg: ml_collections.ConfigDict) -> list[str]:
    """The canonical tasks named by ``data.task``: one, a list ("qa1,qa3") or a range ("qa1-qa5")."""
    try:
        return babi.expand_tasks(cfg.task)
    except DataError as e:
        _fail("task", cfg.task, str(e))


def lengths(cfg: ml_collections.ConfigDict) -> list[str]:
    """The BABILong lengths named by ``data.babilong_length`` ("1k" or "0k,1k,2k")."""
    try:
        return babilong.expand_lengths(cfg.babilong_length)
    except DataError:
        _fail("babilong_length", cfg.babilong_length, f"must be one or more of {', '.join(babilong.LENGTHS)}")


def components(cfg: ml_collections.ConfigDict) -> list[tuple[str, str | None]]:
    """(task, length) of every source the training mix reads: tasks outer, lengths inner; the
    length is None for the bAbI sources; text has one component."""
    if cfg.source in ("text", "array_record"):
        return [(cfg.source, None)]
    per_task = lengths(cfg) if cfg.source.startswith("babilong") else [None]
    return [(t, n) for t in tasks(cfg) for n in per_task]


def mix_weights(cfg: ml_collections.ConfigDict) -> list[float]:
    """One weight per component, summing to 1 (uniform when ``data.mix_weights`` is empty)."""
    parts = components(cfg)
    if not cfg.mix_weights.strip():
        return [1.0 / len(parts)] * len(parts)
    try:
        weights = [float(w) for w in cfg.mix_weights.split(",")]
    except ValueError:
        _fail("mix_weights", cfg.mix_weights, "must be comma-separated numbers")
    if len(weights) != len(parts) or min(weights) <= 0:
        names = ", ".join(t if n is None else f"{t}@{n}" for t, n in parts)
        _fail("mix_weights", cfg.mix_weights, f"needs {len(parts)} positive weights, one per component ({names})")
    return [w / sum(weights) for w in weights]


def validate(cfg: ml_collections.ConfigDict, process_count: int | None = None) -> ml_collections.ConfigDict:
    """Check every field (and that ``batch_size`` splits evenly over ``process_count`` hosts)."""
    known = set(defaults().keys())
    for field in cfg.keys():
        if field not in known:
            _fail(field, cfg[field], f"unknown field; known fields: {', '.join(sorted(known))}")
    for field in known:
        if field not in cfg:
            _fail(field, None, "missing (start from lm2_jax.data.options.defaults())")
    _choice(cfg, "source", SOURCES)
    _choice(cfg, "mode", MODES)
    _choice(cfg, "truncate", qa.TRUNCATE_MODES)
    if not isinstance(cfg.extra_questions, (int, float)) or not 0 <= cfg.extra_questions <= 1:
        _fail("extra_questions", cfg.extra_questions, "must be a share between 0 and 1")
    if cfg.extra_questions and cfg.source not in ("babi_generated", "babi_file"):
        _fail("extra_questions", cfg.extra_questions,
              f"needs data.source babi_generated or babi_file, not {cfg.source!r}")
    _int(cfg, "seq_len", 8)
    _int(cfg, "batch_size", 1)
    _int(cfg, "seed", 0, 2**32 - 1)
    _int(cfg, "num_epochs", 0)
    _int(cfg, "read_threads", 1)
    _int(cfg, "prefetch_buffer", 1)
    _int(cfg, "worker_count", 0)
    _int(cfg, "generated_records", 1)
    if not isinstance(cfg.shuffle, bool):
        _fail("shuffle", cfg.shuffle, "must be a bool")
    for field in ("tokenizer", "babi_dir", "tfds_data_dir", "text_paths", "paths", "eval_paths"):
        if not isinstance(cfg[field], str):
            _fail(field, cfg[field], "must be a string ('' for the default)")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        _fail("tokenizer", cfg.tokenizer, "no such file (a tokenizer.json; '' for the bundled one)")
    if cfg.babi_dir and not os.path.isdir(cfg.babi_dir):
        _fail("babi_dir", cfg.babi_dir, "no such directory ('' for the bundled bAbI files)")
    if cfg.source not in ("text", "array_record"):
        for task in tasks(cfg):
            if cfg.source != "babi_file" and task not in babi_gen.GENERATED_TASKS:
                _fail("task", cfg.task, f"source {cfg.source} has tasks {', '.join(babi_gen.GENERATED_TASKS)}")
    if cfg.source in ("babi_file", "babilong_tfds"):
        _choice(cfg, "split", babi.SPLITS)
    if cfg.source.startswith("babilong"):
        lengths(cfg)
    if not isinstance(cfg.mix_weights, str):
        _fail("mix_weights", cfg.mix_weights, "must be a string of comma-separated weights ('' = uniform)")
    mix_weights(cfg)
    if cfg.source == "babilong_tfds":
        if not cfg.tfds_data_dir:
            _fail("tfds_data_dir", cfg.tfds_data_dir, "source babilong_tfds needs the directory it was built in")
    if cfg.source == "text" and not cfg.text_paths.strip():
        _fail("text_paths", cfg.text_paths, "source text needs files or directories")
    if cfg.source == "array_record" and not cfg.paths.strip():
        _fail("paths", cfg.paths, "source array_record needs prepared datasets (python -m lm2_jax.data.prepare)")
    if cfg.source == "array_record" and cfg.mode != "pack":
        _fail("mode", cfg.mode, "source array_record packs its documents into full rows: set data.mode='pack'")
    if process_count is not None and cfg.batch_size % process_count:
        _fail("batch_size", cfg.batch_size, f"must be divisible by the number of hosts ({process_count})")
    return cfg

"""TFDS builder ``babilong``: BABILong samples written to ArrayRecord from local files.

One config per task and length, ``qa1_0k`` … ``qa10_128k``. Split ``train`` mixes the bAbI train
file with the training books, ``test`` the test file with the evaluation books. Everything is read
from local files (vendored by default), nothing is downloaded, and TensorFlow is not needed: with
ArrayRecord, ``tfds.data_source`` gives random access for Grain::

    from lm2_jax.data import tfds_babilong
    tfds_babilong.prepare("qa1", "4k", data_dir=DIR)            # once, or from the shell:
    #   python -m lm2_jax.data.tfds_babilong --task qa1 --length 4k --data-dir DIR
    source = tfds.data_source("babilong/qa1_4k", data_dir=DIR)  # {'train': ..., 'test': ...}

Records keep the generation order (record ``i`` of a split is its ``i``-th built sample); each has
the token ids (``context_ids`` has exactly the target length), the decoded context, the question,
the answer and the offsets of the facts. Ids depend on the tokenizer, so its fingerprint is stored
in the dataset metadata with the seed, the sources and the indices of samples left out because
their facts alone exceed the length (``babilong.split_samples``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lm2_jax.data import babi, babi_gen, babilong
from lm2_jax.data.tokenizer import load_tokenizer
from lm2_jax.errors import DataError, MissingFileError

NAME = "babilong"
TASKS = babi_gen.GENERATED_TASKS


class BabilongConfig(tfds.core.BuilderConfig):
    """``{task}_{length}``."""

    def __init__(self, task: str, length: str):
        super().__init__(name=f"{task}_{length}",
                         description=f"bAbI {task} facts in {length} tokens of book text")
        self.task, self.length = task, length


class Babilong(tfds.core.GeneratorBasedBuilder):
    """BABILong (bAbI facts hidden in public-domain books), built from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [BabilongConfig(t, n) for t in TASKS for n in babilong.LENGTHS]

    def __init__(self, *, babi_dir: str | None = None, haystack_dir: str | None = None,
                 tokenizer_path: str | None = None, seed: int = 0, limit: int | None = None, **kwargs):
        """``babi_dir`` / ``haystack_dir`` / ``tokenizer_path``: ``None`` = vendored; ``limit``:
        only the first samples of each bAbI file (small test builds)."""
        self._babi_dir, self._haystack_dir = babi_dir, haystack_dir
        self._tokenizer_path, self._seed, self._limit = tokenizer_path, seed, limit
        self._skipped: dict[str, list[int]] = {}
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default looks the module up through `importlib_resources`, a package it does not
        # install on Python >= 3.9; the file path is all it needs.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        ids = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "index": np.int32,
                "context": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "context_ids": ids,
                "question_ids": ids,
                "answer_ids": ids,
                "fact_starts": ids,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/2406.10149",
            citation="Weston et al. 2016 (bAbI, arXiv:1502.05698); Kuratov et al. 2024 (BABILong).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        tokenizer = load_tokenizer(self._tokenizer_path)
        self.info.metadata.update({
            "tokenizer": self._tokenizer_path or "vendored",
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "seed": self._seed,
            "babi_dir": self._babi_dir or "vendored",
            "haystack_dir": self._haystack_dir or "vendored",
            "limit": self._limit,
            "skipped": self._skipped,
        })
        return {split: self._generate_examples(split, tokenizer) for split in ("train", "test")}

    def _generate_examples(self, split, tokenizer):
        cfg = self.builder_config
        skipped = self._skipped.setdefault(split, [])
        for s in babilong.split_samples(cfg.task, split, cfg.length, tokenizer, seed=self._seed,
                                        babi_dir=self._babi_dir, haystack_dir=self._haystack_dir,
                                        limit=self._limit, skipped=skipped):
            yield s.index, {
                "index": s.index,
                "context": tokenizer.decode(s.context_ids),
                "question": s.question,
                "answer": s.answer,
                "context_ids": s.context_ids,
                "question_ids": s.question_ids,
                "answer_ids": s.answer_ids,
                "fact_starts": s.fact_starts,
            }


def prepare(task: str, length: str, data_dir: str | Path, **builder_kwargs) -> Babilong:
    """Build ``babilong/{task}_{length}`` into ``data_dir``.

    If it is already there it is reused, but only if it was built from the same sources, seed,
    limit and tokenizer; otherwise a ValueError names what differs (use another ``data_dir``).
    """
    task = babi.canonical_task(task)
    babilong.length_tokens(length)  # an unknown length is named here, not deep inside TFDS
    if task not in TASKS:
        raise DataError(f"task {task!r}: BABILong is built for {', '.join(TASKS)}")
    builder = Babilong(config=f"{task}_{length}", data_dir=str(data_dir), file_format="array_record",
                       **builder_kwargs)
    builder.download_and_prepare()
    wanted = {
        "tokenizer_fingerprint": load_tokenizer(builder_kwargs.get("tokenizer_path")).fingerprint,
        "seed": builder_kwargs.get("seed", 0),
        "babi_dir": builder_kwargs.get("babi_dir") or "vendored",
        "haystack_dir": builder_kwargs.get("haystack_dir") or "vendored",
        "limit": builder_kwargs.get("limit"),
    }
    built = built_metadata(task, length, data_dir)
    differ = {k: (built.get(k), v) for k, v in wanted.items() if built.get(k) != v}
    if differ:
        raise DataError(f"{NAME}/{task}_{length} in {data_dir} was built differently "
                         f"(field: (built, requested)) {differ}; use another data_dir")
    return builder


def built_metadata(task: str, length: str, data_dir: str | Path) -> dict:
    """The metadata (tokenizer fingerprint, seed, sources, left-out samples) of a built config."""
    path = Path(data_dir) / NAME / f"{task}_{length}" / str(Babilong.VERSION) / "metadata.json"
    if not path.is_file():
        raise MissingFileError(f"{NAME}/{task}_{length} is not built in {data_dir} (no {path})")
    return json.loads(path.read_text())


def data_source(task: str, length: str, split: str, data_dir: str | Path):
    """Random-access source of a built split (``tfds.data_source``); a clear error if not built."""
    name = f"{NAME}/{task}_{length}"
    try:
        return tfds.data_source(name, split=split, data_dir=str(data_dir))
    except Exception as e:  # TFDS raises several types for a missing dataset
        raise MissingFileError(
            f"cannot open {name} split {split!r} in {data_dir} ({e.__class__.__name__}: {e}); build it "
            f"with lm2_jax.data.tfds_babilong.prepare({task!r}, {length!r}, data_dir={str(data_dir)!r})"
        ) from e


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm2_jax.data.tfds_babilong", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="qa1 ... qa10 (comma-separated for several)")
    parser.add_argument("--length", required=True, help="0k 1k 2k 4k 8k 16k 32k 64k 128k (comma-separated)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--babi-dir", default=None, help="bAbI files (default: vendored en)")
    parser.add_argument("--haystack-dir", default=None, help="books (default: vendored)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default: vendored)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for task in args.task.split(","):
        for length in args.length.split(","):
            builder = prepare(task, length, args.data_dir, babi_dir=args.babi_dir, haystack_dir=args.haystack_dir,
                              tokenizer_path=args.tokenizer, seed=args.seed)
            splits = {name: info.num_examples for name, info in builder.info.splits.items()}
            print(f"{NAME}/{task}_{length}: {splits}, left out: {builder.info.metadata.get('skipped')}")


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)

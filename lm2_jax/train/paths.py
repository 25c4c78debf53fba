"""Workdir paths: a local directory or an object-store URL (`gs://bucket/runs/x`).

Everything the trainer keeps in a workdir (config.json, checkpoints, metrics.jsonl, TensorBoard
events, curriculum.json, imported.json) goes through `etils.epath`, which Orbax uses too, so a
`gs://` workdir is read and written in place on every host (with `pip install -e ".[tpu]"`, which
brings gcsfs for epath and google-cloud-storage for TensorBoard's writer). A local path is made
absolute (Orbax needs that); a URL is passed through untouched.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path) -> bool:
    return "://" in str(path)


def workdir_path(path) -> epath.Path:
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(path))

"""Hugging Face model folders on disk: sharded safetensors and their index, written one tensor at
a time and read back lazily (a tensor is loaded only when asked for). Never pickle."""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lm2_jax.errors import DataError, MissingFileError, UsageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """Bytes of '5GB', '500MB', '50KiB' or a plain number (Hugging Face's spelling: GB = 10^9)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"{flag}={text}: not a size (e.g. 5GB, 500MB, 2GiB, or bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


class ShardWriter:
    """Adds tensors in order to shards of at most `max_bytes` (a tensor larger than that gets a
    shard of its own); `close` names them `model-0000k-of-0000n.safetensors` and writes the index,
    or leaves one `model.safetensors` when everything fit in one. At most one shard is held."""

    def __init__(self, directory: str, max_bytes: int, dtype: str = "float32"):
        self.directory, self.max_bytes, self.dtype = directory, max_bytes, DTYPES[dtype]
        self._shard: dict[str, np.ndarray] = {}
        self._bytes = 0
        self._files: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(np.asarray(array).astype(self.dtype))
        if self._shard and self._bytes + array.nbytes > self.max_bytes:
            self._flush()
        self._shard[name] = array
        self._bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = os.path.join(self.directory, f"shard-{len(self._files):05d}.tmp")
        save_file(self._shard, path, metadata={"format": "pt"})
        os.chmod(path, 0o644)  # safetensors creates its files private
        self._files.append((path, list(self._shard)))
        self._shard, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Finish the files; returns their names."""
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            os.replace(self._files[0][0], os.path.join(self.directory, SINGLE))
            return [SINGLE]
        weight_map, names = {}, []
        for k, (path, tensors) in enumerate(self._files):
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.directory, name))
            weight_map.update({t: name for t in tensors})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        return names + [INDEX]


class HFFolder:
    """A Hugging Face model folder: its `config.json` and a lazy name -> float32 array mapping over
    `model.safetensors` or the shards its index lists (each checked to exist up front)."""

    def __init__(self, directory: str, flag: str = "--from_hf"):
        self.directory = directory
        if not os.path.isdir(directory):
            raise MissingFileError(f"{flag}={directory}: no such directory")
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise MissingFileError(f"{flag}={directory}: no config.json there (not a Hugging Face model folder?)")
        with open(config_path) as f:
            self.config = json.load(f)
        index_path, single = os.path.join(directory, INDEX), os.path.join(directory, SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise DataError(f"{index_path}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(directory, shard)):
                    raise MissingFileError(f"{flag}={directory}: shard {shard} listed in {INDEX} is missing")
            self._where = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, "numpy") as f:
                self._where = {name: single for name in f.keys()}
        else:
            found = sorted(os.listdir(directory))
            hint = " (PyTorch .bin weights are pickles and are not read; save with safetensors)" if any(
                n.endswith(".bin") for n in found) else ""
            raise MissingFileError(f"{flag}={directory}: neither {SINGLE} nor {INDEX} there{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._where[name], "numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(self._where[name], "numpy") as f:
            return np.asarray(f.get_tensor(name), np.float32)

"""Orbax checkpoints of the train state together with the Grain iterator position.

A checkpoint `<workdir>/checkpoints/<step>/` holds `state` (step, params, optimizer state, streamed
memory; restored against an abstract state carrying the target shardings, so it loads onto any
mesh) and `data` (one JSON iterator state per process, Grain's handler). Orbax writes into a
temporary directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import logging
import time

import grain
import jax
import orbax.checkpoint as ocp

from lm2_jax.errors import CheckpointError
from lm2_jax.train.paths import workdir_path

log = logging.getLogger(__name__)


class _FrozenIterator:
    """The iterator state at save time, so a background save can never see a later position."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def saved_tree(state) -> dict:
    """The parts of a TrainState that go to disk (the optimizer definition is code, not state).

    The streamed memory goes too; without carry="stream" it is an empty array, which is left out."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.mem.size:
        tree["mem"] = state.mem
    return tree


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = workdir_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, iterator, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(saved_tree(state)),
                                  data=grain.checkpoint.CheckpointSave(_FrozenIterator(iterator)))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, iterator):
        """Restore the newest readable checkpoint: (state, iterator, data restored?); (None, iterator,
        False) if there is none.

        The iterator position is restored when the checkpoint holds this process's file (same
        process count); otherwise only the state is, and the caller replays the data.

        `abstract_state` is the TrainState of ShapeDtypeStructs (with shardings) to restore onto.
        An unreadable checkpoint is skipped with a warning naming it; if every one is unreadable,
        CheckpointError names the directory.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            mine = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            with_data = mine.exists()
            items = {"state": ocp.args.StandardRestore(saved_tree(abstract_state))}
            if with_data:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # orbax raises many types for truncated or corrupt files
                where = self.directory / str(step)
                msg = f"checkpoint {where} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                # Moved aside (not deleted): it would block saving this step again and be retried
                # on every start, and it stays there for inspection.
                aside = where.parent / f"{where.name}.unreadable-{int(time.time())}"
                where.rename(aside)
                self.manager.reload()
                log.warning("%s; moved to %s, falling back to an older checkpoint", msg, aside)
                failures.append(msg)
                continue
            tree = dict(restored["state"])
            tree.setdefault("mem", jax.numpy.zeros(abstract_state.mem.shape, abstract_state.mem.dtype))
            return abstract_state.replace(**tree), (restored["data"] if with_data else iterator), with_data
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))
        return None, iterator, False

    def close(self) -> None:
        self.manager.close()



def _merged(defaults: dict, tree: dict) -> dict:
    """`tree` over `defaults`, section by section (unknown fields kept, for validate to name)."""
    out = dict(defaults)
    for key, value in tree.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = _merged(defaults[key], value) if nested else value
    return out


def read_config(workdir: str):
    """The validated config a training workdir was run with (its `config.json`); fields added to
    the schema since the run was written read as their defaults."""
    import ml_collections

    from lm2_jax import config as cfglib
    from lm2_jax.errors import MissingFileError

    config_path = workdir_path(workdir) / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"--workdir={workdir}: no config.json there (not a training workdir?)")
    try:
        tree = _merged(cfglib.defaults().to_dict(), json.loads(config_path.read_text()))
        return cfglib.validate(ml_collections.ConfigDict(tree))
    except cfglib.ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as err:  # not JSON, or sections missing
        raise CheckpointError(f"{config_path} is not a config this version can read ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None


def find_step(workdir: str, step: int | None = None, flag: str = "--workdir") -> tuple[str, int]:
    """(checkpoint directory, step): `step`, or the newest, of the workdir's checkpoints."""
    from lm2_jax.errors import UsageError

    directory = workdir_path(workdir) / "checkpoints"
    steps = sorted(ocp.CheckpointManager(directory).all_steps()) if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"{flag}={workdir}: no checkpoint in {directory}")
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise UsageError(f"--step={step}: {directory} has checkpoints at steps {steps}")
    return directory, int(step)


def abstract_params(config) -> dict:
    """The params of `config`'s model as ShapeDtypeStructs (unboxed, no sharding)."""
    import flax.linen as nn

    from lm2_jax.train import optimizer as optlib, state as statelib

    return nn.meta.unbox(statelib.abstract_boxed_state(config, optlib.make_optimizer(config.train)).params)


def restore_params(directory: str, step: int, like: dict, as_numpy: bool = False) -> dict:
    """Only the params (or the subtree `like` names) of checkpoint `step`: nothing else is read.

    `like` holds ShapeDtypeStructs; with `as_numpy` the leaves come back as host numpy arrays,
    else as jax arrays on each leaf's `sharding` (any mesh: Orbax reassembles what was written on
    another)."""
    import numpy as np

    def args(leaf):
        if as_numpy or getattr(leaf, "sharding", None) is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)

    item = {"params": like}
    try:
        restored = ocp.CheckpointManager(directory).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=jax.tree.map(args, item), partial_restore=True)))
    except Exception as err:  # orbax raises many types for truncated or corrupt files
        raise CheckpointError(f"checkpoint {directory}/{step} is unreadable "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return restored["state"]["params"]


def load_params(workdir: str, step: int | None = None):
    """(config, params, step) of a training workdir: its `config.json` and the params of checkpoint
    `step` (default: the newest), for evaluation and generation on one device."""
    config = read_config(workdir)
    directory, step = find_step(workdir, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params(config))
    return config, restore_params(directory, step, like), step


IMPORTED = "imported.json"  # marks a workdir written by `--from_hf`: params only, a starting point


def _write_workdir(workdir: str, config, step: int, tree: dict) -> str:
    """`config.json` and one checkpoint (`state` = `tree`, no data iterator) in `workdir`."""
    root = workdir_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
    directory = root / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    manager.close()
    return str(directory / str(step))


def write_params(workdir: str, params, config, provenance: dict) -> str:
    """A workdir holding `params` as its step-0 checkpoint (no optimizer state, no data iterator:
    `python -m lm2_jax.export --from_hf` output, read by `load_params` and `train.init_from`) and
    `imported.json` saying where they came from."""
    written = _write_workdir(workdir, config, 0, {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params})
    (workdir_path(workdir) / IMPORTED).write_text(json.dumps(provenance, indent=2))
    return written


def write_state(workdir: str, state, config) -> str:
    """A training workdir holding `state` as its checkpoint: the config and the train state, no
    data iterator (a run resuming it replays its data from the top). For tests and tools."""
    return _write_workdir(workdir, config, int(state.step), saved_tree(state))

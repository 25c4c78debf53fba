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
import os
import time

import grain
import jax
import orbax.checkpoint as ocp

from lm2_jax.errors import CheckpointError

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
        self.directory = os.path.abspath(directory)
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
            mine = os.path.join(self.directory, str(step), "data",
                                f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            with_data = os.path.exists(mine)
            items = {"state": ocp.args.StandardRestore(saved_tree(abstract_state))}
            if with_data:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # orbax raises many types for truncated or corrupt files
                where = os.path.join(self.directory, str(step))
                msg = f"checkpoint {where} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                # Moved aside (not deleted): it would block saving this step again and be retried
                # on every start, and it stays there for inspection.
                aside = f"{where}.unreadable-{int(time.time())}"
                os.rename(where, aside)
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



def load_params(workdir: str, step: int | None = None):
    """(config, params, step) of a training workdir: its `config.json` and the params of checkpoint
    `step` (default: the newest), for evaluation and generation on one device."""
    import flax.linen as nn
    import ml_collections

    from lm2_jax import config as cfglib
    from lm2_jax.errors import MissingFileError, UsageError
    from lm2_jax.train import optimizer as optlib, state as statelib

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise MissingFileError(f"--workdir={workdir}: no config.json there (not a training workdir?)")
    try:
        with open(config_path) as f:
            tree = json.load(f)
        config = cfglib.validate(ml_collections.ConfigDict(tree))
    except cfglib.ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as err:  # not JSON, or sections missing
        raise CheckpointError(f"{config_path} is not a config this version can read ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = sorted(ocp.CheckpointManager(directory).all_steps()) if os.path.isdir(directory) else []
    if not steps:
        raise CheckpointError(f"--workdir={workdir}: no checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UsageError(f"--step={step}: {directory} has checkpoints at steps {steps}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tx = optlib.make_optimizer(config.train)
    fresh = nn.meta.unbox(statelib.abstract_boxed_state(config, tx))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), fresh)
    try:
        restored = ocp.CheckpointManager(directory).restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_tree(abstract))))
    except Exception as err:  # orbax raises many types for truncated or corrupt files
        raise CheckpointError(f"checkpoint {directory}/{step} is unreadable "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return config, restored["state"]["params"], int(step)

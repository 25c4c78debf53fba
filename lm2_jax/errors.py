"""The one family of errors lm2-jax raises for bad input.

Every error a user can cause (a config value, a flag, a file, a malformed dataset, a checkpoint
that cannot be read, a loss that went non-finite) is an `Lm2Error`. The CLIs catch exactly this
type (`lm2_jax.cli`) and print `error: <message>` and exit 1; anything else is a bug and keeps
its traceback. Each message names the culprit: the config field, the flag, the file, the line.

The subclasses also derive from the builtin a caller would expect (`ValueError`,
`FileNotFoundError`, `RuntimeError`), so `except ValueError` written against older versions, and
libraries that catch builtins, keep working.
"""

from __future__ import annotations


class Lm2Error(Exception):
    """Base of every error lm2-jax raises for something the user can fix."""


class ConfigError(Lm2Error, ValueError):
    """An impossible config value; the message names the field and the value."""

    def __init__(self, field: str, value, why: str):
        self.field, self.value = field, value
        super().__init__(f"config field {field}={value!r}: {why}")


class UsageError(Lm2Error, ValueError):
    """A bad command-line value that is not a config field; the message names the flag."""


class DataError(Lm2Error, ValueError):
    """Data that cannot be used: a malformed file, an unknown task or split, a sample too long."""


class MissingFileError(Lm2Error, FileNotFoundError):
    """A file or directory the run needs does not exist (or cannot be created)."""


class CheckpointError(Lm2Error, RuntimeError):
    """No checkpoint in the workdir could be restored; the message lists what was tried."""


class NonFiniteLossError(Lm2Error, RuntimeError):
    """The loss of a step was NaN or infinite; the message names the step and the newest checkpoint."""

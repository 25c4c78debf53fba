"""How every `python -m lm2_jax.*` command starts, reports bad input and exits.

One behaviour for all of them: a user's mistake (any `Lm2Error`, a `--config` file that does not
exist, an override of a field the config does not have, a flag value that does not parse) prints
one line `error: <message naming the culprit>` on stderr and exits 1; anything else is a bug and
keeps its traceback.

Commands that take a config use absl with `config_flags` (`config_flag` + `run`); commands without
a config use argparse (`run_argparse`). Flags are defined when the command runs, never when a
module is imported, so library modules with a CLI stay importable side by side.

`--config.model.nonsense=1` fails while absl parses flags (or, with the default config file, while
the flag is defined), before `main` runs; both places are covered here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from lm2_jax.errors import Lm2Error, UsageError


def fail(message: str) -> None:
    """Print the one error line and exit 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _override_culprit(err: Exception, argv) -> str:
    """Name the `--config.x.y=v` argument whose field does not exist (the error only names `y`)."""
    key = str(err).strip("\"'")
    overrides = [a for a in argv[1:] if re.match(r"-{1,2}(no)?config\.", a)]
    named = [a for a in overrides if key in re.split(r"[.=]", a.lstrip("-"))]
    arg = (named or overrides or ["--config.?"])[0]
    path = arg.split("=", 1)[0].split(".", 1)[1]
    return f"{arg}: the config has no field {path}"


def _config_load_error(flag_name: str, filename: str, err: Exception) -> str:
    path = filename.partition(":")[0]
    if not os.path.exists(path):
        return f"--{flag_name}={filename}: no such config file"
    return f"--{flag_name}={filename} could not be loaded: {err}"


def config_flag(default: str, help_string: str = "Path to an ml_collections config file (file.py or file.py:arg)."):
    """`config_flags.DEFINE_config_file("config", ...)` with bad overrides turned into one error line."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_string)
    except (AttributeError, KeyError) as err:  # the default file is parsed here, overrides included
        fail(_override_culprit(err, sys.argv))


def _parse_flags(argv):
    """absl's flag parsing, with its failures (and the config flag's) reported as one line."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as err:  # a value that does not parse, an unknown flag
        fail(str(err))
    except (AttributeError, KeyError) as err:
        fail(_override_culprit(err, argv))
    except OSError as err:  # overrides of a config file that did not load
        filename = next((a.split("=", 1)[1] for a in argv if re.match(r"-{1,2}config=", a)), "?")
        fail(_config_load_error("config", filename, err))
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        # a config_flags flag (one left at a None default has no file to check)
        if flag.name == name and flag.value is not None and hasattr(flag, "config_filename"):
            try:
                flag.value.keys()  # a file that failed to load raises on first use, not at parse time
            except OSError as err:
                fail(_config_load_error(name, flag.config_filename, err))
    return rest


def _guarded(main: Callable[[list[str]], int | None]):
    def call(argv):
        try:
            return main(argv) or 0
        except Lm2Error as err:
            fail(str(err))
    return call


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)` with lm2-jax's error behaviour; `main` returns an exit code or None."""
    from absl import app

    app.run(_guarded(main), flags_parser=_parse_flags)


def run_argparse(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """For commands without a config: `main(argv)` parses its own arguments (argparse)."""
    try:
        code = main(argv)
    except Lm2Error as err:
        fail(str(err))
    sys.exit(code or 0)


def no_extra_args(argv) -> None:
    """absl passes unparsed positional arguments through; a command that takes none says so."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])} (flags are --name=value)")

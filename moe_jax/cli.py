"""Command-line entry points (``experiments/*.py``): a user's mistake is one ``error:`` line, not a traceback.

    from moe_jax import cli
    if __name__ == "__main__":
        cli.run(main)                      # instead of absl's app.run(main)

* Command-line mistakes (an unknown ``--config.*`` field, a ``--config`` file that does not exist or fails to
  load, a flag value of the wrong type, a missing required flag) print ``error: ...`` and exit with code 2,
  before JAX is imported or anything compiles.
* Expected failures inside ``main`` (``is_user_error``: config validation, data, resume refusals, an
  unwritable workdir, a diverged run) print ``error: ...`` and exit with code 1.
* ``MOE_JAX_VERBOSE=1`` in the environment keeps the full traceback of both kinds instead.
* Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, List, Optional, Sequence

VERBOSE_ENV = "MOE_JAX_VERBOSE"
USAGE_EXIT, ERROR_EXIT = 2, 1
# A ValueError / OSError / RuntimeError whose message starts with one of these names a config field or a
# flag: it is the user's to fix. Other messages are bugs and keep their traceback.
FIELD_PREFIXES = ("config.", "model.", "moe.", "data.", "train.", "init.", "mesh.", "seed", "--", "MoELayer",
                  "compare config", "compare:", "block ", "a batch of", "batch of", "the converted", "cannot split",
                  "shared experts", "split_ffn", "upcycle_ffn", "taylor_importance", "router ", "generate:")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def fail(msg: str, code: int) -> None:
    print(f"error: {one_line(msg)}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def is_user_error(e: BaseException) -> bool:
    """True for the exceptions that are a user's mistake with a message naming the field and the fix."""
    from moe_jax.data import DataConfigError
    from moe_jax.train import TrainingDivergedError, WorkdirConflictError
    if isinstance(e, (TrainingDivergedError, PermissionError, DataConfigError, WorkdirConflictError)):
        return True
    return isinstance(e, (ValueError, OSError, RuntimeError)) and str(e).lstrip("'\"").startswith(FIELD_PREFIXES)


def _config_flag_names(argv: Sequence[str]) -> List[str]:
    from absl import flags
    from ml_collections import config_flags
    names = []
    for name, flag in flags.FLAGS._flags().items():  # noqa: SLF001 - the registered flag objects
        if isinstance(flag, config_flags.config_flags._ConfigFlag) and name not in names:  # noqa: SLF001
            names.append(name)
    return names


def _config_file_arg(argv: Sequence[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_file(argv: Sequence[str], name: str = "config") -> None:
    """A ``--config`` path (``file.py`` or ``file.py:arg``) that is no file: one line, before absl loads it."""
    value = _config_file_arg(argv, name)
    if value is None:
        return
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        fail(f"--{name}={value}: no such config file (looked at {os.path.abspath(path)!r}). Pass a file of "
             "configs/, e.g. --config=configs/switch_top1.py:tiny.", USAGE_EXIT)


def _unknown_field_message(e: BaseException, argv: Sequence[str], name: str) -> Optional[str]:
    """``--config.train.stpes``: ml_collections raises KeyError/AttributeError("'stpes'\\nDid you mean ...")."""
    text = str(e.args[0]) if e.args else str(e)
    m = re.search(r"\\?'(\w+)\\?'", text)  # the key, quoted (and escaped once per re-raise)
    if not m:
        return None
    key = m.group(1)
    hint = re.search(r'Did you mean "(\w+)"', text)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith(f"--{name}.") and (f".{key}." in flag + "." or flag.endswith(f".{key}")):
            field = flag[len(name) + 3:]
            fix = ""
            if hint:
                parts = field.split(".")
                parts[parts.index(key)] = hint.group(1)
                fix = f" (did you mean --{name}.{'.'.join(parts)}?)"
            return (f"{flag}: the config has no field {key!r}{fix}; the fields and their defaults are in "
                    "configs/base.py.")
    return None


def parse_flags(argv: List[str]) -> List[str]:
    """absl's flag parsing with one-line errors (exit 2); returns the arguments that are not flags."""
    from absl import flags
    names = _config_flag_names(argv)
    for name in names:
        check_config_file(argv, name)
    try:
        rest = flags.FLAGS(argv)
        for name in names:  # the file is loaded during parsing; a failure to load surfaces on first access
            flags.FLAGS[name].value  # noqa: B018
        return rest
    except Exception as e:  # noqa: BLE001 - each kind is turned into one line below; the rest re-raised
        if verbose():
            raise
        if isinstance(e, (KeyError, AttributeError)):
            for name in names:
                msg = _unknown_field_message(e, argv, name)
                if msg:
                    fail(msg, USAGE_EXIT)
            raise
        if isinstance(e, OSError) and "Failed loading config file" in str(e):
            cause = e.__cause__ or e.__context__
            detail = one_line(str(cause) if cause else str(e).splitlines()[-1])
            fail(f"--config: the config file failed to load: {detail}", USAGE_EXIT)
        if isinstance(e, flags.Error):
            text = str(e)
            if "Error whilst parsing config file" in text:  # get_config raised: its last line says why
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                fail(f"{text.split(': Error whilst', 1)[0]}: the config file failed to load: {lines[-1]}", USAGE_EXIT)
            fail(f"{text.rstrip('.')}. Run with --helpfull for the flags.", USAGE_EXIT)
        raise


def wrap_main(main: Callable) -> Callable:
    """``main`` with ``is_user_error`` exceptions turned into ``error: ...`` and exit code 1."""

    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a user's mistake
            if verbose() or not is_user_error(e):
                raise
            fail(str(e), ERROR_EXIT)

    return wrapped


def run(main: Callable) -> None:
    """``absl.app.run(main)`` with one-line errors (see the module docstring)."""
    from absl import app
    app.run(wrap_main(main), flags_parser=parse_flags)

"""The `sae-jax` command line: thin parsing over library functions, one module per command.

Each command module has ``add_parser(subparsers, parents)`` (its parser, built from the shared parent
parsers of :mod:`sae_jax.cli.common`) and ``run(args) -> int``; :func:`main` dispatches and turns
errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from sae_jax import hostmem, quiet
from sae_jax.cli import common

EXIT_USER_ERROR = 2
EXIT_CHECKPOINT_FAILED = 3
"""A checkpoint or a trained SAE could not be written (e.g. a full disk); the message says what is intact."""
EXIT_NONFINITE = 4
"""Training produced NaN or Inf; nothing non-finite was saved (the message names the last good checkpoint)."""
EXIT_PREEMPTED = 143
"""Stopped by SIGTERM/SIGINT after saving a checkpoint (128 + SIGTERM); run again to resume."""

DESCRIPTION = """sae_jax: train sparse autoencoders on neural-network activations with JAX.

Typical session:
  sae-jax synth runs/synth --d-model 128 --n-features 512 --n-tokens 1000000
  sae-jax train configs/demo.yaml train.workdir=runs/demo
  sae-jax eval runs/demo --data runs/synth
Every config field is documented in sae_jax/config.py; see README.md."""

COMMANDS = ("train", "compile_check", "sweep", "report", "demo", "eval", "export", "import_", "synth", "store",
            "harvest", "eval_lm")
"""The command modules of this package, in the order `sae-jax --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="sae-jax", description=DESCRIPTION, formatter_class=common.MainFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = common.Parents()
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub, parents)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; user errors print one line and exit with status 2.

    Run as a program (``argv`` None), it first re-executes itself with huge-page malloc
    where that helps (``sae_jax.hostmem``).
    """
    if argv is None:
        hostmem.reexec_with_hugepages()
    quiet.install()
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `sae-jax`: the overview, not a usage error
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra and (not getattr(args, "overrides_after_flags", False) or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # launch/local.sh appends distributed.*= after harvest's flags
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line
        status = _checkpoint_status(e)
        if status is not None:
            return status
        if _is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


# (module, exception class, exit status, whether the line starts with 'error: ')
FAILURES = (("sae_jax.io.sae_folder", "SaveError", EXIT_CHECKPOINT_FAILED, True),
            ("sae_jax.train.checkpoint", "Preempted", EXIT_PREEMPTED, False),
            ("sae_jax.train.checkpoint", "CheckpointError", EXIT_CHECKPOINT_FAILED, True),
            ("sae_jax.train.state", "NonFiniteError", EXIT_NONFINITE, True))


def _checkpoint_status(e: Exception) -> int | None:
    """Exit status of a preempted run, a failed save, a diverged run or a full disk (one line printed), else None."""
    for module, name, status, is_error in FAILURES:
        mod = sys.modules.get(module)  # not imported: the exception cannot be one of its own
        if mod is not None and isinstance(e, getattr(mod, name)):
            print(f"error: {e}" if is_error else str(e), file=sys.stderr)
            return status
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        print(f"error: could not write '{e.filename}': {e.strerror}; free space there (or write elsewhere) and run "
              "the same command again.", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError):
        print(f"error: '{e.filename}': {e.strerror}; check the path and its permissions.", file=sys.stderr)
        return EXIT_USER_ERROR
    return None


def _is_user_error(e: Exception) -> bool:
    from sae_jax.config import ConfigError

    user = (ConfigError, FileNotFoundError, ValueError)
    lock = sys.modules.get("sae_jax.io.lock")
    if lock is not None:
        user += (lock.LockedError,)
    try:
        from sae_jax.data.store import StoreError

        user += (StoreError,)
    except ImportError:
        pass
    return isinstance(e, user)

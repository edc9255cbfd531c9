"""Library noise on stderr: the tracebacks that a failed asynchronous write makes libraries print.

When an Orbax checkpoint write fails (say, the disk is full), each of Orbax's writer threads
logs its failed array with a traceback (through absl), asyncio logs 'Task exception was never
retrieved', and tensorstore's callbacks into an event loop that Orbax has already closed print
'Event loop is closed' tracebacks (as unraisable exceptions): hundreds of lines. The same
failure reaches the training loop through the checkpoint manager and is reported there as one
``error:`` line naming the step, the cause and the last good checkpoint, so the command line
drops these. Only tracebacks made entirely of library frames are dropped (an error that passes
through sae_jax's own code is always shown), and ``SAE_JAX_DEBUG=1`` keeps everything.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

LIBRARIES = ("/orbax/", "/asyncio/", "/tensorstore/", "/etils/", "/concurrent/", "/threading.py")
LOGGERS = ("absl", "asyncio")


def _library_only(tb) -> bool:
    """Whether every frame of a traceback lies in the asynchronous-I/O libraries above."""
    frames = traceback.extract_tb(tb)
    return bool(frames) and all(any(lib in f.filename for lib in LIBRARIES) for f in frames)


def _library_exception(exc: BaseException | None) -> bool:
    """The exception and the whole chain of causes behind it were raised in library code only."""
    seen = 0
    while exc is not None and seen < 10:
        if exc.__traceback__ is not None and not _library_only(exc.__traceback__):
            return False
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return True


class _DropLibraryTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.name == "asyncio":  # 'Task exception was never retrieved' passes it in the args
            exc = next((a for a in (record.args or ()) if isinstance(a, BaseException)), None)
        return exc is None or not _library_exception(exc)


def _excepthook(previous):
    def hook(kind, value, tb):
        if value is not None and _library_exception(value) and _library_only(tb):
            return
        previous(kind, value, tb)

    return hook


def _unraisablehook(previous):
    def hook(unraisable):
        if unraisable.exc_value is not None and _library_exception(unraisable.exc_value):
            return
        previous(unraisable)

    return hook


def install() -> None:
    """Drop library-only tracebacks from the absl and asyncio loggers, sys.excepthook and
    sys.unraisablehook (tensorstore's callbacks into a closed loop end there), once."""
    if os.environ.get("SAE_JAX_DEBUG") == "1" or getattr(sys.excepthook, "sae_jax_quiet", False):
        return
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_DropLibraryTracebacks())
    hook = _excepthook(sys.excepthook)
    hook.sae_jax_quiet = True
    sys.excepthook = hook
    sys.unraisablehook = _unraisablehook(sys.unraisablehook)

"""One writer per work directory: ``WORKDIR/.lock``, taken by process 0 of a job.

A second ``sae-jax train`` or ``sweep`` on the same work directory would overwrite the
first one's config, metrics, checkpoints and summary. The lock is a small JSON file (host,
PID, process start time, command, heartbeat) made atomically with ``link(2)`` from a
unique temporary file: link is atomic on local and network filesystems (NFS included,
where O_EXCL and flock are not dependable), so of two writers racing for it exactly one
wins, on one host or many.

A lock is stale, and is taken over with a note, when its holder is gone: on this host its
PID no longer runs (or runs a different process, told by the start time); on another host
its heartbeat (the file's mtime, touched every ``HEARTBEAT_S`` seconds by the holder) is
older than ``STALE_S``. Only process 0 of a multi-process job takes the lock; the verdict is
shared with the other processes, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from sae_jax.io import layout

LOCK_FILE = layout.LOCK
HEARTBEAT_S = 30.0
STALE_S = 300.0
"""A lock held from another host whose heartbeat is older than this is stale (ten missed beats)."""


class LockedError(RuntimeError):
    """The work directory is held by another live writer."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"


class WorkdirLock:
    """``with WorkdirLock(workdir, command):`` holds ``WORKDIR/.lock`` for the block (process 0 only)."""

    def __init__(self, workdir: str | Path, command: str, enabled: bool = True, name: str = LOCK_FILE):
        self.path = Path(workdir) / name
        self.command, self.enabled = command, enabled
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                   "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -------------------------------------------------------------- taking and releasing
    def acquire(self) -> None:
        """Take the lock, or raise LockedError naming the holder; a stale lock is taken over, saying so."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race against another taker of a stale lock: look again
            if self._link():
                break
            holder = self._read()
            if holder is None:
                continue  # released (or half-written by a writer that is still linking) in between
            why = self._stale(holder)
            if why is None:
                what = holder.get("command", "another sae-jax run")
                raise LockedError(
                    f"{self.path.parent} is in use by {what} ({_describe(holder)}); wait for it to finish, stop it, "
                    "or choose another train.workdir. If that process is gone "
                    f"for good, delete {self.path}.")
            if self._take_over(holder):
                print(f"lock: took over the stale lock of {_describe(holder)} on {self.path.parent} ({why}).",
                      file=sys.stderr, flush=True)
                break
        else:
            raise LockedError(f"{self.path}: could not take the lock (other writers keep racing for it); try again.")
        self._beat = threading.Thread(target=self._heartbeat, name="sae_jax-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.enabled or self._beat is None:
            return
        self._stop.set()
        self._beat.join(timeout=5)
        self._beat = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        if self._beat is None:  # not held yet (``hold`` takes it before the block)
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -------------------------------------------------------------- the parts
    def _link(self) -> bool:
        """Create the lock atomically from a unique temporary file; False if it exists."""
        tmp = self.path.with_name(f"{self.path.name}.{self.me['host']}.{self.me['pid']}.{self.me['token'][:8]}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text()) | {"mtime": self.path.stat().st_mtime}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable or cut short: judged by its age alone
            try:
                return {"mtime": self.path.stat().st_mtime}
            except FileNotFoundError:
                return None

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder`` no longer holds the lock, or None if it may."""
        age = time.time() - holder["mtime"]
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return None if _alive(holder["pid"], holder.get("start_time")) else "its process is no longer running"
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock aside (rename is atomic: one taker wins) and take it; False if another took it."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.me['token'][:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError):
            moved = None
        if moved != holder.get("token"):  # another taker got there first: put its fresh lock back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._link()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full or gone disk: the run's own writes report it
                os.utime(self.path)


def hold(workdir: str | Path, command: str, name: str = LOCK_FILE) -> WorkdirLock:
    """The lock of a job's work directory, taken on process 0 and the verdict shared with every process.

    Raises LockedError on every process when process 0 could not take it.
    """
    import jax

    from sae_jax.sharding import is_main

    lock = WorkdirLock(workdir, command, enabled=is_main(), name=name)
    error = ""
    try:
        lock.acquire()
    except LockedError as e:
        error = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        code = np.frombuffer(error.encode()[:4000].ljust(4000), np.uint8)
        error = bytes(multihost_utils.broadcast_one_to_all(code)).decode().rstrip()
    if error:
        raise LockedError(error)
    return lock

"""Running `sae-jax` as a user does, in a real subprocess, for the bad-input and fault tests.

Every call checks the product's rule for bad input: no Python traceback on stderr or stdout,
whatever the exit status. ``cli_error`` also checks that a failure says one sentence
(one ``error: ...`` line) and returns it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
TRACEBACK = "Traceback (most recent call last)"


def assert_no_traceback(text: str, what: str = "") -> None:
    assert TRACEBACK not in text, f"a Python traceback was printed{' by ' + what if what else ''}:\n{text}"


def cli(*args, cwd: Path | str = ROOT, env: dict | None = None, timeout: float = 240,
        input: str | None = None) -> subprocess.CompletedProcess:
    """``python -m sae_jax ARGS`` to completion; asserts that it printed no traceback."""
    done = subprocess.run([sys.executable, "-m", "sae_jax", *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, input=input)
    assert_no_traceback(done.stdout + done.stderr, "sae-jax " + " ".join(map(str, args)))
    return done


def cli_start(*args, cwd: Path | str = ROOT, env: dict | None = None) -> subprocess.Popen:
    """``python -m sae_jax ARGS`` started in the background (to be killed by the test); text stdout/stderr pipes."""
    return subprocess.Popen([sys.executable, "-m", "sae_jax", *map(str, args)], cwd=cwd, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_error(*args, status: int = 2, **kw) -> str:
    """Run a command that must fail with ``status`` and one ``error:`` line; that line, without the prefix."""
    done = cli(*args, **kw)
    assert done.returncode == status, f"exit {done.returncode}, expected {status}:\n{done.stdout}\n{done.stderr}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line:\n{done.stderr}"
    return errors[0].removeprefix("error: ")

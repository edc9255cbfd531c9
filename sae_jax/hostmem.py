"""Host memory: glibc's malloc on transparent huge pages, for CPU training.

XLA:CPU allocates each step's scratch with glibc's malloc: about 1 GB per step for a 16k-latent
SAE at batch 4096. glibc serves blocks this large straight from mmap and unmaps them when they
are freed, so every step faults its scratch in again, 4 KiB at a time: about 0.65 µs per page
here, which made a ReLU pass over a [4096, 16384] array take 66 ms instead of 20 ms, and
``sae-jax train`` about 5% slower at d_model 768, 16,384 latents, batch 4096 (README). With
the tunable ``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc asks the kernel for transparent
huge pages, 512 times fewer faults. Tunables are read only when a
process starts, so the command line re-executes itself once with the tunable set. Nothing
changes on accelerators (their buffers are not malloc's) or where the kernel has THP off.
Set ``SAE_JAX_HUGEPAGES=0`` to keep the process as started.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_available() -> bool:
    """Whether this kernel grants transparent huge pages to a process that asks (madvise or always)."""
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def glibc_supports_hugetlb() -> bool:
    """glibc 2.35 or later (the release that added ``glibc.malloc.hugetlb``)."""
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def active() -> bool:
    """Whether this process runs with huge-page malloc."""
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def describe() -> str:
    """One phrase for benchmark headers."""
    return "malloc on transparent huge pages" if active() else "malloc on 4 KiB pages"


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with ``glibc.malloc.hugetlb=1``, once, where it helps.

    Call it first thing in a program's entry point (before threads or jax start). It returns
    without doing anything when the tunable is already set, when ``SAE_JAX_HUGEPAGES=0``, off
    Linux/glibc ≥ 2.35, or where the kernel has transparent huge pages off.
    """
    if active() or os.environ.get("SAE_JAX_HUGEPAGES", "1") == "0":
        return
    if sys.platform != "linux" or not glibc_supports_hugetlb() or not thp_available():
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = dict(os.environ, GLIBC_TUNABLES=":".join([*tunables, TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

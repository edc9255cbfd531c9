"""The files of a work directory, an SAE folder and an activation store, by name, and the one way a
file is written whole (``atomic_write``).

Every file name below is written here once; the modules that read or write a file use its constant.
This module imports nothing from the package, so any module can import it.

A work directory (``train.workdir``)::

    WORKDIR/config.yaml              CONFIG: the resolved config the run trains with
    WORKDIR/metrics.jsonl            METRICS: a line per logging step
    WORKDIR/summary.json             SUMMARY: the held-out metrics at the end
    WORKDIR/sae/                     SAE_DIR: the trained SAE (sae_jax.io.sae_folder)
    WORKDIR/checkpoints/             CHECKPOINTS (or checkpoint.dir); unreadable steps are moved to
    WORKDIR/checkpoints.corrupt/     CHECKPOINTS + CORRUPT_SUFFIX
    WORKDIR/.lock                    LOCK: the one writer's lock (sae_jax.io.lock)

A sweep's work directory (``sae-jax sweep``) adds::

    WORKDIR/sweep.json               PLAN: the grid, every member's point and the groups
    WORKDIR/members/NAME/            MEMBERS: each member a single run's work directory
    WORKDIR/sweep_summary.csv        REPORT_CSV, REPORT_JSON, PARETO: the report (sae_jax.eval.report),
    WORKDIR/sweep_summary.json       also written by `sae-jax report` into any folder
    WORKDIR/pareto.png

An SAE folder (``WORKDIR/sae/``): WEIGHTS (params.safetensors) and SPEC (sae.json); ``save`` writes it
as a hidden sibling ``.sae.partial`` (PARTIAL_SUFFIX) and moves the one it replaces to ``.sae.old``
(OLD_SUFFIX) for the instant between two renames.

An activation store (sae_jax.data.store): STORE_METADATA (metadata.json, written last), STORE_PROGRESS
(progress.json, while a writer fills ``STORE.partial``), GROUND_TRUTH (ground_truth.npy, synthetic
stores), a harvest's HARVEST_FILES (token ids, context index and position of every row, the contexts);
a finalized store that another replaces waits at ``STORE.replaced`` (REPLACED_SUFFIX), the part stores
of a multi-process harvest at ``STORE.parts`` (PARTS_SUFFIX).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# --------------------------------------------------------------------------- work directory
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SAE_DIR = "sae"
CHECKPOINTS = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
LOCK = ".lock"
PLAN = "sweep.json"
MEMBERS = "members"
REPORT_CSV = "sweep_summary.csv"
REPORT_JSON = "sweep_summary.json"
PARETO = "pareto.png"

# --------------------------------------------------------------------------- SAE folder
WEIGHTS = "params.safetensors"
SPEC = "sae.json"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"

# --------------------------------------------------------------------------- activation store
STORE_FORMAT = "sae_jax.activation_store"
"""The ``format`` field of a store's metadata.json."""
STORE_METADATA = "metadata.json"
STORE_PROGRESS = "progress.json"
GROUND_TRUTH = "ground_truth.npy"
HARVEST_TOKENS, HARVEST_CONTEXT, HARVEST_POSITION, HARVEST_CONTEXTS = (
    "tokens.npy", "context.npy", "position.npy", "contexts.npy")
REPLACED_SUFFIX = ".replaced"
PARTS_SUFFIX = ".parts"


# --------------------------------------------------------------------------- writing
def fsync(path: Path) -> None:
    """fsync a file or directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all.

    ``data`` (a str is written as UTF-8) goes to a temporary file in the same directory, which is
    fsynced and renamed over ``path``; then the directory is fsynced, so the rename is durable too. A
    reader sees the old file or the new one, never part of one, and concurrent writers (the jobs of a
    grid of jobs writing one report) each write their own temporary file. ``data`` may also be a
    function that writes the contents to the path it is given, for writers that take a path (e.g.
    safetensors' ``save_file``). If the write fails the temporary file is removed and the error raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)

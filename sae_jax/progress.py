"""Progress bars (tqdm) that stay readable in batch logs: at a terminal they redraw often; when
stderr is a file (SLURM, nohup, CI) they redraw at most every LOG_SECONDS, one line each."""

from __future__ import annotations

import sys

LOG_SECONDS = 30.0


def bar(total: int, start: int = 0, desc: str = "", unit: str = "step", **kw):
    """A tqdm bar from ``start`` to ``total``."""
    from tqdm.auto import tqdm

    interval = 0.1 if sys.stderr.isatty() else LOG_SECONDS
    return tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, mininterval=interval, **kw)

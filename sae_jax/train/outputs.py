"""What a job writes besides checkpoints: each member's metrics.jsonl, sae/ and summary.json.

Process 0 writes; every function here is called by the driver (``sae_jax.train.loop``) for each member of a
job, a single run being a job of one member.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from sae_jax import progress, sharding
from sae_jax.data import pipeline
from sae_jax.eval.store import evaluate
from sae_jax.io import layout, sae_folder
from sae_jax.sharding import is_main

if TYPE_CHECKING:
    from sae_jax.train.run import Member, Run
    from sae_jax.train.state import TrainState

SAVE_FIX = ("free space there or choose another train.workdir, then run the same command again: the checkpoints "
            "are intact, so it resumes from the last one and saves sae/ again")


class MetricsLog:
    """One member's metrics.jsonl: a line per logging step."""

    def __init__(self, path: Path, batch_size: int, start_step: int = 0):
        self.path, self.batch = path, batch_size
        # A fresh run starts the log over; a resumed one (start_step > 0) continues it.
        self.file = open(path, "a" if start_step else "w")  # noqa: SIM115 - closed in close()
        self.last_step, self.last_time = start_step, time.perf_counter()

    def write(self, step: int, values: dict[str, float], tokens: int) -> float:
        """Append the step's line; the tokens per second since the last line."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        self.file.write(json.dumps({"step": step, "tokens": tokens, **values, "tokens_per_s": rate}) + "\n")
        self.file.flush()
        return rate

    def close(self) -> None:
        self.file.close()


class JobLog:
    """Every member's MetricsLog and the job's progress bar (process 0 only; elsewhere it writes nothing)."""

    def __init__(self, members: list[Member], total: int, start_step: int, bar: bool, desc: str):
        main = is_main()
        self.logs = {m.name: MetricsLog(Path(m.cfg.train.workdir) / layout.METRICS, m.cfg.train.batch_size,
                                        start_step) for m in members} if main else {}
        self.bar = progress.bar(total, start_step, desc=desc) if main and bar else None
        self.single = len(members) == 1

    def write(self, step: int, rows: list[tuple[Member, dict[str, float]]]) -> None:
        """Each member's line of ``step``; the bar (with L0 and FVU when the job has one member)."""
        if not self.logs:
            return
        rate = 0.0
        for m, values in rows:
            rate = self.logs[m.name].write(step, values, tokens=step * m.cfg.train.batch_size)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if self.single:
                values = rows[0][1]
                self.bar.set_postfix(tok_s=f"{rate:,.0f}", l0=f"{values['l0']:.1f}", fvu=f"{values['fvu']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for log in self.logs.values():
            log.close()


def cut_log(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to ``step`` (a killed run wrote past it, maybe half a line)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("step", 0) <= step:
            rows.append(line + "\n")
    path.write_text("".join(rows))


def save_trained(run: Run, state: TrainState, workdir: Path) -> sae_folder.TrainedSAE:
    """Fold the normalization into the parameters and write them to ``workdir/sae``."""
    host = sharding.to_host(state)
    params, stats = run.sae.fold_scale(host.params, host.stats, run.scale)
    meta = {"store": run.store.identity, "norm_scale": run.scale, "steps": int(host.step)}
    if is_main():
        try:
            sae_folder.save(workdir / sae_folder.SAE_DIR, run.sae, params, stats, meta)
        except sae_folder.SaveError as e:
            raise sae_folder.SaveError(e.folder, e.reason, SAVE_FIX) from e
    return sae_folder.TrainedSAE(run.sae, params, stats, meta)


def final_summary(run: Run, model: sae_folder.TrainedSAE, wall: float, steps: int, loader,
                  resumed_from: int = 0) -> dict:
    """Held-out metrics (and MMCS against ground truth when the store has it); the speed counts only
    the steps of this session (after ``resumed_from``)."""
    c = run.cfg
    batches = pipeline.iter_eval(run.store, batch_size=c.train.batch_size, split="holdout",
                                 max_tokens=c.train.eval_tokens or None, holdout_fraction=c.data.holdout_fraction,
                                 site=c.data.site or None)
    result = evaluate(model, batches, run.ground_truth)
    tokens = steps * c.train.batch_size
    result |= {"steps": steps, "train_tokens": tokens, "train_seconds": wall,
               "train_tokens_per_s": (steps - resumed_from) * c.train.batch_size / max(wall, 1e-9),
               "resumed_from_step": resumed_from, "architecture": c.model.architecture,
               "d_sae": c.model.d_sae, "skipped_rows": loader.skipped_rows,
               "rows_read_per_process": rows_read_per_process(loader)}
    return result


def rows_read_per_process(loader) -> list[int]:
    """Each process's count of training rows it read from the store in this session (every process calls this)."""
    if jax.process_count() == 1:
        return [int(loader.rows_read)]
    from jax.experimental import multihost_utils

    counts = multihost_utils.process_allgather(np.asarray([loader.rows_read], np.int64))
    return [int(n) for n in np.asarray(counts).reshape(-1)]


def write_summary(workdir: Path, summary: dict) -> None:
    """summary.json, written whole (``layout.atomic_write``): a summary.json is never a partial one."""
    layout.atomic_write(workdir / layout.SUMMARY, json.dumps(summary, indent=2))

"""The sweep report: one row per trained SAE and the L0/FVU Pareto plot.

Rows come from finished work directories: a single run's (``config.yaml`` + ``summary.json``)
or a sweep's (every ``members/NAME/`` holding a ``summary.json``), so separate jobs, or the
groups of a grid of jobs, are compared in one table. Outputs in OUT:

- ``sweep_summary.csv`` / ``sweep_summary.json``: name, the hyper-parameters (architecture,
  d_sae, k, penalty, coefficient, lr, and any other config key that differs between rows),
  steps, the held-out metrics (L0, FVU, explained variance, dead and dense fractions, the
  relative reconstruction bias gamma of the Gated SAE paper, eq. 10, and MMCS when the store
  has ground truth), whether the row is on the Pareto frontier, and its work directory;
- ``pareto.png``: L0 (log) against FVU, one series per architecture, the frontier marked.
  A point is on the frontier when no other point has both lower-or-equal L0 and FVU (one of
  them strictly lower): fewer active latents cannot buy a better reconstruction there.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from sae_jax import config as config_lib
from sae_jax.io import layout
from sae_jax.io.layout import atomic_write

CSV_FILE, JSON_FILE, PLOT_FILE = layout.REPORT_CSV, layout.REPORT_JSON, layout.PARETO
HPARAMS = ("architecture", "d_sae", "k", "penalty", "coefficient", "lr")
_HPARAM_KEYS = ("model.architecture", "model.d_sae", "model.k", "sparsity.penalty", "sparsity.coefficient",
                "optim.lr")
METRICS = ("steps", "l0", "fvu", "explained_variance", "dead_fraction", "dense_fraction", "gamma", "mmcs",
           "recovered_fraction")
_NOT_HPARAMS = ("train.workdir", "train.progress", "train.log_every", "sweep.", "distributed.", "model.d_model",
                "model.k_aux")


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """Finished run directories under ``dirs``: each a single run's or a sweep's members."""
    runs: list[Path] = []
    for d in map(Path, dirs):
        if (d / layout.SUMMARY).is_file():
            found = [d]
        else:
            members = d / layout.MEMBERS
            found = sorted(p for p in members.iterdir() if (p / layout.SUMMARY).is_file()) if members.is_dir() else []
        if not found:
            raise FileNotFoundError(f"'{d}' holds no finished run (summary.json) and no finished sweep member "
                                    "(members/*/summary.json); pass work directories of `sae-jax train` or "
                                    "`sae-jax sweep`.")
        runs += [p for p in found if p.resolve() not in {r.resolve() for r in runs}]
    return runs


def _read_run(path: Path) -> tuple[dict, dict]:
    """(flattened config, summary) of a finished run."""
    cfg_path = path / layout.CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"'{path}' has summary.json but no config.yaml; it is not a sae-jax work directory.")
    cfg = config_lib.flatten(yaml.safe_load(cfg_path.read_text()) or {}, leaves=("sweep.grid",))
    return cfg, json.loads((path / layout.SUMMARY).read_text())


def collect(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per finished run, with the config keys that differ between runs and the frontier flag."""
    runs = find_runs(dirs)
    read = [_read_run(p) for p in runs]
    varied = varied_keys([c for c, _ in read])
    rows = []
    for path, (cfg, summary) in zip(runs, read, strict=True):
        row: dict[str, Any] = {"name": _name(path)}
        row |= {h: cfg.get(k) for h, k in zip(HPARAMS, _HPARAM_KEYS, strict=True)}
        if not config_lib.ARCHITECTURE_INFO.get(row["architecture"], {}).get("uses_k"):
            row["k"] = None
        row |= {k: cfg.get(k) for k in varied}
        row |= {m: summary.get(m) for m in METRICS}
        row["workdir"] = str(path)
        rows.append(row)
    for row, on in zip(rows, pareto_mask([r["l0"] for r in rows], [r["fvu"] for r in rows]), strict=True):
        row["pareto"] = on
    return rows


def _name(path: Path) -> str:
    """'SWEEPDIR/NAME' for a sweep member, the directory name for a single run."""
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == layout.MEMBERS else path.name


def varied_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys, beyond the fixed hyper-parameter columns, whose values differ between runs."""
    keys = dict.fromkeys(k for c in configs for k in c)
    out = []
    for key in keys:
        if key in _HPARAM_KEYS or key.startswith(_NOT_HPARAMS):
            continue
        if len({json.dumps(c.get(key), sort_keys=True) for c in configs}) > 1:
            out.append(key)
    return out


def pareto_mask(l0: list, fvu: list) -> list[bool]:
    """True where no other point has l0 <= and fvu <= with one of them strictly lower (missing: False)."""
    ok = [_finite(a) and _finite(b) for a, b in zip(l0, fvu, strict=True)]
    pts = [(a, b) for a, b, good in zip(l0, fvu, ok, strict=True) if good]

    def dominated(a, b):
        return any(c <= a and d <= b and (c < a or d < b) for c, d in pts)

    return [good and not dominated(a, b) for a, b, good in zip(l0, fvu, ok, strict=True)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- files
def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (union of the columns, in first-seen order; empty cells for missing values)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    return buf.getvalue()


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """pareto.png: L0 (log x) against FVU, one series per architecture, the frontier as a dashed step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    good = [r for r in rows if _finite(r["l0"]) and _finite(r["fvu"]) and r["l0"] > 0]
    for arch in dict.fromkeys(r["architecture"] for r in good):
        pts = sorted((r["l0"], r["fvu"]) for r in good if r["architecture"] == arch)
        ax.plot(*zip(*pts, strict=True), "o-", label=str(arch), alpha=0.8)
    front = sorted((r["l0"], r["fvu"]) for r in good if r["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), "--", color="black", drawstyle="steps-post", lw=1, label="Pareto frontier")
        ax.scatter(*zip(*front, strict=True), s=140, facecolors="none", edgecolors="black", zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel("FVU (held out)")
    skipped = len(rows) - len(good)
    ax.set_title("Sparsity / reconstruction frontier" + (f" ({skipped} runs with L0 = 0 not shown)" if skipped else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def write_report(dirs: Iterable[str | Path], out: str | Path) -> list[dict[str, Any]]:
    """sweep_summary.csv/.json and pareto.png in ``out`` over every finished run of ``dirs``; returns the rows."""
    rows = collect(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CSV_FILE, to_csv(rows))
    atomic_write(out / JSON_FILE, json.dumps(rows, indent=2))
    plot_pareto(rows, out / PLOT_FILE)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A readable table of the rows: name, L0, FVU, dead fraction, gamma, MMCS, frontier."""
    cols = [("l0", "L0", "{:>9.2f}"), ("fvu", "FVU", "{:>8.4f}"), ("dead_fraction", "dead", "{:>6.3f}"),
            ("gamma", "gamma", "{:>6.3f}"), ("mmcs", "MMCS", "{:>6.3f}")]
    width = max([len(r["name"]) for r in rows] + [4])
    head = f"{'name':<{width}}" + "".join(f" {t:>{len(f.format(0.0))}}" for _, t, f in cols) + "  pareto"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(" " + (f.format(r[k]) if _finite(r.get(k)) else "-".rjust(len(f.format(0.0))))
                        for k, _, f in cols)
        lines.append(f"{r['name']:<{width}}{cells}  {'*' if r['pareto'] else ''}")
    return "\n".join(lines)

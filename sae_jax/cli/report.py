"""`sae-jax report`: sweep_summary.csv/.json and the L0/FVU Pareto plot of finished runs

Join finished work directories (single runs, sweeps, the groups of a grid of jobs) into
sweep_summary.csv/.json and pareto.png (L0 log scale against FVU, one series per architecture, the
frontier marked).
"""

from __future__ import annotations

from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "report", run, __doc__)
    p.add_argument("dirs", nargs="+", help="work directories of `sae-jax train` or `sae-jax sweep`")
    p.add_argument("--out", help="directory for the report (default: the only DIR)")


def run(args) -> int:
    from sae_jax.eval import report

    if args.out is None and len(args.dirs) > 1:
        raise ValueError("`sae-jax report` got several directories; pass --out DIR for the report.")
    out = Path(args.out or args.dirs[0])
    rows = report.write_report(args.dirs, out)
    print(report.table(rows))
    print(f"wrote {out / report.CSV_FILE}, {out / report.JSON_FILE} and {out / report.PLOT_FILE}")
    return 0

"""`sae-jax demo`: the main job: synthetic data with ground truth, train, evaluate

Write a synthetic store with known features (once), train a ReLU SAE on it and evaluate it against the
ground truth (MMCS, FVU). About 2 minutes on 2 CPU cores. Exit status 1 if MMCS < 0.9 or FVU > 0.1.
"""

from __future__ import annotations

import argparse

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "demo", run, __doc__)
    p.add_argument("--root", default="runs", help="directory for the store (ROOT/synth) and run (ROOT/demo)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted key=value overrides of the demo config")


def run(args) -> int:
    from sae_jax import demo

    summary = demo.run(args.root, args.overrides)
    common.print_result(summary, f"demo: ReLU SAE vs the true features ({args.root}/demo)")
    verdict = "met" if summary["targets_met"] else "NOT met"
    print(f"targets MMCS >= {demo.TARGETS['mmcs']} and FVU <= {demo.TARGETS['fvu']}: {verdict}; "
          f"wall time {summary['wall_seconds']:.0f} s")
    return 0 if summary["targets_met"] else 1

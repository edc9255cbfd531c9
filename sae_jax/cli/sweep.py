"""`sae-jax sweep`: train many SAEs in one job on one data stream (a sparsity/k/lr grid)

Train every point of sweep.grid in one job: e.g. sweep.sparsity.coefficient=[1e-4,3e-4,1e-3]
sweep.model.architecture=[relu,gated]. Members of one architecture and shape are stacked and trained by one
jitted step (vmapped; see sweep.vmap_size); each gets WORKDIR/members/NAME/ like a single run, and WORKDIR
gets sweep_summary.csv/.json and pareto.png. sweep.group=I trains group I only.
"""

from __future__ import annotations

from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    flags = parents.run_flags(
        fresh="start over: delete this job's checkpoints (by default a sweep resumes from its newest good "
              "checkpoint; SIGTERM saves one and exits with status 143)",
        print_config="print the sweep's config and its groups (what each sweep.group=I trains) as YAML and exit "
                     "without training")
    config = parents.config("YAML config file (its sweep.grid, plus the overrides)",
                            "dotted key=value overrides; sweep.KEY=[a,b] adds a grid axis")
    p = common.command(subparsers, "sweep", run, __doc__, parents=[flags, config])
    p.add_argument("--list-groups", action="store_true", help="print one line per group (index, tab, members) "
                   "and exit without training")


def run(args) -> int:
    from sae_jax import config as config_lib
    from sae_jax.train import sweep as sweep_lib

    # Unresolved: each member takes its own architecture's recipe defaults.
    cfg = config_lib.load_config(args.config, args.overrides, resolve_recipe=False)
    groups = sweep_lib.group_members(sweep_lib.expand(cfg))
    if args.list_groups:  # one line per group: index, tab, its members (what launch/sweep_grid.sh counts)
        print("\n".join(f"{i}\t{','.join(m.name for m in g)}" for i, g in enumerate(groups)))
        return 0
    if args.print_config:
        print(common.config_yaml(cfg) + groups_yaml(groups), end="")
        return 0
    chosen = [m.cfg for i, g in sweep_lib.select(groups, cfg.sweep.group) for m in g]
    common.start_banner("sweep", cfg, chosen, f"{len(chosen)} of {sum(map(len, groups))} members in "
                        f"{len(groups) if cfg.sweep.group == -1 else 1} of {len(groups)} groups")
    summaries = sweep_lib.sweep(cfg, fresh=args.fresh)
    from sae_jax.sharding import is_main

    if is_main():  # process 0 writes the report; the others need not wait for it
        _print_report(Path(cfg.train.workdir), len(summaries))
    return 0


def _print_report(out: Path, n_members: int) -> None:
    from sae_jax.eval import report

    print(report.table(report.collect([out])))
    print(f"trained {n_members} members; wrote {out / report.CSV_FILE}, {out / report.JSON_FILE} and "
          f"{out / report.PLOT_FILE}")


def groups_yaml(groups) -> str:
    """A sweep's groups as YAML: what each sweep.group=I job trains."""
    import yaml

    doc = [{"group": i, "architecture": g[0].cfg.model.architecture, "members": {m.name: m.point for m in g}}
           for i, g in enumerate(groups)]
    head = (f"# {len(groups)} group(s); sweep.group=I trains group I only (launch/sweep_grid.sh: GROUPS "
            f"0-{len(groups) - 1})\n")
    return "---\n" + head + yaml.safe_dump({"groups": doc}, sort_keys=False)

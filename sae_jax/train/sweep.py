"""Many SAEs in one job on one data stream: sparsity, k and learning-rate sweeps.

This module plans a sweep and writes its report; ``sae_jax.train.loop.run_job`` trains it (the one driver,
as for a single run). The grid (``sweep.grid``, dotted key -> values) expands to members: the product of
the values, each member a complete single-run config. Members that differ only in what
``TrainState.hparams`` holds (``optim.lr``, ``sparsity.coefficient``) form a group: their states are
stacked along a leading ``sweep`` axis and trained by one vmapped, jitted step
(``sae_jax.train.stacked``). Members of other architectures or shapes form other groups, and every group
steps on the same global batch, so the store is read once for the whole sweep.

Work directory::

    WORKDIR/config.yaml                  the sweep's config (grid included)
    WORKDIR/sweep.json                   the grid, every member's point and the groups
    WORKDIR/members/NAME/                a single run's work directory: config.yaml,
                                         metrics.jsonl, summary.json, sae/
    WORKDIR/sweep_summary.{csv,json}     the report over every finished member (sae_jax.eval.report)
    WORKDIR/pareto.png

A member starts from the key a single run with its seed uses (``jax.random.key(seed)``) and
sees the same batches in the same order, so it equals ``train(members/NAME/config.yaml)`` up
to float32 rounding of the batched matmuls. Its summary's ``train_seconds`` is the whole
sweep's training time (the members share it).

Checkpoints (as for a single run: every ``checkpoint.every`` steps, at the end, and on SIGTERM/SIGINT
with exit status 143): the state of a sweep is one pytree, ``{'group-I': stacked TrainState}``, saved
with the one loader's state, the sweep's config and every member's resolved config. ``sae-jax sweep``
run again resumes the whole sweep from the newest good checkpoint (``--fresh`` starts over) and each
member ends bit-identical to an uninterrupted sweep. A job of one group (``sweep.group=I``) keeps its
own checkpoints in ``checkpoints-group-I`` (and its lock in ``.lock-group-I``), beside the whole
sweep's ``checkpoints``, so the jobs of a grid of jobs resume independently.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from sae_jax import config as config_lib
from sae_jax.config import Config, ConfigError
from sae_jax.eval import report
from sae_jax.io import layout
from sae_jax.train import loop, stacked
from sae_jax.train.loop import Member

MEMBERS_DIR = layout.MEMBERS
PLAN_FILE = layout.PLAN


def sweep(cfg: Config, fresh: bool = False) -> dict[str, dict]:
    """Train every member of ``cfg.sweep.grid`` (or of group ``sweep.group``) on one data stream.

    Resumes from the newest good checkpoint of this job unless ``fresh`` (which deletes them); on
    SIGTERM/SIGINT it saves a checkpoint and raises ``checkpoint.Preempted``. Returns {member name:
    the summary written to its summary.json}; also writes the report over every finished member of
    WORKDIR (so the last job of a grid of jobs joins them).
    """
    check_not_single_run(Path(cfg.train.workdir))
    all_groups = group_members(expand(cfg))
    groups = [stacked.build_group(i, g, cfg.sweep, init=False) for i, g in select(all_groups, cfg.sweep.group)]

    def write(cfg: Config, groups: list[loop.Group]) -> None:
        write_plan(cfg, all_groups, groups)

    def rebuild(group: loop.Group, members: list[Member]) -> loop.Group:
        return stacked.build_group(group.index, members, cfg.sweep, init=False)

    job = loop.Job(cfg, groups, "sae-jax sweep", write, rebuild, sweep=True, finish=write_report,
                   part="" if cfg.sweep.group == -1 else f"-group-{cfg.sweep.group}")
    return loop.run_job(job, fresh)


def check_not_single_run(workdir: Path) -> None:
    """ConfigError if ``workdir`` holds a single run (``sae-jax train``): a sweep there would mix with (or,
    with --fresh, delete) that run's checkpoints and overwrite its config.yaml."""
    single = [n for n in (layout.METRICS, layout.SUMMARY, layout.SAE_DIR) if (workdir / n).exists()]
    if single and not (workdir / PLAN_FILE).exists():
        raise ConfigError(f"config key 'train.workdir' is '{workdir}', which holds a single run of `sae-jax train` "
                          f"({', '.join(single)}), not a sweep; give the sweep its own directory, e.g. "
                          f"train.workdir={workdir}_sweep.")


# --------------------------------------------------------------------------- the plan
def expand(cfg: Config) -> list[Member]:
    """Every member of the grid, in product order (the last key varies fastest).

    ``cfg`` should be loaded without recipe resolution (``load_config(..., resolve_recipe=False)``):
    each member is resolved on its own, so a swept ``model.architecture`` gets its own recipe.
    """
    grid = cfg.sweep.grid
    if not grid:
        raise ConfigError("config key 'sweep.grid' is empty, so there is nothing to sweep; add a grid axis as "
                          "sweep.KEY=[...] after the config, e.g. sweep.sparsity.coefficient=[0.05,0.1,0.2] (or "
                          "list it under sweep.grid in the file).")
    base = config_lib.to_dict(dataclasses.replace(cfg, sweep=config_lib.SweepConfig()))
    members = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        name = member_name(point)
        tree = copy.deepcopy(base)
        for key, value in point.items():
            config_lib.set_path(tree, key, value)
        config_lib.set_path(tree, "train.workdir", str(Path(cfg.train.workdir) / MEMBERS_DIR / name))
        try:
            members.append(Member(name, point, config_lib.resolve(config_lib.from_dict(tree))))
        except ConfigError as e:
            raise ConfigError(f"sweep member '{name}': {e}") from None
    return members


def member_name(point: dict[str, Any]) -> str:
    """'key-value' pairs joined by '_', each key by its last part unless two keys share it."""
    shorts = [key.rsplit(".", 1)[-1] for key in point]
    parts = [f"{short if shorts.count(short) == 1 else key}-{_fmt(value)}"
             for (key, value), short in zip(point.items(), shorts, strict=True)]
    return "_".join(parts)


def _fmt(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text)


def static_key(cfg: Config) -> str:
    """Everything of a member's config but its hparams (lr, coefficient) and workdir: equal keys stack."""
    tree = config_lib.to_dict(cfg)
    tree["optim"]["lr"] = tree["sparsity"]["coefficient"] = tree["train"]["workdir"] = None
    return json.dumps(tree, sort_keys=True)


def group_members(members: list[Member]) -> list[list[Member]]:
    """Members grouped by ``static_key``, groups in order of their first member."""
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(static_key(m.cfg), []).append(m)
    return list(groups.values())


def select(groups: list[list[Member]], index: int) -> list[tuple[int, list[Member]]]:
    """(index, members) of the groups this job trains: all (-1) or the one ``sweep.group`` names."""
    if index == -1:
        return list(enumerate(groups))
    if not 0 <= index < len(groups):
        raise ConfigError(f"config key 'sweep.group' is {index} but this sweep has {len(groups)} groups; use "
                          f"0..{len(groups) - 1} or -1 for all.")
    return [(index, groups[index])]


def plan_doc(cfg: Config, groups: list[list[Member]]) -> dict:
    """What sweep.json holds: the grid, each member's point and the groups (all of them)."""
    return {"grid": cfg.sweep.grid, "groups": [[m.name for m in g] for g in groups],
            "members": {m.name: m.point for g in groups for m in g}}


def write_plan(cfg: Config, all_groups: list[list[Member]], groups: list[loop.Group]) -> None:
    """The sweep's config.yaml (every group: each job of a grid of jobs writes the same) and sweep.json,
    and each trained member's config.yaml."""
    workdir = Path(cfg.train.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    whole = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, group=-1))
    layout.atomic_write(workdir / layout.CONFIG, yaml.safe_dump(config_lib.to_dict(whole), sort_keys=False))
    layout.atomic_write(workdir / PLAN_FILE, json.dumps(plan_doc(cfg, all_groups), indent=2))
    for g in groups:
        for m in g.members:
            Path(m.cfg.train.workdir).mkdir(parents=True, exist_ok=True)
            config_lib.save_config(m.cfg, Path(m.cfg.train.workdir) / layout.CONFIG)


def write_report(cfg: Config) -> None:
    """sweep_summary.csv/.json and pareto.png over every finished member of WORKDIR."""
    report.write_report([Path(cfg.train.workdir)], Path(cfg.train.workdir))

"""Many SAEs in one job on one data stream: sparsity, k and learning-rate sweeps.

The grid (``sweep.grid``, dotted key -> values) expands to members: the product of the
values, each member a complete single-run config. Members that differ only in what
``TrainState.hparams`` holds (``optim.lr``, ``sparsity.coefficient``) form a group: their
states are stacked along a leading ``sweep`` axis and trained by one vmapped, jitted step
(``jax.vmap(step, in_axes=(0, None))``: each member its own lr and coefficient, one shared
batch). Members of other architectures or shapes form other groups, and every group steps
on the same global batch, so the store is read once for the whole sweep. The ``sweep``
logical axis is laid out by the rules table (``sharding.sweep_rules``): replicated, or split
over the data devices with ``sweep.shard=true``. On CPU the vmapped step is slower than
separate steps (the batched layout costs transposes), so there the same jitted step loops
over the members with ``jax.lax.map`` instead (``sweep.vmap_size``: members vmapped at once).

Work directory::

    WORKDIR/config.yaml                  the sweep's config (grid included)
    WORKDIR/sweep.json                   the grid, every member's point and the groups
    WORKDIR/members/NAME/                a single run's work directory: config.yaml,
                                         metrics.jsonl, summary.json, sae/
    WORKDIR/sweep_summary.{csv,json}     the report over every finished member (sae_jax.report)
    WORKDIR/pareto.png

A member starts from the key a single run with its seed uses (``jax.random.key(seed)``) and
sees the same batches in the same order, so it equals ``train(members/NAME/config.yaml)`` up
to float32 rounding of the batched matmuls. Its summary's ``train_seconds`` is the whole
sweep's training time (the members share it).

Checkpoints (``sae_jax.checkpoint``, as for a single run: every ``checkpoint.every`` steps, at the
end, and on SIGTERM/SIGINT with exit status 143): the state of a sweep is one pytree,
``{'group-I': stacked TrainState}``, saved with the one loader's state, the sweep's config and every
member's resolved config. ``sae-jax sweep`` run again resumes the whole sweep from the newest good
checkpoint (``--fresh`` starts over) and each member ends bit-identical to an uninterrupted sweep.
A job of one group (``sweep.group=I``) keeps its own checkpoints in ``checkpoints-group-I``, beside
the whole sweep's ``checkpoints``, so the jobs of a grid of jobs resume independently.
``member_state`` and ``read_member`` slice a member out of the state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from sae_jax import api, checkpoint, lock, progress, report, sharding
from sae_jax import config as config_lib
from sae_jax.config import Config, ConfigError
from sae_jax.data import pipeline
from sae_jax.train import loop
from sae_jax.train import step as step_lib
from sae_jax.train.state import NonFiniteError, TrainState, finite_members, init_state

MEMBERS_DIR = "members"
PLAN_FILE = "sweep.json"
SWEEP_AXIS = "sweep"


@dataclass(frozen=True)
class Member:
    """One point of the grid."""

    name: str
    """Directory name under WORKDIR/members, built from the point (e.g. 'architecture-relu_coefficient-0.001')."""
    point: dict[str, Any]
    """The grid values of this member: dotted key -> value."""
    cfg: Config
    """The member's resolved config: exactly what a single run of it would use."""


@dataclass
class Group:
    """Members trained together by one jitted step; ``state`` is their stacked TrainState."""

    index: int
    """Position among all the sweep's groups (what ``sweep.group`` selects)."""
    members: list[Member]
    run: loop.Run
    """The store, architecture, optimizer, schedules and mesh the members share."""
    shardings: Any
    """NamedShardings of the stacked state (leading axis: ``sweep``)."""
    state: TrainState | None
    """Every leaf has a leading axis of len(members); one pytree, saved and restored as one."""
    step: Callable
    """(stacked state, batch) -> (stacked state, metrics [len(members)] each)."""
    init: Callable[[], TrainState]
    """The fresh stacked state, born sharded."""
    abstract: TrainState
    """Shapes, dtypes and shardings of the stacked state: what a checkpoint restores into."""

    @property
    def key(self) -> str:
        """The group's name in the checkpointed state: 'group-I'."""
        return f"group-{self.index}"


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


# --------------------------------------------------------------------------- a group's state and step
def build_group(index: int, members: list[Member], settings: config_lib.SweepConfig, init: bool = True) -> Group:
    """Prepare the shared run, jit the stacked step and (if ``init``) init the stacked state, born sharded.

    ``settings`` is the sweep's own section (the members' configs carry none)."""
    run = loop.prepare(members[0].cfg)
    members = [dataclasses.replace(m, cfg=config_lib.with_d_model(m.cfg, run.store.d_model)) for m in members]
    rules = sharding.sweep_rules(settings.shard)
    _check_divisible(run, rules, len(members))
    init_fn, abstract, shardings = init_stacked(run, members, rules)
    chunk = len(members) if settings.shard else vmap_size(settings.vmap_size, len(members))
    return Group(index, members, run, shardings, init_fn() if init else None,
                 compile_stacked_step(run, shardings, chunk), init_fn, abstract)


def vmap_size(requested: int, n_members: int) -> int:
    """Members vmapped at once: ``sweep.vmap_size``, or for 0 the whole group on accelerators and 1 on CPU."""
    if requested == 0:
        return 1 if jax.default_backend() == "cpu" else n_members
    return min(requested, n_members)


def _check_divisible(run: loop.Run, rules, n_members: int) -> None:
    axis = sharding.logical_to_spec((SWEEP_AXIS,), rules)[0]
    devices = run.mesh.shape[axis] if axis else 1
    if n_members % devices:
        raise ConfigError(f"config key 'sweep.shard' is true but a group of {n_members} members cannot be split "
                          f"over {devices} devices; make each group's size a multiple of {devices} or set "
                          "sweep.shard=false.")


def stacked_shardings(run: loop.Run, abstract: TrainState, rules) -> Any:
    """NamedShardings of a stacked state: the parameters' logical axes behind a leading ``sweep``."""
    specs = sharding.tree_specs(abstract, run.sae.param_axes(), rules, lead=(SWEEP_AXIS,))
    return sharding.named(run.mesh, specs)


def init_stacked(run: loop.Run, members: list[Member], rules) -> tuple[Callable[[], TrainState], TrainState, Any]:
    """(init, abstract state, shardings): ``init()`` gives the members' fresh states stacked, each one what
    ``loop.init_train_state`` gives its config (``model.init_from`` included: the group shares it)."""
    rows = min(loop.INIT_SAMPLE_ROWS, run.store.n_tokens)
    sample = run.store.read(0, rows, site=run.cfg.data.site or None) * run.scale
    key = jax.random.key(run.cfg.seed)
    lr = np.asarray([m.cfg.optim.lr for m in members], np.float32)
    coefficient = np.asarray([m.cfg.sparsity.coefficient for m in members], np.float32)
    start = None
    if run.cfg.model.init_from:
        start = jax.device_get(api.initial_params(run.cfg.model.init_from, run.sae, run.scale))

    def init(key, sample, lr, coefficient, start):
        def one(lr, coefficient):
            state = init_state(run.sae, run.tx, key, sample, lr, coefficient)
            if start is None:
                return state
            return state.replace(params=start[0], stats=start[1], opt_state=run.tx.init(start[0]))

        return jax.vmap(one)(lr, coefficient)

    abstract = jax.eval_shape(init, key, sample, lr, coefficient, start)
    shardings = stacked_shardings(run, abstract, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return (lambda: jax.jit(init, out_shardings=shardings)(key, sample, lr, coefficient, start)), abstract, shardings


def compile_stacked_step(run: loop.Run, shardings: Any, chunk: int) -> Callable:
    """The single-run step over the sweep axis (batch shared), jitted once with donation: vmapped
    over ``chunk`` members at a time, chunks in a jax.lax.map loop (no loop when chunk >= the group)."""
    sae = sharding.for_mesh(run.sae, run.mesh)  # as loop.compile_step: top-k split like the latents
    one = step_lib.make_train_step(sae, run.tx, run.lr_schedule, run.coef, run.scale)

    def step(state: TrainState, x: jax.Array):
        if chunk >= state.step.shape[0]:
            return jax.vmap(one, in_axes=(0, None))(state, x)
        return jax.lax.map(lambda s: one(s, x), state, batch_size=chunk if chunk > 1 else None)

    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(run.mesh)),
                   out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=0)


def member_state(group: Group, i: int) -> TrainState:
    """Member i's state, replicated (one member's memory at a time, whatever the sweep layout)."""
    return _taker(group.run.mesh)(group.state, i)


@functools.cache
def _taker(mesh: jax.sharding.Mesh) -> Callable:
    return jax.jit(lambda state, i: jax.tree.map(lambda a: a[i], state), out_shardings=sharding.replicated(mesh))


# --------------------------------------------------------------------------- the loop
def sweep(cfg: Config, fresh: bool = False) -> dict[str, dict]:
    """Train every member of ``cfg.sweep.grid`` (or of group ``sweep.group``) on one data stream.

    Resumes from the newest good checkpoint of this job unless ``fresh`` (which deletes them); on
    SIGTERM/SIGINT it saves a checkpoint and raises ``checkpoint.Preempted``. Returns {member name:
    the summary written to its summary.json}; also writes the report over every finished member of
    WORKDIR (so the last job of a grid of jobs joins them).
    """
    check_not_single_run(Path(cfg.train.workdir))
    all_groups = group_members(expand(cfg))
    groups = [build_group(i, g, cfg.sweep, init=False) for i, g in select(all_groups, cfg.sweep.group)]
    workdir = loop.make_workdir(cfg.train.workdir)
    name = lock.LOCK_FILE if cfg.sweep.group == -1 else f"{lock.LOCK_FILE}-group-{cfg.sweep.group}"
    with lock.hold(workdir, "sae-jax sweep", name):  # a grid of jobs shares WORKDIR: one lock per group
        return _sweep(cfg, all_groups, groups, fresh)


def check_not_single_run(workdir: Path) -> None:
    """ConfigError if ``workdir`` holds a single run (``sae-jax train``): a sweep there would mix with (or,
    with --fresh, delete) that run's checkpoints and overwrite its config.yaml."""
    single = [n for n in ("metrics.jsonl", "summary.json", "sae") if (workdir / n).exists()]
    if single and not (workdir / PLAN_FILE).exists():
        raise ConfigError(f"config key 'train.workdir' is '{workdir}', which holds a single run of `sae-jax train` "
                          f"({', '.join(single)}), not a sweep; give the sweep its own directory, e.g. "
                          f"train.workdir={workdir}_sweep.")


def _sweep(cfg: Config, all_groups: list, groups: list[Group], fresh: bool) -> dict[str, dict]:
    first = groups[0].run
    ckpts = checkpoint.Checkpoints(checkpoint_dir(cfg), cfg.checkpoint.every, cfg.checkpoint.keep,
                                   sharding.replicated(first.mesh), fresh=fresh)

    # --- state and data: from the newest good checkpoint, or fresh
    start = checkpoint.restore_or_init(ckpts, lambda: {g.key: g.init() for g in groups},
                                       {g.key: g.abstract for g in groups}, cfg, first.store.identity,
                                       check=functools.partial(reconcile, groups=groups))
    if start.resumed:
        cfg, groups = start.config[0], rebuild(groups, start.config[1], cfg.sweep)
    for g in groups:
        g.state = start.state[g.key]
    if loop.is_main():
        write_plan(cfg, all_groups, groups)
    loader = loop.make_loader(first)
    if start.resumed:
        loader.set_state(start.data_state)
        report_resume(cfg, groups, start, ckpts)

    # --- the loop (a checkpoint every checkpoint.every steps, at the end, and on preemption)
    wall = train_groups(cfg, groups, loader, ckpts, start.step)

    # --- outputs: each member's work directory, then the report
    summaries = {}
    for g in groups:
        summaries |= finish_group(g, wall, loader, start.step)
    loader.close()
    if loop.is_main():
        report.write_report([Path(cfg.train.workdir)], Path(cfg.train.workdir))
    diverged = [name for name, s in summaries.items() if s.get("diverged")]
    if diverged:
        raise NonFiniteError(f"sweep member(s) {', '.join(diverged)} produced NaN or Inf parameters by step "
                             f"{cfg.train.steps}, so they have no sae/ or summary.json (the other members were written "
                             "and reported); lower their optim.lr or set optim.grad_clip, then run them again "
                             "(--fresh starts over).")
    return summaries


def train_groups(cfg: Config, groups: list[Group], loader, ckpts: checkpoint.Checkpoints, start: int) -> float:
    """Step every group on each global batch from step ``start`` to ``train.steps``; the wall time."""
    batch_sharding = sharding.batch_sharding(groups[0].run.mesh)
    logs = {m.name: member_log(m, start) for g in groups for m in g.members}
    bar = _progress(cfg.train.steps, start) if cfg.train.progress and loop.is_main() else None
    preemption = checkpoint.PreemptionWatch()
    t_start = time.perf_counter()
    try:
        for step in range(start, cfg.train.steps):
            x = pipeline.to_global(next(loader), batch_sharding)
            done = step + 1
            for g in groups:
                g.state, step_metrics = g.step(g.state, x)
                if _is_log_step(done, cfg.train):
                    write_metrics(g, logs, done, step_metrics)
            if bar is not None:
                bar.update(1)
            state = {g.key: g.state for g in groups}
            if preemption.reached(done):
                ckpts.save(done, state, checkpoint_meta(cfg, groups, loader, done))
                ckpts.wait()
                raise checkpoint.Preempted(done, ckpts.directory)
            ckpts.maybe_save(done, cfg.train.steps, state, lambda done=done: checkpoint_meta(cfg, groups, loader, done))
        ckpts.wait()
    finally:
        preemption.close()
        for log in logs.values():
            log.close()
        if bar is not None:
            bar.close()
        ckpts.close()
    jax.block_until_ready([g.state for g in groups])
    return time.perf_counter() - t_start


# --------------------------------------------------------------------------- checkpoints
def checkpoint_dir(cfg: Config) -> Path:
    """This job's checkpoints: a single run's directory (``checkpoint.dir`` or WORKDIR/checkpoints) for the
    whole sweep, that name + '-group-I' for a job of group I (``sweep.group``)."""
    base = checkpoint.checkpoint_dir(cfg)
    return base if cfg.sweep.group == -1 else base.with_name(f"{base.name}-group-{cfg.sweep.group}")


def checkpoint_meta(cfg: Config, groups: list[Group], loader, step: int) -> dict:
    """The JSON part of a sweep's checkpoint: the loader state, the sweep's config, each group's members
    and each member's resolved config (so a resume can check and keep them)."""
    run = groups[0].run
    return {"data": loader.get_state(), "config": config_lib.to_dict(cfg), "scale": run.scale,
            "store": run.store.identity, "tokens": step * cfg.train.batch_size,
            "groups": {g.key: [m.name for m in g.members] for g in groups},
            "members": {m.name: config_lib.to_dict(m.cfg) for g in groups for m in g.members}}


def reconcile(meta: dict, cfg: Config, store_identity: str, step: int, groups: list[Group]
              ) -> tuple[tuple[Config, dict[str, Config]], list[str]]:
    """((the sweep's config, {member: config}) to resume with, accepted changes); ConfigError if refused.

    ``checkpoint.reconcile`` on the sweep's config and then on each member's, so a member keeps its
    saved step-derived warmups when only ``train.steps`` changed, as a single run does. A different
    set of groups or members (another grid) is refused before any array is read."""
    new_cfg, changes = checkpoint.reconcile(meta, cfg, store_identity, step)
    saved, now = meta.get("groups"), {g.key: [m.name for m in g.members] for g in groups}
    if saved != now:
        raise ConfigError(f"config key 'sweep.grid' gives the groups {now} but the checkpoint of step {step} holds "
                          f"{saved}; restore the old grid, or pass --fresh to start over.")
    configs = {}
    for m in (m for g in groups for m in g.members):
        try:
            configs[m.name], member_changes = checkpoint.reconcile(
                dict(meta, config=meta["members"][m.name]), m.cfg, store_identity, step)
        except ConfigError as e:
            raise ConfigError(f"sweep member '{m.name}': {e}") from None
        changes += [f"{c} (member {m.name})" for c in member_changes if c not in changes]
    return (new_cfg, configs), changes


def rebuild(groups: list[Group], configs: dict[str, Config], settings: config_lib.SweepConfig) -> list[Group]:
    """The groups again if a resume changed any member's config (kept warmups), else the same groups."""
    if all(configs[m.name] == m.cfg for g in groups for m in g.members):
        return groups
    return [build_group(g.index, [dataclasses.replace(m, cfg=configs[m.name]) for m in g.members], settings,
                        init=False) for g in groups]


def report_resume(cfg: Config, groups: list[Group], start: checkpoint.Restored,
                  ckpts: checkpoint.Checkpoints) -> None:
    """Say where the sweep resumes; cut each member's metrics.jsonl back to the restored step."""
    if not loop.is_main():
        return
    tokens = start.step * cfg.train.batch_size
    print(f"resuming from step {start.step} ({tokens:,} tokens) of {ckpts.directory}", flush=True)
    for change in start.changes:
        print(f"  accepted config change {change}", flush=True)
    for m in (m for g in groups for m in g.members):
        _cut_log(Path(m.cfg.train.workdir) / "metrics.jsonl", start.step)


def _cut_log(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to ``step`` (a killed sweep wrote past it, maybe half a line)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            rows.append(line + "\n")
    path.write_text("".join(rows))


def read_member(directory: str | Path, name: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Member ``name``'s slice of a sweep checkpoint as ``checkpoint.read_host`` gives a single run's
    ('params/W_enc', 'opt_state/0/mu/W_enc', ...), and the meta item. For inspection and tests."""
    arrays, meta = checkpoint.read_host(directory, step)
    key, members = next((k, v) for k, v in meta["groups"].items() if name in v)
    i = members.index(name)
    prefix = key + "/"
    return {k[len(prefix):]: a[i] for k, a in arrays.items() if k.startswith(prefix)}, meta


def write_plan(cfg: Config, all_groups: list[list[Member]], groups: list[Group]) -> None:
    """The sweep's config.yaml (every group: each job of a grid of jobs writes the same) and sweep.json,
    and each trained member's config.yaml."""
    workdir = Path(cfg.train.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    whole = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, group=-1))
    report.atomic_write(workdir / "config.yaml", yaml.safe_dump(config_lib.to_dict(whole), sort_keys=False))
    report.atomic_write(workdir / PLAN_FILE, json.dumps(plan_doc(cfg, all_groups), indent=2))
    for g in groups:
        for m in g.members:
            Path(m.cfg.train.workdir).mkdir(parents=True, exist_ok=True)
            config_lib.save_config(m.cfg, Path(m.cfg.train.workdir) / "config.yaml")


def member_log(member: Member, start_step: int = 0) -> loop.MetricsLog:
    """The member's metrics.jsonl, continued after ``start_step`` (no per-member progress bar: the sweep has one)."""
    tcfg = dataclasses.replace(member.cfg.train, progress=False)
    return loop.MetricsLog(Path(member.cfg.train.workdir) / "metrics.jsonl", tcfg, enabled=loop.is_main(),
                           start_step=start_step)


def _is_log_step(step: int, tcfg: config_lib.TrainConfig) -> bool:
    return step % tcfg.log_every == 0 or step == tcfg.steps


def write_metrics(group: Group, logs: dict, step: int, step_metrics: dict) -> None:
    """Split the stacked metrics (one device_get) into each member's metrics.jsonl line."""
    if not loop.is_main():
        return
    host = jax.device_get(step_metrics)
    for i, m in enumerate(group.members):
        logs[m.name].maybe_write(step, {k: v[i] for k, v in host.items()}, tokens=step * m.cfg.train.batch_size)


def finish_group(group: Group, wall: float, loader, resumed_from: int = 0) -> dict[str, dict]:
    """Each member's sae/ and summary.json, as ``loop.train`` writes them for a single run."""
    out = {}
    finite = finite_members(group.state, sharding.replicated(group.run.mesh))
    for i, m in enumerate(group.members):
        run = dataclasses.replace(group.run, cfg=m.cfg)
        workdir = Path(m.cfg.train.workdir)
        if not finite[i]:  # no sae/ or summary.json claims a result; sweep() reports it after the others
            out[m.name] = {"diverged": True}
            continue
        state = member_state(group, i)
        model = loop.save_trained(run, state, workdir)
        summary = loop.final_summary(run, model, wall, int(state.step), loader, resumed_from=resumed_from)
        if loop.is_main():
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        out[m.name] = summary
    return out


def _progress(total: int, start: int):
    return progress.bar(total, start, desc="sweep")

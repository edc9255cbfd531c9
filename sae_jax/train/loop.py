"""The one training driver: every job (a single run, a sweep, one group of a sweep) trains here.

A job trains groups of members on one data stream: each group has one state and one jitted step, and
every group steps on the same global batch, so the store is read once for the whole job. A single run
(``train``) is a job of one group of one member whose state is the plain TrainState and whose step is
``make_train_step`` jitted with explicit shardings (``compile_step``); a sweep (``sae_jax.train.sweep``) is a
job of groups whose members' states are stacked along a ``sweep`` axis (``sae_jax.train.stacked``).
``run_job`` does the rest, the same for both: the work directory's lock (``sae_jax.io.lock``), restore or
init (the config checks of a resume), the loop, the checkpoints (every ``checkpoint.every`` steps, at the
end, and on SIGTERM/SIGINT with ``checkpoint.Preempted``), the metrics logs, the non-finite checks and
each member's outputs (``sae_jax.train.outputs``: metrics.jsonl, sae/, summary.json).

Checkpoint layout (``checkpoint.FORMAT_VERSION``): a single run saves its TrainState; a sweep saves
``{'group-I': stacked TrainState}`` with the groups and every member's resolved config in the meta.
Non-finite values: a single run stops at the first NaN or Inf (parameters at a save, logged metrics, the
evaluation) naming its last good checkpoint; in a sweep a diverged member gets no sae/ or summary.json,
the others finish, and the job then raises NonFiniteError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sae_jax import config as config_lib
from sae_jax import sharding
from sae_jax.config import Config, ConfigError
from sae_jax.data import pipeline
from sae_jax.data import store as store_lib
from sae_jax.io import layout, lock
from sae_jax.models import make_sae
from sae_jax.sharding import is_main
from sae_jax.train import checkpoint, outputs
from sae_jax.train import step as step_lib
from sae_jax.train.init_from import initial_params
from sae_jax.train.run import Member, Run
from sae_jax.train.state import NonFiniteError, TrainState, init_state, is_finite

INIT_SAMPLE_ROWS = 4096


def prepare(cfg: config_lib.Config) -> Run:
    """Open the store, fix d_model, build the architecture, optimizer and mesh."""
    sharding.init_distributed(cfg.distributed.coordinator, cfg.distributed.num_processes, cfg.distributed.process_id)
    if not cfg.data.store:
        raise config_lib.ConfigError("config key 'data.store' is empty; set it to an activation store directory, "
                                     "e.g. data.store=runs/synth (make one with `sae-jax synth`).")
    store = store_lib.open_store(cfg.data.store)
    if cfg.model.d_model:
        store.check_d_model(cfg.model.d_model)
    cfg = config_lib.with_d_model(cfg, store.d_model)
    sae = make_sae(cfg.model, cfg.sparsity.penalty, cfg.train.dead_tokens)
    o = cfg.optim
    tx = step_lib.make_optimizer(o)
    lr_schedule = step_lib.schedule(o, cfg.train.steps)
    coef = step_lib.coefficient_factor(cfg.sparsity.warmup_steps)
    norm = store.norm_scalars[store.site_name(cfg.data.site or None)]
    scale = float(1.0 / np.sqrt(norm)) if cfg.data.normalize else 1.0
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    sharding.check_divisible(mesh, cfg.train.batch_size, cfg.model.d_sae)
    return Run(cfg, store, sae, mesh, scale, tx, lr_schedule, coef, store.ground_truth())


def state_shardings(run: Run, abstract: TrainState):
    """NamedShardings of every leaf of the train state, from the logical-axis table."""
    return sharding.named(run.mesh, sharding.tree_specs(abstract, run.sae.param_axes()))


def init_sample(run: Run) -> np.ndarray:
    """The store's first rows (up to INIT_SAMPLE_ROWS), normalized, for data-dependent initialization.

    They pass the run's data.nonfinite policy like every training row: 'error' stops naming the
    shard, 'skip' drops rows holding NaN or Inf (one such row would otherwise make every parameter
    NaN through the mean or geometric-median init of b_dec).
    """
    site = run.store.site_name(run.cfg.data.site or None)
    n = min(INIT_SAMPLE_ROWS, run.store.n_tokens)
    rows = run.store.read(0, n, site=site)
    bad = pipeline.nonfinite_rows(rows)
    if bad is not None and run.cfg.data.nonfinite == "error":
        raise pipeline.nonfinite_error(run.store, site, int(bad[0]), len(bad))
    if bad is not None:
        rows = np.delete(rows, bad, axis=0)
        if not len(rows):
            raise store_lib.StoreError(f"{run.store.path}: all of the first {n} rows of site '{site}' hold NaN or "
                                       "Inf, so there is nothing to initialize the SAE from; re-create the store.")
    return rows * run.scale


def _state_init(run: Run):
    """(init, key, sample): the state's initializer and its inputs."""
    sample = init_sample(run)
    key = jax.random.key(run.cfg.seed)

    def init(key, sample):
        return init_state(run.sae, run.tx, key, sample, run.cfg.optim.lr, run.cfg.sparsity.coefficient)

    return init, key, sample


def init_train_state(run: Run) -> TrainState:
    """A fresh state, born sharded (init jitted with out_shardings); from model.init_from's SAE if set."""
    init, key, sample = _state_init(run)
    abstract = jax.eval_shape(init, key, sample)
    if not run.cfg.model.init_from:
        return jax.jit(init, out_shardings=state_shardings(run, abstract))(key, sample)
    # model.init_from: the saved SAE's parameters at the training scale, a fresh optimizer state.
    params, stats = jax.device_get(initial_params(run.cfg.model.init_from, run.sae, run.scale))

    def init_from(key, sample, params, stats):
        return init(key, sample).replace(params=params, stats=stats, opt_state=run.tx.init(params))

    return jax.jit(init_from, out_shardings=state_shardings(run, abstract))(key, sample, params, stats)


def abstract_train_state(run: Run) -> TrainState:
    """Shapes, dtypes and target shardings (on this run's mesh) of the state: what a checkpoint restores into."""
    init, key, sample = _state_init(run)
    abstract = jax.eval_shape(init, key, sample)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        state_shardings(run, abstract))


def compile_step(run: Run, state: TrainState):
    """The train step jitted once, with explicit shardings and state donation."""
    fn = step_lib.make_train_step(sharding.for_mesh(run.sae, run.mesh), run.tx, run.lr_schedule, run.coef, run.scale,
                                  run.cfg.train.compute_dtype)
    shardings = state_shardings(run, state)
    return jax.jit(sharding.with_step_layout(fn, run.mesh),
                   in_shardings=(shardings, sharding.input_sharding(run.mesh)),
                   out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=0)


def make_loader(run: Run, split: str = "train") -> pipeline.ActivationLoader:
    """This process's share of every global batch, in the store's dtype: the step widens it to
    float32 on the device (fused with the normalization), so a bfloat16 store moves half the
    bytes to the device and the host does no conversion pass."""
    c = run.cfg
    return pipeline.ActivationLoader(
        run.store, batch_size=c.train.batch_size, seed=c.seed, split=split, holdout_fraction=c.data.holdout_fraction,
        process_index=jax.process_index(), process_count=jax.process_count(), block_rows=c.data.block_rows,
        shuffle_blocks=c.data.shuffle_blocks, nonfinite=c.data.nonfinite, site=c.data.site or None, dtype="storage",
    )


def make_workdir(path: str | Path) -> Path:
    """``train.workdir``, created by process 0; ConfigError if it is (or lies under) a file."""
    workdir = Path(path)
    if is_main():
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise config_lib.ConfigError(f"config key 'train.workdir' is '{workdir}', which is a file (or lies "
                                         "under one); choose a directory for the run.") from None
    return workdir




# --------------------------------------------------------------------------- members, groups, jobs
@dataclass
class Group:
    """Members trained together by one jitted step on one state."""

    index: int
    """Position among all the job's groups (what ``sweep.group`` selects)."""
    members: list[Member]
    run: Run
    """The store, architecture, optimizer, schedules and mesh the members share."""
    shardings: Any
    """NamedShardings of the state."""
    state: TrainState | None
    """The state: a plain TrainState (``stacked`` false: one member) or the members' states stacked (every
    leaf with a leading axis of len(members))."""
    step: Callable
    """(state, batch) -> (state, metrics): scalars, or [len(members)] each when stacked."""
    init: Callable[[], TrainState]
    """The fresh state, born sharded."""
    abstract: TrainState
    """Shapes, dtypes and shardings of the state: what a checkpoint restores into."""
    stacked: bool = False

    @property
    def key(self) -> str:
        """The group's name in a sweep's checkpointed state: 'group-I'."""
        return f"group-{self.index}"

    def member_state(self, i: int) -> TrainState:
        """Member i's state (replicated when stacked: one member's memory at a time, whatever the layout)."""
        return _taker(self.run.mesh)(self.state, i) if self.stacked else self.state

    def member_values(self, host_metrics: dict) -> list[dict[str, float]]:
        """Each member's logged metrics from the step's (host) metrics."""
        if not self.stacked:
            return [{k: float(v) for k, v in host_metrics.items()}]
        return [{k: float(v[i]) for k, v in host_metrics.items()} for i in range(len(self.members))]


@functools.cache
def _taker(mesh: jax.sharding.Mesh) -> Callable:
    return jax.jit(lambda state, i: jax.tree.map(lambda a: a[i], state), out_shardings=sharding.replicated(mesh))


def single_group(run: Run) -> Group:
    """A single run as a job's group: one member, the plain TrainState and the plain jitted step."""
    abstract = abstract_train_state(run)
    member = Member(Path(run.cfg.train.workdir).name, {}, run.cfg)
    return Group(0, [member], run, state_shardings(run, abstract), None, compile_step(run, abstract),
                 lambda: init_train_state(run), abstract)


@dataclass
class Job:
    """What ``run_job`` trains and where it writes."""

    cfg: Config
    """The job's config: the single run's, or the sweep's (grid included)."""
    groups: list[Group]
    command: str
    """'sae-jax train' or 'sae-jax sweep': named in the lock and on the progress bar."""
    write_plan: Callable[[Config, list[Group]], None]
    """Writes the config files once the config to run with is known (process 0, after any restore)."""
    rebuild: Callable[[Group, list[Member]], Group]
    """The group again for members whose config a resume changed (e.g. kept warmups)."""
    sweep: bool = False
    """A sweep saves ``{'group-I': state}`` with its groups and members in the meta, and tolerates a diverged
    member; a single run saves its TrainState and stops at the first NaN or Inf."""
    part: str = ""
    """'-group-I' for a job of one group of a sweep: its checkpoint directory and lock get that suffix, so
    the jobs of a grid of jobs share WORKDIR and resume independently."""
    finish: Callable[[Config], None] | None = None
    """Called on process 0 after every member's outputs (a sweep's report)."""

    @property
    def members(self) -> list[Member]:
        return [m for g in self.groups for m in g.members]

    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` or WORKDIR/checkpoints, + ``part``."""
        base = checkpoint.checkpoint_dir(self.cfg)
        return base.with_name(base.name + self.part)

    def tree(self, states: list) -> Any:
        """The checkpointed pytree of the groups' states (or of their abstract states)."""
        return {g.key: s for g, s in zip(self.groups, states, strict=True)} if self.sweep else states[0]

    def untree(self, tree: Any) -> list:
        return [tree[g.key] for g in self.groups] if self.sweep else [tree]


def train(cfg: Config, fresh: bool = False) -> dict:
    """Train one SAE as configured; returns the summary written to summary.json.

    Resumes from the newest good checkpoint unless ``fresh`` (which deletes the old ones). On
    SIGTERM/SIGINT it saves a checkpoint and raises ``checkpoint.Preempted``. Process 0 holds the
    work directory's lock (``sae_jax.io.lock``) throughout, so a second writer is refused.
    """
    group = single_group(prepare(cfg))

    def write_plan(cfg: Config, groups: list[Group]) -> None:
        config_lib.save_config(cfg, Path(cfg.train.workdir) / layout.CONFIG)

    job = Job(group.run.cfg, [group], "sae-jax train", write_plan, lambda g, members: single_group(
        prepare(members[0].cfg)))
    return run_job(job, fresh)[group.members[0].name]


# --------------------------------------------------------------------------- the driver
def run_job(job: Job, fresh: bool = False) -> dict[str, dict]:
    """Train every member of ``job``; {member name: the summary written to its summary.json}.

    Resumes from the newest good checkpoint of the job unless ``fresh`` (which deletes them); on
    SIGTERM/SIGINT it saves a checkpoint and raises ``checkpoint.Preempted``. Process 0 holds the work
    directory's lock (``.lock`` + ``job.part``) throughout, so a second writer is refused.
    """
    workdir = make_workdir(job.cfg.train.workdir)
    with lock.hold(workdir, job.command, lock.LOCK_FILE + job.part):
        return _run_job(job, fresh)


def _run_job(job: Job, fresh: bool) -> dict[str, dict]:
    first = job.groups[0].run
    ckpts = checkpoint.Checkpoints(job.checkpoint_dir(), job.cfg.checkpoint.every, job.cfg.checkpoint.keep,
                                   sharding.replicated(first.mesh), fresh=fresh)

    # --- state, step, data: from the newest good checkpoint, or fresh
    start = checkpoint.restore_or_init(ckpts, lambda: job.tree([g.init() for g in job.groups]),
                                       job.tree([g.abstract for g in job.groups]), job.cfg, first.store.identity,
                                       check=functools.partial(reconcile, job=job))
    if start.resumed:  # a resumed run keeps step-derived schedule lengths
        job = resumed(job, *start.config)
    for g, state in zip(job.groups, job.untree(start.state), strict=True):
        g.state = state
    if is_main():
        job.write_plan(job.cfg, job.groups)
    loader = make_loader(job.groups[0].run)
    if start.resumed:
        if start.data_state is not None:
            loader.set_state(start.data_state)
        report_resume(job, start, ckpts)

    # --- the loop (a checkpoint every checkpoint.every steps, at the end, and on preemption), then the outputs
    log = outputs.JobLog(job.members, job.cfg.train.steps, start.step, job.cfg.train.progress,
                         desc=job.command.split()[-1])
    preemption = checkpoint.PreemptionWatch()
    try:
        wall = train_steps(job, loader, ckpts, log, preemption, start.step)
        summaries = {}
        for g in job.groups:
            for i in range(len(g.members)):
                summaries[g.members[i].name] = finish_member(job, g, i, wall, loader, ckpts, preemption, start.step)
    finally:
        preemption.close()
        log.close()
        ckpts.close()
        loader.close()
    if job.finish is not None and is_main():
        job.finish(job.cfg)
    diverged = [name for name, s in summaries.items() if s.get("diverged")]
    if diverged:
        raise NonFiniteError(f"sweep member(s) {', '.join(diverged)} produced NaN or Inf parameters by step "
                             f"{job.cfg.train.steps}, so they have no sae/ or summary.json (the other members were "
                             "written and reported); lower their optim.lr or set optim.grad_clip, then run them "
                             "again (--fresh starts over).")
    return summaries


def train_steps(job: Job, loader, ckpts: checkpoint.Checkpoints, log: outputs.JobLog,
                preemption: checkpoint.PreemptionWatch, start: int) -> float:
    """Step every group on each global batch from step ``start`` to ``train.steps``; the wall time."""
    tcfg = job.cfg.train
    input_sharding = sharding.input_sharding(job.groups[0].run.mesh)
    t_start = time.perf_counter()
    for step in range(start, tcfg.steps):
        x = pipeline.to_global(next(loader), input_sharding)
        done = step + 1
        for g in job.groups:
            g.state, step_metrics = g.step(g.state, x)
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                log_metrics(job, g, log, done, step_metrics, ckpts)
        if preemption.reached(done):
            save(job, ckpts, done, loader)
            ckpts.wait()
            raise checkpoint.Preempted(done, ckpts.directory)
        if ckpts.due(done, tcfg.steps):
            save(job, ckpts, done, loader)
    ckpts.wait()
    jax.block_until_ready([g.state for g in job.groups])
    return time.perf_counter() - t_start


def log_metrics(job: Job, group: Group, log: outputs.JobLog, step: int, step_metrics: dict,
                ckpts: checkpoint.Checkpoints) -> None:
    """The group's metrics.jsonl lines (one device_get); a single run stops at a NaN or Inf metric."""
    rows = list(zip(group.members, group.member_values(jax.device_get(step_metrics)), strict=True))
    if not job.sweep:
        check_finite_values(rows[0][1], step, ckpts, "the logged metrics")
    log.write(step, rows)


def save(job: Job, ckpts: checkpoint.Checkpoints, step: int, loader) -> None:
    """Save the job's checkpoint of ``step``; a single run's only if finite (else NonFiniteError: the last
    good one stays)."""
    tree = job.tree([g.state for g in job.groups])
    if not job.sweep:
        check_finite(tree, ckpts.replicated, step, ckpts)
    ckpts.save(step, tree, job_meta(job, loader, step))


def finish_member(job: Job, group: Group, i: int, wall: float, loader, ckpts: checkpoint.Checkpoints,
                  preemption: checkpoint.PreemptionWatch, resumed_from: int) -> dict:
    """Member i's sae/ and summary.json (a signal now stops before the next part); {'diverged': True} for
    a sweep member holding NaN or Inf (no sae/ or summary.json claims a result)."""
    m = group.members[i]
    run, workdir, state = dataclasses.replace(group.run, cfg=m.cfg), Path(m.cfg.train.workdir), group.member_state(i)
    steps = int(state.step)
    if not is_finite(state, ckpts.replicated):
        if job.sweep:
            return {"diverged": True}
        raise nonfinite_error(steps, ckpts, "the parameters")
    preemption.stop_if_signalled(steps, ckpts.directory, "before writing sae/")
    model = outputs.save_trained(run, state, workdir)
    preemption.stop_if_signalled(steps, ckpts.directory, "after writing sae/, before the held-out evaluation")
    summary = outputs.final_summary(run, model, wall, steps, loader, resumed_from=resumed_from)
    if not job.sweep:
        check_finite_values(summary, steps, ckpts, "the held-out evaluation")
    preemption.stop_if_signalled(steps, ckpts.directory, "before writing summary.json")
    if is_main():
        outputs.write_summary(workdir, summary)
    return summary


# --------------------------------------------------------------------------- non-finite values
def check_finite(state: Any, replicated, step: int, ckpts: checkpoint.Checkpoints) -> None:
    """NonFiniteError naming the step and the last good checkpoint if the state holds NaN or Inf."""
    if not is_finite(state, replicated):
        raise nonfinite_error(step, ckpts, "the parameters")


def check_finite_values(values: dict, step: int, ckpts: checkpoint.Checkpoints, what: str) -> None:
    """The same for host scalars (logged metrics, the summary), naming the bad ones."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise nonfinite_error(step, ckpts, f"{what} ({', '.join(bad)})")


def nonfinite_error(step: int, ckpts: checkpoint.Checkpoints, what: str) -> NonFiniteError:
    ckpts.wait()
    last = f"step {ckpts.last_good}" if ckpts.last_good is not None else "none"
    return NonFiniteError(f"training produced NaN or Inf in {what} at step {step}; nothing of that step was saved, "
                          f"and the last good checkpoint in {ckpts.directory} is {last}. Lower optim.lr, set "
                          "optim.grad_clip, or check the store with `sae-jax store verify`, then run again (--fresh "
                          "starts over).")


# --------------------------------------------------------------------------- checkpoints
def checkpoint_meta(run: Run, loader: pipeline.ActivationLoader, step: int) -> dict:
    """The JSON part of a run's checkpoint: data-iterator state, resolved config, normalization, store."""
    return {"data": loader.get_state(), "config": config_lib.to_dict(run.cfg), "scale": run.scale,
            "store": run.store.identity, "tokens": step * run.cfg.train.batch_size}


def job_meta(job: Job, loader: pipeline.ActivationLoader, step: int) -> dict:
    """``checkpoint_meta`` with the job's config; a sweep adds each group's members and each member's resolved
    config (so a resume can check and keep them)."""
    meta = checkpoint_meta(dataclasses.replace(job.groups[0].run, cfg=job.cfg), loader, step)
    if job.sweep:
        meta |= {"groups": {g.key: [m.name for m in g.members] for g in job.groups},
                 "members": {m.name: config_lib.to_dict(m.cfg) for m in job.members}}
    return meta


def reconcile(meta: dict, cfg: Config, store_identity: str, step: int, job: Job
              ) -> tuple[tuple[Config, dict[str, Config]], list[str]]:
    """((the job's config, {member: config}) to resume with, accepted changes); ConfigError if refused.

    ``checkpoint.reconcile`` on the job's config and, for a sweep, then on each member's, so a member keeps
    its saved step-derived warmups when only ``train.steps`` changed, as a single run does. A different set
    of groups or members (another grid) is refused before any array is read."""
    new_cfg, changes = checkpoint.reconcile(meta, cfg, store_identity, step)
    if not job.sweep:
        return (new_cfg, {job.members[0].name: new_cfg}), changes
    saved, now = meta.get("groups"), {g.key: [m.name for m in g.members] for g in job.groups}
    if saved != now:
        raise ConfigError(f"config key 'sweep.grid' gives the groups {now} but the checkpoint of step {step} holds "
                          f"{saved}; restore the old grid, or pass --fresh to start over.")
    configs = {}
    for m in job.members:
        try:
            configs[m.name], member_changes = checkpoint.reconcile(
                dict(meta, config=meta["members"][m.name]), m.cfg, store_identity, step)
        except ConfigError as e:
            raise ConfigError(f"sweep member '{m.name}': {e}") from None
        changes += [f"{c} (member {m.name})" for c in member_changes if c not in changes]
    return (new_cfg, configs), changes


def resumed(job: Job, cfg: Config, configs: dict[str, Config]) -> Job:
    """The job with the config a resume runs with, each group built again if the resume changed a member's."""
    groups = [g if all(configs[m.name] == m.cfg for m in g.members) else
              job.rebuild(g, [dataclasses.replace(m, cfg=configs[m.name]) for m in g.members]) for g in job.groups]
    return dataclasses.replace(job, cfg=cfg, groups=groups)


def report_resume(job: Job, start: checkpoint.Restored, ckpts: checkpoint.Checkpoints) -> None:
    """Say where the job resumes; cut each member's metrics.jsonl back to the restored step."""
    if not is_main():
        return
    tokens = start.step * job.cfg.train.batch_size
    print(f"resuming from step {start.step} ({tokens:,} tokens) of {ckpts.directory}", flush=True)
    for change in start.changes:
        print(f"  accepted config change {change}", flush=True)
    if start.saved_processes:
        print(f"  warning: the checkpoint was written by {start.saved_processes} process(es) and this job has "
              f"{jax.process_count()}; the train state is restored, but the processes' places in the data do not "
              "carry over to the new split of the rows, so the data stream starts again from its beginning (rows "
              f"of the first {tokens:,} tokens come again).", flush=True)
    for m in job.members:
        outputs.cut_log(Path(m.cfg.train.workdir) / layout.METRICS, start.step)

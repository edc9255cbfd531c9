"""train(config): the composition root. The only place that jits the step.

It wires the store and loader (data/), the mesh (sharding.py), the architecture
(models/), the step (train/step.py) and the outputs of a work directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from sae_jax import api, checkpoint, lock, progress, sharding
from sae_jax import config as config_lib
from sae_jax.data import pipeline
from sae_jax.data import store as store_lib
from sae_jax.evaluate import evaluate
from sae_jax.models.sae import SAE, make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.state import NonFiniteError, TrainState, init_state, is_finite

INIT_SAMPLE_ROWS = 4096
SAVE_FIX = ("free space there or choose another train.workdir, then run the same command again: the checkpoints "
            "are intact, so it resumes from the last one and saves sae/ again")


@dataclass
class Run:
    """What the loop builds before the first step."""

    cfg: config_lib.Config
    store: store_lib.Store
    sae: SAE
    mesh: jax.sharding.Mesh
    scale: float
    tx: object
    lr_schedule: object
    coef: object
    ground_truth: np.ndarray | None = None
    """The store's true dictionary (synthetic stores), checked against its digest before any work."""


def is_main() -> bool:
    """Only process 0 writes logs and summaries."""
    return jax.process_index() == 0


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
    tx = step_lib.optimizer(o.beta1, o.beta2, o.grad_clip)
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
    params, stats = jax.device_get(api.initial_params(run.cfg.model.init_from, run.sae, run.scale))

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
    fn = step_lib.make_train_step(sharding.for_mesh(run.sae, run.mesh), run.tx, run.lr_schedule, run.coef, run.scale)
    shardings = state_shardings(run, state)
    return jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(run.mesh)),
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


def train(cfg: config_lib.Config, fresh: bool = False) -> dict:
    """Train one SAE as configured; returns the summary written to summary.json.

    Resumes from the newest good checkpoint unless ``fresh`` (which deletes the old ones). On
    SIGTERM/SIGINT it saves a checkpoint and raises ``checkpoint.Preempted``. Process 0 holds the
    work directory's lock (``sae_jax.lock``) throughout, so a second writer is refused.
    """
    run = prepare(cfg)
    workdir = make_workdir(run.cfg.train.workdir)
    with lock.hold(workdir, "sae-jax train"):
        return _train(run, workdir, fresh)


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


def _train(run: Run, workdir: Path, fresh: bool) -> dict:
    cfg = run.cfg
    ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(cfg), cfg.checkpoint.every, cfg.checkpoint.keep,
                                   sharding.replicated(run.mesh), fresh=fresh)

    # --- state, step, data: from the newest good checkpoint, or fresh
    start = checkpoint.restore_or_init(ckpts, lambda: init_train_state(run), abstract_train_state(run), cfg,
                                       run.store.identity)
    if start.config != cfg:  # a resumed run keeps step-derived schedule lengths
        run = prepare(start.config)
        cfg = run.cfg
    if is_main():
        config_lib.save_config(cfg, workdir / "config.yaml")
    state = start.state
    train_step = compile_step(run, state)
    loader = make_loader(run)
    batch_sharding = sharding.batch_sharding(run.mesh)
    replicated = sharding.replicated(run.mesh)
    if start.resumed:
        loader.set_state(start.data_state)
        report_resume(run, start, ckpts, workdir / "metrics.jsonl")

    # --- the loop (a checkpoint every checkpoint.every steps, at the end, and on preemption)
    log = MetricsLog(workdir / "metrics.jsonl", cfg.train, enabled=is_main(), start_step=start.step)
    preemption = checkpoint.PreemptionWatch()
    t_start = time.perf_counter()
    try:
        for step in range(start.step, cfg.train.steps):
            x = pipeline.to_global(next(loader), batch_sharding)
            state, step_metrics = train_step(state, x)
            done = step + 1
            log.maybe_write(done, step_metrics, tokens=done * cfg.train.batch_size, check=ckpts)
            if preemption.reached(done):
                save_checked(ckpts, done, state, checkpoint_meta(run, loader, done), replicated)
                ckpts.wait()
                raise checkpoint.Preempted(done, ckpts.directory)
            if ckpts.due(done, cfg.train.steps):
                save_checked(ckpts, done, state, checkpoint_meta(run, loader, done), replicated)
        ckpts.wait()
        jax.block_until_ready(state)
        wall = time.perf_counter() - t_start

        # --- outputs: folded parameters and the held-out evaluation (a signal now stops before the next part)
        steps = int(state.step)
        check_finite(state, replicated, steps, ckpts)
        preemption.stop_if_signalled(steps, ckpts.directory, "before writing sae/")
        model = save_trained(run, state, workdir)
        preemption.stop_if_signalled(steps, ckpts.directory, "after writing sae/, before the held-out evaluation")
        summary = final_summary(run, model, wall, steps, loader, resumed_from=start.step)
        check_finite_values(summary, steps, ckpts, "the held-out evaluation")
        preemption.stop_if_signalled(steps, ckpts.directory, "before writing summary.json")
    finally:
        preemption.close()
        log.close()
        ckpts.close()
    if is_main():  # written whole, then renamed: a summary.json is never a partial one
        tmp = workdir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(workdir / "summary.json")
    return summary


def save_checked(ckpts: checkpoint.Checkpoints, step: int, state: TrainState, meta: dict, replicated) -> None:
    """Save a checkpoint of ``state`` unless it holds NaN or Inf (then NonFiniteError: the last good one stays)."""
    check_finite(state, replicated, step, ckpts)
    ckpts.save(step, state, meta)


def check_finite(state: TrainState, replicated, step: int, ckpts: checkpoint.Checkpoints) -> None:
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


def checkpoint_meta(run: Run, loader: pipeline.ActivationLoader, step: int) -> dict:
    """The JSON part of a checkpoint: data-iterator state, resolved config, normalization, store."""
    return {"data": loader.get_state(), "config": config_lib.to_dict(run.cfg), "scale": run.scale,
            "store": run.store.identity, "tokens": step * run.cfg.train.batch_size}


def report_resume(run: Run, start: checkpoint.Restored, ckpts: checkpoint.Checkpoints, log_path: Path) -> None:
    """Say where the run resumes; cut metrics.jsonl back to the restored step (a killed run wrote past it)."""
    if not is_main():
        return
    tokens = start.step * run.cfg.train.batch_size
    print(f"resuming from step {start.step} ({tokens:,} tokens) of {ckpts.directory}", flush=True)
    for change in start.changes:
        print(f"  accepted config change {change}", flush=True)
    if log_path.is_file():
        rows = []
        for line in log_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("step", 0) <= start.step:
                rows.append(line + "\n")
        log_path.write_text("".join(rows))


def save_trained(run: Run, state: TrainState, workdir: Path) -> api.TrainedSAE:
    """Fold the normalization into the parameters and write them to ``workdir/sae``."""
    host = jax.device_get(jax.tree.map(lambda a: a, state))
    params, stats = run.sae.fold_scale(host.params, host.stats, run.scale)
    meta = {"store": run.store.identity, "norm_scale": run.scale, "steps": int(host.step)}
    if is_main():
        try:
            api.save(workdir / api.SAE_DIR, run.sae, params, stats, meta)
        except api.SaveError as e:
            raise api.SaveError(e.folder, e.reason, SAVE_FIX) from e
    return api.TrainedSAE(run.sae, params, stats, meta)


def final_summary(run: Run, model: api.TrainedSAE, wall: float, steps: int, loader, resumed_from: int = 0) -> dict:
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
               "d_sae": c.model.d_sae, "skipped_rows": loader.skipped_rows}
    return result


class MetricsLog:
    """metrics.jsonl lines and the progress bar (process 0 only)."""

    def __init__(self, path: Path, tcfg: config_lib.TrainConfig, enabled: bool, start_step: int = 0):
        self.path, self.every, self.enabled = path, tcfg.log_every, enabled
        self.batch, self.total = tcfg.batch_size, tcfg.steps
        # A fresh run starts the log over; a resumed one (start_step > 0) continues it.
        self.file = open(path, "a" if start_step else "w") if enabled else None  # noqa: SIM115 - closed in close()
        self.bar = _progress(tcfg.steps, start_step) if enabled and tcfg.progress else None
        self.last_step, self.last_time = start_step, time.perf_counter()

    def maybe_write(self, step: int, step_metrics: dict, tokens: int, check: checkpoint.Checkpoints | None = None
                    ) -> None:
        """Log the step's metrics at logging steps; with ``check``, a NaN or Inf metric stops the run
        (NonFiniteError naming the last good checkpoint)."""
        if step % self.every and step != self.total:
            return
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if check is not None:
            check_finite_values(values, step, check, "the logged metrics")
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        row = {"step": step, "tokens": tokens, **values, "tokens_per_s": rate}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(tok_s=f"{rate:,.0f}", l0=f"{values['l0']:.1f}", fvu=f"{values['fvu']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _progress(total: int, start: int):
    return progress.bar(total, start, desc="train")

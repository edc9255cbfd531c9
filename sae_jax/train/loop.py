"""train(config): the composition root. The only place that jits the step.

It wires the store and loader (data/), the mesh (sharding.py), the architecture
(models/), the step (train/step.py) and the outputs of a work directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from sae_jax import api, config as config_lib, sharding
from sae_jax.data import pipeline, store as store_lib
from sae_jax.evaluate import evaluate
from sae_jax.models.sae import SAE, make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.state import TrainState, init_state

INIT_SAMPLE_ROWS = 4096


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
    lr_schedule = step_lib.lr_factor(o.warmup_steps, cfg.train.steps, o.decay, o.decay_fraction)
    coef = step_lib.coefficient_factor(cfg.sparsity.warmup_steps)
    scale = float(1.0 / np.sqrt(store.norm_scalar)) if cfg.data.normalize else 1.0
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    return Run(cfg, store, sae, mesh, scale, tx, lr_schedule, coef)


def state_shardings(run: Run, abstract: TrainState):
    """NamedShardings of every leaf of the train state, from the logical-axis table."""
    return sharding.named(run.mesh, sharding.tree_specs(abstract, run.sae.param_axes()))


def init_train_state(run: Run) -> TrainState:
    """A fresh state, born sharded (init jitted with out_shardings)."""
    sample = run.store.read(0, min(INIT_SAMPLE_ROWS, run.store.n_tokens)) * run.scale
    key = jax.random.key(run.cfg.seed)

    def init(key, sample):
        return init_state(run.sae, run.tx, key, sample, run.cfg.optim.lr, run.cfg.sparsity.coefficient)

    abstract = jax.eval_shape(init, key, sample)
    return jax.jit(init, out_shardings=state_shardings(run, abstract))(key, sample)


def compile_step(run: Run, state: TrainState):
    """The train step jitted once, with explicit shardings and state donation."""
    fn = step_lib.make_train_step(run.sae, run.tx, run.lr_schedule, run.coef, run.scale)
    shardings = state_shardings(run, state)
    return jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(run.mesh)),
                   out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=0)


def make_loader(run: Run, split: str = "train") -> pipeline.ActivationLoader:
    """This process's share of every global batch."""
    c = run.cfg
    return pipeline.ActivationLoader(
        run.store, batch_size=c.train.batch_size, seed=c.seed, split=split, holdout_fraction=c.data.holdout_fraction,
        process_index=jax.process_index(), process_count=jax.process_count(), block_rows=c.data.block_rows,
        shuffle_blocks=c.data.shuffle_blocks, nonfinite=c.data.nonfinite, site=c.data.site or None,
    )


def train(cfg: config_lib.Config) -> dict:
    """Train one SAE as configured; returns the summary written to summary.json."""
    run = prepare(cfg)
    cfg = run.cfg
    workdir = Path(cfg.train.workdir)
    if is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.save_config(cfg, workdir / "config.yaml")

    # --- state, step, data
    state = init_train_state(run)
    train_step = compile_step(run, state)
    loader = make_loader(run)
    batch_sharding = sharding.batch_sharding(run.mesh)

    # --- the loop
    log = MetricsLog(workdir / "metrics.jsonl", cfg.train, enabled=is_main())
    t_start = time.perf_counter()
    for step in range(int(state.step), cfg.train.steps):
        x = pipeline.to_global(next(loader), batch_sharding)
        state, step_metrics = train_step(state, x)
        log.maybe_write(step + 1, step_metrics, tokens=(step + 1) * cfg.train.batch_size)
    jax.block_until_ready(state)
    wall = time.perf_counter() - t_start
    log.close()

    # --- outputs: folded parameters and the held-out evaluation
    model = save_trained(run, state, workdir)
    summary = final_summary(run, model, wall, int(state.step), loader)
    if is_main():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_trained(run: Run, state: TrainState, workdir: Path) -> api.TrainedSAE:
    """Fold the normalization into the parameters and write them to ``workdir/sae``."""
    host = jax.device_get(jax.tree.map(lambda a: a, state))
    params, stats = run.sae.fold_scale(host.params, host.stats, run.scale)
    meta = {"store": run.store.identity, "norm_scale": run.scale, "steps": int(host.step)}
    if is_main():
        api.save(workdir / api.SAE_DIR, run.sae, params, stats, meta)
    return api.TrainedSAE(run.sae, params, stats, meta)


def final_summary(run: Run, model: api.TrainedSAE, wall: float, steps: int, loader) -> dict:
    """Held-out metrics (and MMCS against ground truth when the store has it)."""
    c = run.cfg
    batches = pipeline.iter_eval(run.store, batch_size=c.train.batch_size, split="holdout",
                                 max_tokens=c.train.eval_tokens or None, holdout_fraction=c.data.holdout_fraction,
                                 site=c.data.site or None)
    result = evaluate(model, batches, ground_truth_of(run.store))
    tokens = steps * c.train.batch_size
    result |= {"steps": steps, "train_tokens": tokens, "train_seconds": wall,
               "train_tokens_per_s": tokens / max(wall, 1e-9), "architecture": c.model.architecture,
               "d_sae": c.model.d_sae, "skipped_rows": loader.skipped_rows}
    return result


def ground_truth_of(store) -> np.ndarray | None:
    """The store's ground-truth dictionary, if it was made synthetically."""
    path = Path(store.path) / "ground_truth.npy"
    return np.load(path) if path.is_file() else None


class MetricsLog:
    """metrics.jsonl lines and the progress bar (process 0 only)."""

    def __init__(self, path: Path, tcfg: config_lib.TrainConfig, enabled: bool, start_step: int = 0):
        self.path, self.every, self.enabled = path, tcfg.log_every, enabled
        self.batch, self.total = tcfg.batch_size, tcfg.steps
        # A fresh run starts the log over; a resumed one (start_step > 0) continues it.
        self.file = open(path, "a" if start_step else "w") if enabled else None  # noqa: SIM115 - closed in close()
        self.bar = _progress(tcfg.steps, start_step) if enabled and tcfg.progress else None
        self.last_step, self.last_time = start_step, time.perf_counter()

    def maybe_write(self, step: int, step_metrics: dict, tokens: int) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

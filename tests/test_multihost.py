"""A real 2-process job: `launch/local.sh 2 CONFIG` (jax.distributed on 127.0.0.1, gloo CPU
collectives) trains what one process trains on the same global batches; each process reads a
disjoint half of every batch; only process 0 writes the work directory.

Each process runs in its own directory (a stand-in interpreter changes into ``procN`` before
starting Python), so a relative ``train.workdir`` shows which process wrote what. Checkpoints go
to one shared absolute ``checkpoint.dir``, as on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sae_jax import api, sharding
from sae_jax import config as config_lib
from sae_jax.data import pipeline
from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.train import loop

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"
NPROC, STEPS, BATCH = 2, 6, 64
WORKDIR_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "sae/params.safetensors", "sae/sae.json")

CONFIG = """\
data: {{store: {store}, block_rows: 256, shuffle_blocks: 2}}
model: {{architecture: topk, d_sae: 64, k: 4}}
train: {{batch_size: {batch}, steps: {steps}, log_every: 2, eval_tokens: 1024, dead_tokens: 64, progress: false,
        workdir: run}}
optim: {{lr: 0.01, warmup_steps: 1}}
checkpoint: {{dir: {checkpoints}}}
"""

INTERPRETER = """#!/usr/bin/env bash
# Start each process in $JOB_ROOT/procN, N from its distributed.process_id=N argument.
for a in "$@"; do
  case $a in distributed.process_id=*) d=$JOB_ROOT/proc${{a#*=}}; mkdir -p "$d"; cd "$d" ;; esac
done
exec {python} "$@"
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("job")
    store = write_synthetic(root / "store", SynthSpec(d_model=16, n_features=48, n_tokens=8192, seed=5, l0=3.0))
    config = root / "config.yaml"
    config.write_text(CONFIG.format(store=store.path, batch=BATCH, steps=STEPS, checkpoints=root / "checkpoints"))
    interpreter = root / "python.sh"
    interpreter.write_text(INTERPRETER.format(python=Path(sys.executable)))
    interpreter.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PORT")}
    env.update(JOB_ROOT=str(root), PYTHON=str(interpreter), LOG_DIR=str(root / "logs"), JAX_PLATFORMS="cpu")
    result = subprocess.run([str(LOCAL), str(NPROC), str(config)], env=env, capture_output=True, text=True,
                            timeout=600, cwd=root)
    logs = "".join(f"\n--- proc{i}.log\n" + (root / "logs" / f"proc{i}.log").read_text()[-2000:]
                   for i in range(NPROC) if (root / "logs" / f"proc{i}.log").exists())
    assert result.returncode == 0, result.stderr[-2000:] + logs
    return {"root": root, "config": config, "store": store, "logs": logs}


@pytest.fixture(scope="module")
def reference(job) -> tuple:
    """One process, one device, fed the global batches that the job's two loaders make:
    (run, final state, metrics per step, the processes' local batches per step)."""
    cfg = config_lib.load_config(job["config"], ["train.progress=false"])
    run = loop.prepare(cfg)
    loaders = [pipeline.ActivationLoader(
        run.store, batch_size=BATCH, seed=cfg.seed, split="train", holdout_fraction=cfg.data.holdout_fraction,
        process_index=p, process_count=NPROC, block_rows=cfg.data.block_rows, shuffle_blocks=cfg.data.shuffle_blocks,
    ) for p in range(NPROC)]  # fmt: skip
    state = loop.init_train_state(run)
    step = loop.compile_step(run, state)
    shares, history = [], []
    for _ in range(STEPS):
        local = [next(loader) for loader in loaders]
        shares.append(local)
        state, metrics = step(state, pipeline.to_global(np.concatenate(local), sharding.input_sharding(run.mesh)))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    for loader in loaders:
        loader.close()
    return run, jax.device_get(state), history, shares


def test_two_processes_train_what_one_process_trains(job, reference):
    run, state, history, _ = reference
    trained = api.load(job["root"] / "proc0" / "run")
    params, stats = run.sae.fold_scale(state.params, state.stats, run.scale)
    for name, value in params.items():
        np.testing.assert_allclose(trained.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(trained.stats["tokens_since_fired"], stats["tokens_since_fired"])  # global counts
    rows = [json.loads(line) for line in (job["root"] / "proc0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        ref = history[row["step"] - 1]
        for key, value in ref.items():
            np.testing.assert_allclose(row[key], value, rtol=2e-5, atol=2e-6, err_msg=f"step {row['step']} {key}")
    assert max(r["dead_fraction"] for r in rows) > 0  # the dead counters moved, over the global batch
    summary = json.loads((job["root"] / "proc0" / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["train_tokens"] == STEPS * BATCH
    assert "Rank 1 is connected" in job["logs"]  # really two processes in one gloo job


def test_each_process_reads_a_disjoint_half_of_every_batch(job, reference):
    shares = reference[3]
    store = job["store"]
    rows = store.read(0, store.n_tokens)
    row_id = {r.tobytes(): i for i, r in enumerate(rows)}
    seen: set[int] = set()
    for local in shares:
        ids = [{row_id[r.tobytes()] for r in part} for part in local]
        assert [len(i) for i in ids] == [BATCH // NPROC] * NPROC
        assert not ids[0] & ids[1]
        assert not (ids[0] | ids[1]) & seen  # within this (first) epoch no token comes twice
        seen |= ids[0] | ids[1]


def test_only_process_0_writes_the_work_directory(job):
    for name in WORKDIR_FILES:
        assert (job["root"] / "proc0" / "run" / name).is_file(), name
        assert not (job["root"] / "proc1" / "run" / name).exists(), name


def test_the_latent_axis_spans_the_processes(job, reference):
    """Mesh 1×2, one device per process: the latents (and the two-stage top-k) are split over the two
    processes, each still reads only its own half of every batch, and the result is the one-process run's."""
    root = job["root"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PORT")}
    env.update(JOB_ROOT=str(root / "latent"), PYTHON=str(root / "python.sh"), LOG_DIR=str(root / "latent-logs"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([str(LOCAL), str(NPROC), str(job["config"]), "mesh.data=1", "mesh.model=2",
                             f"checkpoint.dir={root / 'latent-checkpoints'}"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:] + (root / "latent-logs" / "proc0.log").read_text()[-2000:]
    run, state, history, _ = reference
    trained = api.load(root / "latent" / "proc0" / "run")
    params, _ = run.sae.fold_scale(state.params, state.stats, run.scale)
    for name, value in params.items():
        np.testing.assert_allclose(trained.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    summary = json.loads((root / "latent" / "proc0" / "run" / "summary.json").read_text())
    # Rows each process needs, and at most the read-ahead more: 2 prefetched windows of 2 blocks of 256 rows and
    # the window being cut. (tests/test_multihost_mesh.py runs long enough for the count to rule out reading both
    # halves.)
    share, window = STEPS * BATCH // NPROC, 2 * 256
    counts = summary["rows_read_per_process"]
    assert len(counts) == NPROC and all(share <= n <= share + 3 * window for n in counts), counts
    assert "mesh data=1 x model=2" in (root / "latent-logs" / "proc0.log").read_text()


def test_one_process_resumes_the_checkpoint_of_two(job, tmp_path, capsys):
    """The 2-process job's checkpoint (step 6), restored by one process: the train state is the same (trained
    0 more steps, sae/ equals the 2-process job's), and training on starts the data stream again, with a
    warning that says so."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(job["root"] / "checkpoints", checkpoints)
    base = [f"checkpoint.dir={checkpoints}", "train.progress=false"]
    cfg = config_lib.load_config(job["config"], [*base, f"train.workdir={tmp_path / 'same'}"])
    assert loop.train(cfg)["resumed_from_step"] == STEPS
    printed = capsys.readouterr().out
    assert f"resuming from step {STEPS}" in printed
    assert "written by 2 process(es) and this job has 1" in printed and "data stream starts again" in printed
    two, one = api.load(job["root"] / "proc0" / "run"), api.load(tmp_path / "same")
    for name, value in two.params.items():
        np.testing.assert_array_equal(one.params[name], value, err_msg=name)
    cfg = config_lib.load_config(job["config"], [*base, f"train.workdir={tmp_path / 'on'}", f"train.steps={STEPS + 2}"])
    summary = loop.train(cfg)
    assert summary["steps"] == STEPS + 2 and summary["resumed_from_step"] == STEPS

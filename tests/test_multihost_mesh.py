"""The latent axis across hosts: 2 real processes (launch/local.sh, gloo) with 4 fake CPU devices each
train a sweep on meshes 1×8 and 2×4, where the model axis spans both processes.

One sweep covers the architectures (relu, gated, jumprelu, topk with its two-stage top-k, batchtopk),
each a stacked group of 2 members (two sparsity coefficients), so one job checks every architecture and
the sweep axis. Each run must match one process on one device fed the same global batches (the two
processes' loaders concatenated): held-out summaries within 1e-5 relative and parameters within float32
tolerance. A checkpoint written on 2×4 is resumed on 1×8 and must end where the 2×4 run ends. Each
process counts the rows it reads from the store (``rows_read_per_process`` in summary.json): its own
half, and never the whole batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_jax import api
from sae_jax import config as config_lib
from sae_jax.data import pipeline
from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.train import loop, sweep

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"
NPROC, LOCAL_DEVICES, STEPS, BATCH = 2, 4, 16, 64
ARCHS = ("relu", "gated", "jumprelu", "topk", "batchtopk")
COEFFICIENTS = (0.05, 0.2)
# Held-out metrics compared between runs (timings and read counts are not results).
NOT_RESULTS = {"train_seconds", "train_tokens_per_s", "rows_read_per_process", "resumed_from_step"}

CONFIG = f"""\
data: {{store: STORE, block_rows: 32, shuffle_blocks: 0}}
model: {{d_sae: 64, k: 4}}
train: {{batch_size: {BATCH}, steps: {STEPS}, log_every: 4, eval_tokens: 2048, dead_tokens: 256, progress: false,
        workdir: run}}
optim: {{lr: 0.01, warmup_steps: 1}}
checkpoint: {{every: 8, keep: 2}}
sweep:
  grid:
    model.architecture: [{", ".join(ARCHS)}]
    sparsity.coefficient: [{", ".join(map(str, COEFFICIENTS))}]
"""

INTERPRETER = """#!/usr/bin/env bash
# Start each process in $JOB_ROOT/procN, N from its distributed.process_id=N argument.
for a in "$@"; do
  case $a in distributed.process_id=*) d=$JOB_ROOT/proc${{a#*=}}; mkdir -p "$d"; cd "$d" ;; esac
done
exec {python} "$@"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mesh")
    store = write_synthetic(root / "store", SynthSpec(d_model=16, n_features=48, n_tokens=16384, seed=7, l0=3.0))
    config = root / "sweep.yaml"
    config.write_text(CONFIG.replace("STORE", str(store.path)))
    interpreter = root / "python.sh"
    interpreter.write_text(INTERPRETER.format(python=Path(sys.executable)))
    interpreter.chmod(0o755)
    return {"root": root, "config": config, "store": store}


def launch(setup: dict, name: str, *overrides: str) -> Path:
    """``SAE_JAX_CMD=sweep launch/local.sh 2 sweep.yaml`` with 4 fake devices per process; process 0's WORKDIR.

    Checkpoints go to one shared absolute directory, NAME/checkpoints, as on a cluster."""
    root = setup["root"] / name
    overrides = (*overrides, f"checkpoint.dir={root / 'checkpoints'}")
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    env.update(JOB_ROOT=str(root), PYTHON=str(setup["root"] / "python.sh"), LOG_DIR=str(root / "logs"),
               JAX_PLATFORMS="cpu", SAE_JAX_CMD="sweep",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    result = subprocess.run([str(LOCAL), str(NPROC), str(setup["config"]), *overrides], env=env, capture_output=True,
                            text=True, timeout=900, cwd=setup["root"])
    logs = "".join(f"\n--- proc{i}.log\n" + (root / "logs" / f"proc{i}.log").read_text()[-3000:]
                   for i in range(NPROC) if (root / "logs" / f"proc{i}.log").exists())
    assert result.returncode == 0, result.stderr[-2000:] + logs
    assert f"mesh data={overrides_mesh(overrides)}" in (root / "logs" / "proc0.log").read_text()
    return root / "proc0" / "run"


def overrides_mesh(overrides) -> str:
    values = dict(o.split("=", 1) for o in overrides if o.startswith("mesh."))
    return f"{values['mesh.data']} x model={values['mesh.model']}"


class BothShares:
    """The global batches of the 2-process job on one process: both processes' loaders, concatenated."""

    def __init__(self, run):
        c = run.cfg
        self.loaders = [pipeline.ActivationLoader(
            run.store, batch_size=c.train.batch_size, seed=c.seed, split="train",
            holdout_fraction=c.data.holdout_fraction, process_index=p, process_count=NPROC,
            block_rows=c.data.block_rows, shuffle_blocks=c.data.shuffle_blocks, dtype="storage",
        ) for p in range(NPROC)]  # fmt: skip
        self.skipped_rows = 0

    def __next__(self):
        return np.concatenate([next(loader) for loader in self.loaders])

    @property
    def rows_read(self) -> int:
        return sum(loader.rows_read for loader in self.loaders)

    def get_state(self):
        return [loader.get_state() for loader in self.loaders]

    def close(self):
        for loader in self.loaders:
            loader.close()


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The same sweep on one process and one device, fed the job's global batches."""
    workdir = setup["root"] / "reference"
    cfg = config_lib.load_config(setup["config"], [f"train.workdir={workdir}", "mesh.data=-1", "mesh.model=1"],
                                 resolve_recipe=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "make_loader", lambda run, split="train": BothShares(run))
        sweep.sweep(cfg)
    return workdir


@pytest.fixture(scope="module")
def on_2x4(setup) -> Path:
    return launch(setup, "2x4", "mesh.data=2", "mesh.model=4")


def members() -> list[str]:
    return [f"architecture-{a}_coefficient-{c}" for a in ARCHS for c in COEFFICIENTS]


def assert_same_sweep(workdir: Path, reference: Path) -> None:
    for name in members():
        got, want = api.load(workdir / "members" / name), api.load(reference / "members" / name)
        for key, value in want.params.items():
            np.testing.assert_allclose(got.params[key], value, rtol=2e-5, atol=2e-6, err_msg=f"{name} {key}")
        got_s, want_s = (json.loads((d / "members" / name / "summary.json").read_text()) for d in (workdir, reference))
        for key, value in want_s.items():
            if key in NOT_RESULTS or not isinstance(value, (int, float)):
                continue
            np.testing.assert_allclose(got_s[key], value, rtol=1e-5, atol=1e-7, err_msg=f"{name} summary {key}")


def test_a_2x4_mesh_over_two_processes_trains_what_one_device_trains(on_2x4, reference):
    assert_same_sweep(on_2x4, reference)


def test_a_1x8_mesh_puts_the_latents_of_every_member_across_both_processes(setup, reference):
    assert_same_sweep(launch(setup, "1x8", "mesh.data=1", "mesh.model=8"), reference)


def test_each_process_reads_only_its_own_half_of_every_batch(on_2x4):
    """Counted where the store is read: each process's rows are its share plus at most the loader's read-ahead
    (here one window is one local batch of 32 rows: 2 windows in grain's read buffer, 2 batches in its prefetch
    thread, one being cut and one taken), and fewer than reading every row of the global batches would take."""
    summary = json.loads((on_2x4 / "members" / members()[0] / "summary.json").read_text())
    counts, share = summary["rows_read_per_process"], STEPS * BATCH // NPROC
    assert len(counts) == NPROC, counts
    read_ahead = 6 * BATCH // NPROC
    assert share + read_ahead < STEPS * BATCH
    assert all(share <= n <= share + read_ahead for n in counts), counts


def test_a_checkpoint_written_on_2x4_resumes_on_1x8(setup, on_2x4, reference):
    """The 2×4 job's checkpoint of step 8 (of 16), resumed by the same 2 processes on a 1×8 mesh."""
    job = setup["root"] / "resume"
    checkpoints = job / "checkpoints"
    shutil.copytree(setup["root"] / "2x4" / "checkpoints", checkpoints)
    shutil.rmtree(checkpoints / str(STEPS))
    workdir = launch(setup, "resume", "mesh.data=1", "mesh.model=8")
    log = (job / "logs" / "proc0.log").read_text()
    assert f"resuming from step {STEPS // 2}" in log, log[-2000:]
    assert_same_sweep(workdir, reference)

"""Nothing silently wrong, nothing lost (issue 15): NaN rows and divergence, the work-directory
lock, every checkpoint corrupt, SIGTERM during the final outputs, an extended schedule, and
clear one-line messages for bad paths, YAML and meshes.

Runs are real `python -m sae_jax` processes (tests/clitools.py asserts that none prints a
traceback), except where the test reads in-process state.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sae_jax import config as config_lib
from sae_jax.data.store import import_files
from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.io import lock
from sae_jax.train import checkpoint, loop
from tests.clitools import ENV, ROOT, assert_no_traceback, cli, cli_error


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("rel") / "store",
                           SynthSpec(d_model=16, n_features=48, n_tokens=32768, seed=7, l0=3.0))


def args(store, workdir, *extra) -> list[str]:
    return ["train", "configs/demo.yaml", f"data.store={store.path}", f"train.workdir={workdir}", "model.d_sae=64",
            "train.steps=60", "train.batch_size=256", "train.log_every=10", "train.progress=false",
            "train.eval_tokens=1024", "checkpoint.every=20", "checkpoint.keep=5", *extra]


def popen(argv: list[str], log: Path) -> subprocess.Popen:
    """A background run whose output goes to files (a pipe nobody reads would block it)."""
    return subprocess.Popen([sys.executable, "-m", "sae_jax", *argv], cwd=ROOT, env=ENV,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def finished(proc: subprocess.Popen, log: Path, timeout: float = 240) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    assert_no_traceback(out + err)
    return proc.returncode, out, err


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, finished(proc, log)
        time.sleep(0.02)


def sae_tensors(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "sae" / "params.safetensors"))


# --------------------------------------------------------------------------- (1) NaN rows, divergence
@pytest.fixture(scope="module")
def nan_store(tmp_path_factory):
    """The probe's case: 5000 x 32 float32 rows, one NaN at row 10 (inside the init sample)."""
    root = tmp_path_factory.mktemp("nan")
    rows = np.random.default_rng(0).standard_normal((5000, 32)).astype(np.float32)
    rows[10, 3] = np.nan
    np.save(root / "a.npy", rows)
    return import_files(root / "store", [root / "a.npy"])


def test_a_nan_row_in_the_init_sample_is_skipped_with_nonfinite_skip(nan_store, tmp_path):
    done = cli(*args(nan_store, tmp_path / "run", "data.nonfinite=skip", "train.steps=100", "model.init_b_dec=mean"))
    assert done.returncode == 0, done.stderr
    assert all(np.isfinite(a).all() for a in sae_tensors(tmp_path / "run").values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["fvu"]) and summary["fvu"] < 1.0 and summary["l0"] > 0


def test_a_nan_row_in_the_init_sample_stops_with_nonfinite_error(nan_store, tmp_path):
    error = cli_error(*args(nan_store, tmp_path / "run", "train.steps=100"))
    assert "row 10 of site 'activations' holds NaN or Inf" in error and "data.nonfinite=skip" in error
    assert not (tmp_path / "run" / "summary.json").exists()


def test_divergence_exits_nonzero_keeping_the_last_good_checkpoint(store, tmp_path):
    workdir = tmp_path / "run"
    error = cli_error(*args(store, workdir, "optim.lr=1e38", "optim.warmup_steps=1", "train.log_every=1"), status=4)
    assert error.startswith("training produced NaN or Inf in ") and "last good checkpoint" in error
    assert not (workdir / "summary.json").exists() and not (workdir / "sae").exists()
    saved = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    for step in saved:
        arrays, _ = checkpoint.read_host(workdir / "checkpoints", int(step.name))
        assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")


# --------------------------------------------------------------------------- (2) the work-directory lock
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(store, tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "first"
    first = popen(args(store, workdir, "train.steps=100000", "train.log_every=1", "checkpoint.every=50"), log)
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 500, first, log)
    config_before = (workdir / "config.yaml").read_text()
    error = cli_error(*args(store, workdir, "train.steps=30", "model.d_sae=32"))
    assert f"PID {first.pid} on host {socket.gethostname()}" in error and str(workdir) in error
    assert (workdir / "config.yaml").read_text() == config_before  # the second writer touched nothing
    assert first.poll() is None  # and the first one runs on
    committed = lambda: [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]  # noqa: E731
    wait_for(lambda: committed(), first, log)
    first.send_signal(signal.SIGKILL)  # the lock stays behind, held by a dead PID
    first.wait()
    assert json.loads((workdir / lock.LOCK_FILE).read_text())["pid"] == first.pid
    last = max(committed())
    done = cli(*args(store, workdir, f"train.steps={last + 20}", "train.log_every=1", "checkpoint.every=50"))
    assert done.returncode == 0, done.stderr
    assert f"took over the stale lock of PID {first.pid}" in done.stderr and "no longer running" in done.stderr
    assert f"resuming from step {last} " in done.stdout
    assert not (workdir / lock.LOCK_FILE).exists()  # released at the end


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "command": "sae-jax train", "token": "x"}))
    with pytest.raises(lock.LockedError, match="PID 4242 on host node-17"):
        lock.WorkdirLock(tmp_path, "test").acquire()
    old = time.time() - lock.STALE_S - 5
    os.utime(path, (old, old))
    held = lock.WorkdirLock(tmp_path, "test")
    held.acquire()
    assert json.loads(path.read_text())["token"] == held.me["token"]
    held.release()
    assert not path.exists()


def _race(directory: str, barrier, queue) -> None:
    held = lock.WorkdirLock(directory, "racer")
    barrier.wait()
    try:
        held.acquire()
        queue.put("won")
        time.sleep(1.0)  # hold it while the others try
        held.release()
    except lock.LockedError:
        queue.put("refused")


def test_of_eight_racing_writers_exactly_one_takes_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(queue.get(timeout=5) for _ in procs) == ["refused"] * 7 + ["won"]


# --------------------------------------------------------------------------- (3) every checkpoint corrupt
def test_when_every_checkpoint_is_corrupt_the_run_refuses_unless_fresh(store, tmp_path):
    workdir = tmp_path / "run"
    assert cli(*args(store, workdir)).returncode == 0
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["20", "40", "60"]
    for step in steps:
        (workdir / "checkpoints" / step / "meta" / "process_0-of-1.json").write_text("{ cut short")
    error = cli_error(*args(store, workdir, "train.steps=80"))
    assert error.startswith(f"every checkpoint in {workdir / 'checkpoints'} is unusable (step(s) 60, 40, 20")
    assert "pass --fresh to start over" in error
    corrupt = workdir / "checkpoints.corrupt"
    assert sorted(p.name.split("-")[0] for p in corrupt.iterdir()) == ["20", "40", "60"]
    done = cli(*args(store, workdir, "train.steps=80", "--fresh"))
    assert done.returncode == 0 and "resuming" not in done.stdout, done.stderr
    assert sorted(p.name.split("-")[0] for p in corrupt.iterdir()) == ["20", "40", "60"]  # kept aside


# --------------------------------------------------------------------------- (7) and (12): paths, YAML, mesh
def test_a_workdir_that_is_a_file_is_one_sentence(store, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    error = cli_error(*args(store, tmp_path / "afile"))
    assert error == (f"config key 'train.workdir' is '{tmp_path / 'afile'}', which is a file (or lies under one); "
                     "choose a directory for the run.")


def test_config_path_errors_name_the_problem(tmp_path):
    error = cli_error("train", tmp_path)
    assert "is a directory" in error and str(tmp_path) in error
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_sae: 4\n train:\n  steps: 3\n")
    error = cli_error("train", bad)
    assert f"config file '{bad}' is not valid YAML at line 3, column 2" in error


def test_a_mesh_axis_larger_than_the_devices_names_the_key(store, tmp_path):
    error = cli_error(*args(store, tmp_path / "run", "mesh.model=2"))
    assert "config key 'mesh.model' is 2, but this job has 1 device(s)" in error and "0 ×" not in error


# --------------------------------------------------------------------------- (10) SIGTERM during the outputs
def test_sigterm_during_the_final_outputs_exits_143_and_a_rerun_writes_them(tmp_path):
    big = write_synthetic(tmp_path / "store", SynthSpec(d_model=64, n_features=256, n_tokens=262144, seed=1, l0=4))
    workdir = tmp_path / "run"
    argv = args(big, workdir, "train.steps=20", "model.d_sae=4096", "data.holdout_fraction=0.5",
                "train.eval_tokens=0", "checkpoint.every=0")
    log = tmp_path / "run"
    proc = popen(argv, log)
    wait_for(lambda: (workdir / "sae" / "sae.json").exists(), proc, log, timeout=240)  # the held-out eval follows
    proc.send_signal(signal.SIGTERM)
    status, _, err = finished(proc, log)
    assert status == checkpoint.EXIT_PREEMPTED, err
    # The signal lands once sae/ is written: usually during the held-out evaluation, so the run stops before
    # summary.json; on a loaded machine it can land before the check that follows sae/. Either way it stops.
    assert re.search(r"preempted (before writing summary\.json|after writing sae/, before the held-out evaluation): "
                     r"the checkpoint of the last step \(20\) is saved", err), err
    assert not (workdir / "summary.json").exists()
    done = cli(*argv)
    assert done.returncode == 0 and "resuming from step 20" in done.stdout, done.stderr
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 20


# --------------------------------------------------------------------------- (13) extending train.steps
def test_extending_a_decayed_run_rewarms_instead_of_jumping_and_resumes_bit_identically(store, tmp_path):
    base = ["optim.decay=linear", "optim.warmup_steps=10", "train.log_every=1", "checkpoint.every=20"]
    workdir = tmp_path / "run"
    make = lambda steps: config_lib.load_config("configs/demo.yaml", args(store, workdir, *base)[2:] +  # noqa: E731
                                                [f"train.steps={steps}"])
    loop.train(make(60))
    loop.train(make(120))
    rows = {r["step"]: r["lr"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    lr = 3e-3
    assert rows[60] < 0.1 * lr  # the decayed end of the first schedule
    steps = list(range(55, 121))
    jumps = [abs(rows[b] - rows[a]) for a, b in zip(steps, steps[1:], strict=False)]
    assert max(jumps) <= lr / 10 + 1e-9, jumps  # at most one warmup step's worth, never the 0 -> lr jump
    assert rows[61] < 0.1 * lr and rows[72] == pytest.approx(lr)  # re-warmed over optim.warmup_steps
    saved = config_lib.load_config(workdir / "config.yaml", resolve_recipe=False)
    assert saved.optim.rewarm_step == 60 and saved.optim.rewarm_from == pytest.approx(0.0, abs=0.02)
    # A later resume keeps the re-warm: resuming the extended run at step 100 ends bit-identical.
    again = tmp_path / "again"
    shutil.copytree(workdir, again)
    shutil.rmtree(again / "checkpoints" / "120")
    loop.train(config_lib.load_config("configs/demo.yaml", args(store, again, *base)[2:] + ["train.steps=120"]))
    a, b = sae_tensors(workdir), sae_tensors(again)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_extending_a_sweep_resumes_its_members(store, tmp_path):
    # The sweep's own config is unresolved (recipe fields None); only its members re-warm.
    workdir = tmp_path / "sweep"
    base = [f"data.store={store.path}", f"train.workdir={workdir}", "model.d_sae=32", "train.batch_size=256",
            "train.progress=false", "train.eval_tokens=1024", "optim.decay=linear", "checkpoint.every=20",
            "sweep.sparsity.coefficient=[0.05,0.1]"]
    assert cli("sweep", "configs/demo.yaml", *base, "train.steps=20").returncode == 0
    done = cli("sweep", "configs/demo.yaml", *base, "train.steps=40")
    assert done.returncode == 0 and "resuming from step 20" in done.stdout, done.stderr
    assert "re-warms" in done.stdout
    for member in (workdir / "members").iterdir():
        assert json.loads((member / "summary.json").read_text())["steps"] == 40

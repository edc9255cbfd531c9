"""Exact resume: runs killed (SIGKILL) or preempted (SIGTERM) at a random step after their first
checkpoint, then restarted, end bit-identical to uninterrupted runs (issue 7).

Every run is a real `python -m sae_jax train` process (`launch/local.sh 2` for the 2-process
case). The precondition of each comparison, two uninterrupted runs with identical results, is
checked in the same test. Runs of one test are started together to use both cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.train import checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 240, 30
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the module's processes: each program compiles once (saves CPU)."""
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny synthetic store: 16-d, 48 true features, 32k tokens."""
    return write_synthetic(tmp_path_factory.mktemp("resume") / "store",
                           SynthSpec(d_model=16, n_features=48, n_tokens=32768, seed=3, l0=3.0))


def write_config(path: Path, store, architecture: str) -> Path:
    """A tiny run: d_sae 64, batch 256, a metrics line and a progress signal every step."""
    cfg = {"data": {"store": str(store.path)}, "model": {"architecture": architecture, "d_sae": 64, "k": 8},
           "train": {"steps": STEPS, "batch_size": 256, "log_every": 1, "progress": False, "eval_tokens": 1024},
           "checkpoint": {"every": EVERY, "keep": 2}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """One training job (1 process, or `launch/local.sh N`) in its own work directory."""

    def __init__(self, config: Path, workdir: Path, nproc: int = 1, *extra: str):
        self.workdir, self.nproc = workdir, nproc
        args = [str(config), f"train.workdir={workdir}", *extra]
        if nproc == 1:
            cmd = [sys.executable, "-m", "sae_jax", "train", *args]
        else:
            cmd = ["bash", str(ROOT / "launch" / "local.sh"), str(nproc), *args]
        env = ENV | {"PYTHON": sys.executable, "LOG_DIR": str(workdir.parent / f"{workdir.name}-logs"),
                     "KILL_GRACE": "3"}
        self.log = open(workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.out", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def last_step(self) -> int:
        path = self.workdir / "metrics.jsonl"
        if not path.is_file():
            return 0
        lines = path.read_text().splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)["step"]
            except json.JSONDecodeError:
                continue
        return 0

    def wait_for_step(self, target: int, timeout: float = 120) -> None:
        """Poll metrics.jsonl until the run has logged ``target`` steps."""
        deadline = time.monotonic() + timeout
        while self.last_step() < target:
            assert self.proc.poll() is None, f"run ended (status {self.proc.returncode}) before step {target}:\n" \
                                             f"{self.output()}"
            assert time.monotonic() < deadline, f"no step {target} after {timeout} s"
            time.sleep(0.002)

    def wait_for_commit(self, timeout: float = 60) -> None:
        """Poll until the first checkpoint has committed (its step directory was renamed into place)."""
        deadline = time.monotonic() + timeout
        directory = self.workdir / checkpoint.CHECKPOINT_DIR
        while not any(p.name.isdigit() for p in directory.iterdir()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.002)

    def workers(self) -> list[int]:
        """Process ids of the training processes."""
        if self.nproc == 1:
            return [self.proc.pid]
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(k) for k in kids if "sae_jax" in Path(f"/proc/{k}/cmdline").read_text()]

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        """What the job printed (and, for several processes, what process 0 logged)."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read()
        proc0 = self.workdir.parent / f"{self.workdir.name}-logs" / "proc0.log"
        return text + (proc0.read_text() if self.nproc > 1 and proc0.is_file() else "")

    def resumed_step(self) -> int:
        """The step a restarted run said it resumed from."""
        out = self.output()
        assert "resuming from step " in out, out
        step = int(out.split("resuming from step ")[1].split()[0])
        assert f"({step * 256:,} tokens)" in out
        return step


def result(workdir: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The final checkpoint's arrays and the metrics log (without its timing column)."""
    arrays, meta = checkpoint.read_host(workdir / checkpoint.CHECKPOINT_DIR)
    assert meta["step"] == STEPS
    kept = sorted(int(p.name) for p in (workdir / checkpoint.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    assert len(kept) == 2 and kept[-1] == STEPS  # checkpoint.keep=2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")
    return arrays, rows


def assert_identical(a, b, what: str) -> None:
    arrays_a, rows_a = a
    arrays_b, rows_b = b
    assert sorted(arrays_a) == sorted(arrays_b)
    differ = [k for k in arrays_a if arrays_a[k].tobytes() != arrays_b[k].tobytes()]
    assert not differ, f"{what}: leaves differ: {differ}"
    assert any(k.startswith("opt_state/") for k in arrays_a) and "params/W_enc" in arrays_a
    assert [r["step"] for r in rows_a] == list(range(1, STEPS + 1))
    assert rows_a == rows_b, f"{what}: metrics differ"


def hit(run: Run, how: str, rng: random.Random) -> Run:
    """Kill (SIGKILL) or preempt (SIGTERM) a run at a random step after its first checkpoint."""
    target = rng.randint(EVERY + 1, STEPS // 2)
    run.wait_for_step(EVERY)
    run.wait_for_commit()
    run.wait_for_step(target)
    pids = run.workers()
    if how == "sigkill":  # the whole job dies at once
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    else:  # one host is told it is preempted; with 2 processes they must agree on the step
        os.kill(pids[-1], signal.SIGTERM)
    run.target = target
    return run


def check_killed(run: Run, how: str) -> None:
    status = run.wait()
    out = run.output()
    if how == "sigterm":
        assert status == checkpoint.EXIT_PREEMPTED, out
        assert "preempted: saved a checkpoint at step" in out
        run.saved_step = checkpoint.read_host(run.workdir / checkpoint.CHECKPOINT_DIR)[1]["step"]
        assert run.target <= run.saved_step < STEPS  # the step reached when the signal was handled
        for i in range(run.nproc if run.nproc > 1 else 0):  # every host saved that same step
            log = (run.workdir.parent / f"{run.workdir.name}-logs" / f"proc{i}.log").read_text()
            assert f"saved a checkpoint at step {run.saved_step} " in log, log
    else:
        assert status in (-signal.SIGKILL, 128 + signal.SIGKILL), out
        run.last_logged = run.last_step()
        assert EVERY < run.last_logged < STEPS


def check_resumed_step(killed: Run, again: Run, how: str) -> None:
    """SIGTERM resumes from the step it saved at; SIGKILL from the last periodic checkpoint."""
    step = again.resumed_step()
    if how == "sigterm":
        assert step == killed.saved_step
    else:
        assert step % EVERY == 0 and EVERY <= step <= killed.last_logged


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_sigkill_and_sigterm_resume_bit_identical(store, tmp_path, architecture):
    config = write_config(tmp_path / "c.yaml", store, architecture)
    rng = random.Random()
    refs = [Run(config, tmp_path / f"ref{i}") for i in range(2)]
    killed = {how: Run(config, tmp_path / how) for how in ("sigkill", "sigterm")}
    for how, run in killed.items():
        hit(run, how, rng)
    for how, run in killed.items():
        check_killed(run, how)
    restarts = {how: Run(config, run.workdir) for how, run in killed.items()}
    for r in refs:
        assert r.wait() == 0, r.output()
    reference = result(refs[0].workdir)
    assert_identical(reference, result(refs[1].workdir), "two uninterrupted runs")  # the precondition
    for how, again in restarts.items():
        assert again.wait() == 0, again.output()
        check_resumed_step(killed[how], again, how)
        assert_identical(reference, result(again.workdir), f"{architecture} run resumed after {how} at step "
                                                            f"{killed[how].target}")


def test_two_process_resume_bit_identical(store, tmp_path):
    config = write_config(tmp_path / "c.yaml", store, "relu")
    rng = random.Random()
    refs = [Run(config, tmp_path / f"ref{i}", 2) for i in range(2)]
    killed = {how: Run(config, tmp_path / how, 2) for how in ("sigterm", "sigkill")}
    for how, run in killed.items():
        hit(run, how, rng)
    for how, run in killed.items():
        check_killed(run, how)
    restarts = {how: Run(config, run.workdir, 2) for how, run in killed.items()}
    for r in refs:
        assert r.wait() == 0, r.output()
    reference = result(refs[0].workdir)
    assert_identical(reference, result(refs[1].workdir), "two uninterrupted 2-process runs")
    for how, again in restarts.items():
        assert again.wait() == 0, again.output()
        check_resumed_step(killed[how], again, how)
        assert_identical(reference, result(again.workdir), f"2-process run resumed after {how} at step "
                                                            f"{killed[how].target}")

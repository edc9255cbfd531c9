"""A sweep killed (SIGKILL) or preempted (SIGTERM) after its first checkpoint, then restarted,
ends with every member bit-identical to an uninterrupted sweep (issues 7 and 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.train import checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 160, 40
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_resume")
    store = write_synthetic(root / "store", SynthSpec(d_model=16, n_features=48, n_tokens=32768, seed=3, l0=3.0))
    cfg = {"data": {"store": str(store.path)}, "model": {"d_sae": 64, "k": 8},
           "train": {"steps": STEPS, "batch_size": 256, "log_every": 1, "progress": False, "eval_tokens": 1024},
           "checkpoint": {"every": EVERY, "keep": 2},
           "sweep": {"grid": {"model.architecture": ["relu", "topk"], "sparsity.coefficient": [0.1, 0.3]}}}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, workdir: Path) -> subprocess.Popen:
    log = open(workdir.parent / f"{workdir.name}.out", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "sae_jax", "sweep", str(config), f"train.workdir={workdir}"],
                            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def logged_step(workdir: Path) -> int:
    logs = sorted((workdir / "members").glob("*/metrics.jsonl")) if (workdir / "members").is_dir() else []
    steps = []
    for path in logs:
        lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
        steps.append(json.loads(lines[-1])["step"] if lines else 0)
    return min(steps) if steps else 0


def committed(workdir: Path) -> bool:
    directory = workdir / checkpoint.CHECKPOINT_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def hit(proc: subprocess.Popen, workdir: Path, sig: int, target: int) -> None:
    deadline = time.monotonic() + 180
    while not (committed(workdir) and logged_step(workdir) >= target):
        assert proc.poll() is None, (workdir.parent / f"{workdir.name}.out").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)


def members(workdir: Path) -> dict[str, tuple[bytes, list[dict]]]:
    out = {}
    for folder in sorted((workdir / "members").iterdir()):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r.pop("tokens_per_s")
        out[folder.name] = ((folder / "sae" / "params.safetensors").read_bytes(), rows)
    return out


def test_sweep_resumes_bit_identical_after_sigkill_and_sigterm(config, tmp_path):
    dirs = {name: tmp_path / name for name in ("ref0", "ref1", "sigkill", "sigterm")}
    procs = {name: start(config, d) for name, d in dirs.items()}
    hit(procs["sigkill"], dirs["sigkill"], signal.SIGKILL, EVERY + 13)
    hit(procs["sigterm"], dirs["sigterm"], signal.SIGTERM, EVERY + 29)
    statuses = {name: p.wait(300) for name, p in procs.items()}
    assert statuses["ref0"] == statuses["ref1"] == 0
    assert statuses["sigkill"] == -signal.SIGKILL
    assert statuses["sigterm"] == checkpoint.EXIT_PREEMPTED, (tmp_path / "sigterm.out").read_text()
    for name in ("sigkill", "sigterm"):
        assert start(config, dirs[name]).wait(300) == 0, (tmp_path / f"{name}.out").read_text()
        assert "resuming from step" in (tmp_path / f"{name}.out").read_text()
    ref = members(dirs["ref0"])
    assert len(ref) == 4 and all(len(rows) == STEPS for _, rows in ref.values())
    assert members(dirs["ref1"]) == ref  # the precondition: uninterrupted sweeps are identical
    for name in ("sigkill", "sigterm"):
        assert members(dirs[name]) == ref, name

"""Checkpoints (issue 7): digests, config changes on resume, what a resume restores, faults
(corrupt latest step, kill during save, full disk), SIGINT, and restore onto another mesh."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import cli
from sae_jax import config as config_lib
from sae_jax.data import pipeline
from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.train import checkpoint, loop
from tests.clitools import assert_no_traceback

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 90, 30
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny synthetic store: 16-d, 48 true features, 32k tokens."""
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "store",
                           SynthSpec(d_model=16, n_features=48, n_tokens=32768, seed=5, l0=3.0))


def overrides(store, workdir, *extra) -> list[str]:
    return [f"data.store={store.path}", f"train.workdir={workdir}", "model.d_sae=64", f"train.steps={STEPS}",
            "train.batch_size=256", "train.log_every=10", "train.progress=false", "train.eval_tokens=1024",
            f"checkpoint.every={EVERY}", "checkpoint.keep=3", *extra]


def make_cfg(store, workdir, *extra) -> config_lib.Config:
    return config_lib.load_config(None, overrides(store, workdir, *extra))


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted in-process run of STEPS steps with checkpoints at 30, 60 and 90."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    loop.train(make_cfg(store, workdir))
    return workdir


def copy_run(src: Path, dst: Path, keep_steps=None) -> Path:
    """A copy of a work directory, optionally with only some checkpoint steps."""
    shutil.copytree(src, dst)
    if keep_steps is not None:
        for p in (dst / checkpoint.CHECKPOINT_DIR).iterdir():
            if p.name.isdigit() and int(p.name) not in keep_steps:
                shutil.rmtree(p)
    return dst


def final_arrays(workdir: Path) -> dict[str, np.ndarray]:
    return checkpoint.read_host(workdir / checkpoint.CHECKPOINT_DIR, STEPS)[0]


def assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k].tobytes() != b[k].tobytes()] == []


# --------------------------------------------------------------------------- digests
def test_digest_sees_every_single_word_change():
    digest = jax.jit(checkpoint.leaf_digest)
    x = jax.random.normal(jax.random.key(0), (7, 5))
    base = np.asarray(digest(x))
    bits = np.asarray(x).view(np.uint32).copy()
    for i in range(bits.size):  # flip one bit of each word in turn
        flipped = bits.copy()
        flipped.flat[i] ^= np.uint32(1 << (i % 32))
        assert not np.array_equal(np.asarray(digest(jnp.asarray(flipped.view(np.float32)))), base)
    # Position matters (a permutation is a change); keys, bools and bfloat16 are digested too.
    assert not np.array_equal(np.asarray(digest(x[::-1])), base)
    for leaf in (jax.random.key(3), jnp.ones(4, jnp.bool_), jnp.ones(3, jnp.bfloat16), jnp.int32(7)):
        assert np.asarray(checkpoint.leaf_digest(leaf)).dtype == np.uint32


# --------------------------------------------------------------------------- config changes on resume
@pytest.mark.parametrize("change, key", [
    ("model.d_sae=128", "model.d_sae"), ("model.architecture=topk", "model.architecture"), ("seed=1", "seed"),
    ("train.batch_size=128", "train.batch_size"), ("optim.lr=3e-4", "optim.lr"), ("other-store", "data.store"),
])
def test_incompatible_config_is_refused_naming_the_key(store, reference, tmp_path, change, key):
    workdir = copy_run(reference, tmp_path / "run")
    if change == "other-store":
        other = write_synthetic(tmp_path / "other", SynthSpec(d_model=16, n_features=48, n_tokens=8192, seed=6))
        change = f"data.store={other.path}"
    with pytest.raises(config_lib.ConfigError, match=f"config key '{key}'") as e:
        loop.train(make_cfg(store, workdir, "train.steps=120", change))
    assert "--fresh" in str(e.value)


def test_compatible_config_is_accepted_reported_and_the_log_continues(store, reference, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path / "run")
    summary = loop.train(make_cfg(store, workdir, "train.steps=120", "train.log_every=7", "checkpoint.every=40",
                                  "checkpoint.keep=5"))
    out = capsys.readouterr().out
    assert f"resuming from step {STEPS} ({STEPS * 256:,} tokens)" in out
    for change in ("train.steps: 90 -> 120", "train.log_every: 10 -> 7", "checkpoint.every: 30 -> 40",
                   "optim.warmup_steps: kept 4"):
        assert change in out, out
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [*range(10, 91, 10), 91, 98, 105, 112, 119, 120]  # every 7 steps from the resume on
    assert summary["steps"] == 120
    assert checkpoint.Checkpoints(workdir / checkpoint.CHECKPOINT_DIR, 40, 5).steps() == [120, 90, 60, 30]


def test_fresh_starts_over(store, reference, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path / "run")
    (workdir / checkpoint.CHECKPOINT_DIR / "7.orbax-checkpoint-tmp").mkdir()
    assert cli.main(["train", "--fresh", str(write_yaml(tmp_path / "c.yaml")),
                     *overrides(store, workdir, "train.steps=30")]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / checkpoint.CHECKPOINT_DIR).iterdir()) == ["30"]
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [
        10, 20, 30]


def write_yaml(path: Path) -> Path:
    path.write_text("seed: 0\n")
    return path


# --------------------------------------------------------------------------- what a resume restores
def continue_from(store, workdir: Path, step: int, restore_params, restore_rest, restore_data) -> dict:
    """Run steps step..STEPS by hand from a checkpoint, restoring only the named parts."""
    run = loop.prepare(make_cfg(store, workdir))
    ckpts = checkpoint.Checkpoints(workdir / checkpoint.CHECKPOINT_DIR, EVERY, 3, loop.sharding.replicated(run.mesh))
    saved = ckpts.read_state(step, loop.abstract_train_state(run))
    state = loop.init_train_state(run)
    if restore_params:
        state = state.replace(params=saved.params)
    if restore_rest:
        state = state.replace(step=saved.step, opt_state=saved.opt_state, stats=saved.stats)
    loader = loop.make_loader(run)
    if restore_data:
        loader.set_state(ckpts.read_meta(step)["data"])
    train_step = loop.compile_step(run, state)
    for _ in range(step, STEPS):
        state, _ = train_step(state, pipeline.to_global(next(loader), loop.sharding.input_sharding(run.mesh)))
    loader.close()
    return {k: np.asarray(v) for k, v in jax.device_get(state.params).items()}


def test_full_resume_differs_from_weights_only_resume(store, reference, tmp_path):
    full = continue_from(store, reference, EVERY, True, True, True)
    expected = {k[len("params/"):]: v for k, v in final_arrays(reference).items() if k.startswith("params/")}
    assert_same_arrays(full, expected)  # restoring everything continues the run exactly
    weights_only = continue_from(store, reference, EVERY, True, False, False)
    no_data_position = continue_from(store, reference, EVERY, True, True, False)
    for partial in (weights_only, no_data_position):
        assert any(not np.array_equal(partial[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------- faults
def corrupt(step_dir: Path, how: str) -> None:
    if how == "meta":  # a digit of the data position, in the JSON item
        path = next((step_dir / "meta").glob("process_0-*.json"))
        path.write_text(path.read_text().replace('"batches": 60', '"batches": 61'))
        return
    path = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[:len(data) // 3])
    else:
        data[len(data) // 2] ^= 0x10
        path.write_bytes(data)


@pytest.mark.parametrize("how, reason", [("flipped", "digest"), ("truncated", "unreadable"), ("meta", "SHA-256")])
def test_corrupt_latest_checkpoint_is_reported_and_skipped(store, reference, tmp_path, capsys, how, reason):
    workdir = copy_run(reference, tmp_path / "run", keep_steps={30, 60})
    corrupt(workdir / checkpoint.CHECKPOINT_DIR / "60", how)
    loop.train(make_cfg(store, workdir))
    captured = capsys.readouterr()
    assert "step 60" in captured.err and "unusable" in captured.err and reason in captured.err, captured.err
    assert "resuming from step 30" in captured.out
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints.corrupt").iterdir()] == ["60"]
    assert_same_arrays(final_arrays(workdir), final_arrays(reference))


def run_cli(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sae_jax", "train", *args], cwd=ROOT, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_kill_during_save_keeps_the_previous_checkpoint(store, tmp_path):
    workdir = tmp_path / "run"
    args = [str(write_yaml(tmp_path / "c.yaml")), *overrides(store, workdir, "train.steps=2000", "checkpoint.every=20",
                                                             "checkpoint.keep=2")]
    proc = run_cli(*args)
    ckdir = workdir / checkpoint.CHECKPOINT_DIR
    killed_in = None
    deadline = time.monotonic() + 120
    while killed_in is None and proc.poll() is None and time.monotonic() < deadline:
        committed = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.is_dir() else []
        for tmp in ckdir.glob("*.orbax-checkpoint-tmp*") if committed else []:
            if any(tmp.rglob("ocdbt.process_0/d/*")):  # array data written, step not yet renamed into place
                proc.kill()
                killed_in = tmp
                break
        time.sleep(0.0005)
    proc.wait()
    assert killed_in is not None, "never caught a save in progress"
    previous = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert previous < int(killed_in.name.split(".")[0])
    again = run_cli(*args[:-3], "train.steps=" + str(previous + 20), "checkpoint.every=20", "checkpoint.keep=2")
    out = again.communicate(timeout=240)[0]
    assert again.returncode == 0, out
    assert f"resuming from step {previous} " in out
    assert not list(ckdir.glob("*tmp*"))  # orbax removed the half-written step


def full_disk_command(ckdir: Path, out: Path, args: list[str]) -> list[str] | None:
    """A shell command that trains with ckdir on a 640 KiB tmpfs in a private mount namespace, then copies it to
    out; None if this machine allows no mount namespace."""
    script = (f"mount -t tmpfs -o size=640k tmpfs {ckdir} && {{ {sys.executable} -m sae_jax train {' '.join(args)}; "
              f"s=$?; cp -a {ckdir}/. {out}/; exit $s; }}")
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {ckdir}"], capture_output=True)
        if probe.returncode == 0:
            return [*unshare, "sh", "-c", script]
    return None


INJECT_ENOSPC = """
import errno, sys
import orbax.checkpoint as ocp
from sae_jax import cli
save, calls = ocp.CheckpointManager.save, []
def full_disk(self, *a, **k):
    calls.append(1)
    if len(calls) == 4:
        raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, *a, **k)
ocp.CheckpointManager.save = full_disk
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_full_disk_stops_with_the_last_good_checkpoint(store, tmp_path):
    ckdir, out = tmp_path / "small_disk", tmp_path / "saved"
    ckdir.mkdir()
    out.mkdir()
    args = [str(write_yaml(tmp_path / "c.yaml")), *overrides(store, tmp_path / "run", "train.steps=300",
                                                             "checkpoint.every=10", "checkpoint.keep=50"),
            f"checkpoint.dir={ckdir}"]
    cmd = full_disk_command(ckdir, out, args)
    if cmd is None:  # no mount namespace here: ENOSPC injected at the 4th save instead of a real full disk
        cmd, out = [sys.executable, "-c", INJECT_ENOSPC, *args], ckdir
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == cli.EXIT_CHECKPOINT_FAILED, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert_no_traceback(done.stdout + done.stderr)  # issue 15 (4): orbax's ~420 lines of tracebacks are gone
    assert done.stderr.strip() == errors[0], done.stderr  # the one line is all there is
    error = errors[0]
    assert error.startswith("error: could not save the checkpoint of step") and "no space left on device" in error
    last_good = int(error.split("last good checkpoint is step ")[1].split()[0])
    failed = int(error.split("checkpoint of step ")[1].split()[0])
    steps = sorted(int(p.name) for p in out.iterdir() if p.name.isdigit())
    assert steps[-1] == last_good == failed - 10 and last_good >= 10
    # The last good checkpoint is intact: a run on a roomy disk resumes from it (digests checked).
    again = run_cli(*args[:-1], f"checkpoint.dir={out}", f"train.steps={last_good + 10}")
    text = again.communicate(timeout=240)[0]
    assert again.returncode == 0 and f"resuming from step {last_good} " in text, text


# --------------------------------------------------------------------------- SIGINT (single process)
def test_sigint_saves_a_checkpoint_and_raises_preempted(store, tmp_path):
    workdir = tmp_path / "run"
    cfg = make_cfg(store, workdir, "train.steps=100000", "train.log_every=1", "checkpoint.every=0")
    # Python's own SIGINT handler, whatever pytest was started under: a background job of a
    # non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, which the watch respects.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.getsignal(signal.SIGINT)

    def interrupt():
        while not (workdir / "metrics.jsonl").is_file() or len((workdir / "metrics.jsonl").read_text()) < 2000:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(checkpoint.Preempted) as e:
            loop.train(cfg)
        assert signal.getsignal(signal.SIGINT) is previous  # the watch put back the handler it found
    finally:
        signal.signal(signal.SIGINT, outer)
    assert 0 < e.value.step < 100000
    assert checkpoint.read_host(workdir / checkpoint.CHECKPOINT_DIR)[1]["step"] == e.value.step
    assert cli.EXIT_PREEMPTED == checkpoint.EXIT_PREEMPTED == 128 + signal.SIGTERM


# --------------------------------------------------------------------------- restore onto another mesh
MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from sae_jax import config as config_lib, sharding
from sae_jax.train import checkpoint
from sae_jax.data import pipeline
from sae_jax.train import loop


def cfg(workdir, data, model):
    return config_lib.load_config(None, [*json.loads(sys.argv[1]), f"train.workdir={workdir}", f"mesh.data={data}",
                                         f"mesh.model={model}", "train.steps=20", "checkpoint.every=10"])


def restore(workdir, data, model):
    run = loop.prepare(cfg(workdir, data, model))
    ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(run.cfg), 10, 3, sharding.replicated(run.mesh))
    start = checkpoint.restore_or_init(ckpts, None, loop.abstract_train_state(run), run.cfg, run.store.identity)
    saved = checkpoint.read_host(checkpoint.checkpoint_dir(run.cfg))[0]
    params = jax.device_get(start.state.params)
    same = all(np.array_equal(np.asarray(params[k]), saved["params/" + k]) for k in params)
    loader = loop.make_loader(run)
    loader.set_state(start.data_state)
    x = pipeline.to_global(next(loader), sharding.input_sharding(run.mesh))
    state, _ = loop.compile_step(run, start.state)(start.state, x)  # and it trains on
    return {"step": start.step, "same": same, "devices": jax.device_count(), "mesh": dict(run.mesh.shape),
            "spec": list(start.state.params["W_enc"].sharding.spec), "next_step": int(state.step),
            "changes": start.changes}


for job in sys.argv[2:]:
    mode, workdir, data, model = job.split(",")
    if mode == "train":
        loop.train(cfg(workdir, int(data), int(model)))
    else:
        print(json.dumps(restore(workdir, int(data), int(model))))
"""


def mesh_jobs(tmp_path, store, devices: int, *jobs: str) -> list[dict]:
    """Run MESH_SCRIPT's jobs ('train|restore,WORKDIR,DATA,MODEL') in one process with this many CPU devices."""
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    common = [f"data.store={store.path}", "model.d_sae=64", "train.batch_size=256", "train.progress=false",
              "train.eval_tokens=512"]
    env = ENV | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, str(script), json.dumps(common), *jobs],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_restore_onto_another_mesh(store, tmp_path):
    a, b = tmp_path / "on8x1", tmp_path / "on2x4"
    # Written on 8 devices (8x1) and on a 2x4 mesh (latents split 4 ways); the 2x4 one restored onto 8x1.
    [onto8x1] = mesh_jobs(tmp_path, store, 8, f"train,{a},8,1", f"train,{b},2,4", f"restore,{b},8,1")
    [onto2] = mesh_jobs(tmp_path, store, 2, f"restore,{a},2,1")  # 8 devices -> 2
    assert onto2 | {"changes": None} == {"step": 20, "same": True, "devices": 2, "mesh": {"data": 2, "model": 1},
                                         "spec": [None, "model"], "next_step": 21, "changes": None}
    assert "mesh.data: 8 -> 2" in onto2["changes"]
    assert onto8x1["same"] and onto8x1["mesh"] == {"data": 8, "model": 1} and onto8x1["next_step"] == 21
    assert {"mesh.data: 2 -> 8", "mesh.model: 4 -> 1"} <= set(onto8x1["changes"])


def test_a_format_1_checkpoint_is_refused_with_what_to_do():
    """Format 1 (before the Flax models: its state has TrainState.rng) is not read as corrupt but refused."""
    cfg = config_lib.load_config(None, ["model.d_model=8", "train.workdir=/tmp/old_run"])
    meta = {"version": 1, "store": "s", "config": config_lib.to_dict(cfg)}
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint format 1 .*reads format 2.*--fresh"):
        checkpoint.reconcile(meta, cfg, "s", 10)

"""The store-writing and store-reading commands as a user runs them, in real subprocesses.

A killed `sae-jax synth` or `sae-jax store import` leaves OUT.partial: a rerun without flags
says (in one line) to pass --resume or --overwrite; --resume finishes it with exactly the rows
and checksums of an uninterrupted run, --overwrite starts over. Bad inputs leave nothing behind.
`sae-jax eval` refuses a ground_truth.npy that changed after finalize, and its --nonfinite option
is the one its NaN message names.
"""

import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import api
from sae_jax import config as config_lib
from sae_jax.data import store as store_lib
from sae_jax.io import sae_folder
from sae_jax.models import make_sae
from tests.clitools import assert_no_traceback, cli, cli_error, cli_start

# 20 shards of 32768 rows, written in about 3 s: long enough to be killed after the first ones.
SYNTH = ("--d-model", 16, "--n-features", 128, "--n-tokens", 20 * 32768, "--seed", 3)


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + store_lib.PARTIAL_SUFFIX)


def durable_rows(out: Path) -> int:
    """Rows recorded as whole shards in OUT.partial (0 while there is none)."""
    try:
        return json.loads((partial_of(out) / store_lib.PROGRESS_FILE).read_text())["n_tokens"]
    except (OSError, ValueError):
        return 0


def kill_mid_write(out: Path, *args, cwd: Path) -> None:
    """Start `sae-jax ARGS` writing OUT and SIGKILL it once OUT.partial holds a whole shard."""
    proc = cli_start(*args, cwd=cwd)
    deadline = time.monotonic() + 120
    try:
        while durable_rows(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # nothing happens if it has already exited
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"it was not killed mid-write (exit {proc.returncode}):\n{err}"
    assert_no_traceback(err)
    assert durable_rows(out) > 0


def first_shard(path: Path) -> tuple[int, int]:
    """(inode, mtime) of shard 0: unchanged by a resume that continues after the durable rows."""
    st = (path / store_lib.shard_file("activations", 0)).stat()
    return st.st_ino, st.st_mtime_ns


def assert_same_store(a: Path, b: Path) -> None:
    """The same rows, shard checksums, file digests, statistics and source (all metadata but the date)."""
    sa, sb = store_lib.open_store(a), store_lib.open_store(b)
    assert sa.read(0, sa.n_tokens).tobytes() == sb.read(0, sb.n_tokens).tobytes()
    ma, mb = ({k: v for k, v in s.metadata.items() if k != "created"} for s in (sa, sb))
    assert ma == mb
    assert sa.verify() == [] and not partial_of(a).exists()
    assert not a.with_name(a.name + store_lib.REPLACED_SUFFIX).exists()


def assert_rerun_refused(*args, cwd: Path, partial: Path) -> None:
    line = cli_error(*args, cwd=cwd)
    assert str(partial) in line and "--resume" in line and "--overwrite" in line, line
    assert "resume=True" in line  # the same sentence serves Python callers


# --------------------------------------------------------------------------- synth


def test_killed_synth_reruns_with_resume_or_overwrite(tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "s"
    assert cli("synth", clean, *SYNTH, cwd=tmp_path).returncode == 0
    kill_mid_write(out, "synth", out, *SYNTH, cwd=tmp_path)
    assert not out.exists()
    assert_rerun_refused("synth", out, *SYNTH, cwd=tmp_path, partial=partial_of(out))
    line = cli_error("synth", out, *SYNTH[:-1], 4, "--resume", cwd=tmp_path)  # another seed: refused
    assert str(partial_of(out)) in line and "synthetic.seed" in line and "--overwrite" in line, line
    shard0 = first_shard(partial_of(out))
    assert cli("synth", out, *SYNTH, "--resume", cwd=tmp_path).returncode == 0
    assert first_shard(out) == shard0  # continued, not rewritten
    assert_same_store(out, clean)

    line = cli_error("synth", out, *SYNTH, cwd=tmp_path)  # a finalized store is there now
    assert str(out) in line and "already exists" in line and "--overwrite" in line, line
    kill_mid_write(out, "synth", out, *SYNTH[:-1], 4, "--overwrite", cwd=tmp_path)
    assert store_lib.open_store(out).metadata["source"]["synthetic"]["seed"] == 3  # kept until the new one is done
    assert cli("synth", out, *SYNTH, "--overwrite", cwd=tmp_path).returncode == 0
    assert_same_store(out, clean)


# --------------------------------------------------------------------------- store import


def test_killed_import_reruns_with_resume_or_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, rng.standard_normal((2_000_000, 16), dtype=np.float32))  # 61 shards of 32768 rows
    np.save(b, rng.standard_normal((1000, 16), dtype=np.float32))
    clean, out = tmp_path / "clean", tmp_path / "s"
    imp = ("store", "import", out, "--from", a, b)
    assert cli("store", "import", clean, "--from", a, b, cwd=tmp_path).returncode == 0
    kill_mid_write(out, *imp, cwd=tmp_path)
    assert not out.exists()
    assert_rerun_refused(*imp, cwd=tmp_path, partial=partial_of(out))
    line = cli_error("store", "import", out, "--from", a, "--resume", cwd=tmp_path)  # other inputs: refused
    assert str(partial_of(out)) in line and "imported_from" in line and "--overwrite" in line, line
    shard0 = first_shard(partial_of(out))
    assert cli(*imp, "--resume", cwd=tmp_path).returncode == 0
    assert first_shard(out) == shard0
    assert_same_store(out, clean)

    kill_mid_write(out, *imp, "--overwrite", cwd=tmp_path)
    assert cli(*imp, "--overwrite", cwd=tmp_path).returncode == 0
    assert_same_store(out, clean)


def test_import_of_an_empty_npy_leaves_nothing_behind(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    out = tmp_path / "s"
    line = cli_error("store", "import", out, "--from", tmp_path / "empty.npy", cwd=tmp_path)
    assert "empty.npy" in line and "no rows" in line, line
    assert not out.exists() and not partial_of(out).exists()
    np.save(tmp_path / "good.npy", np.ones((10, 8), np.float32))
    assert cli("store", "import", out, "--from", tmp_path / "good.npy", cwd=tmp_path).returncode == 0  # no blocker


def test_import_of_a_1d_npy_asks_for_rows_by_d_model(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5000, np.float32))
    out = tmp_path / "s"
    line = cli_error("store", "import", out, "--from", tmp_path / "flat.npy", cwd=tmp_path)
    assert "flat.npy" in line and "(5000,)" in line and "[rows, d_model]" in line, line
    assert "d_model is 5000" not in line
    assert not out.exists() and not partial_of(out).exists()


# --------------------------------------------------------------------------- eval


def saved_sae(root: Path, d_model: int = 16) -> Path:
    """A work directory holding an (untrained) ReLU SAE of width ``d_model``."""
    cfg = config_lib.load_config(None, [f"model.d_model={d_model}", "model.d_sae=32"])
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    params = sae.init_params(jax.random.key(0), jnp.ones((8, d_model), jnp.float32))
    stats = {k: np.asarray(v) for k, v in sae.init_stats().items()}
    api.save(root / sae_folder.SAE_DIR, sae, {k: np.asarray(v) for k, v in params.items()}, stats, {"norm_scale": 1.0})
    return root


def test_eval_refuses_a_changed_ground_truth(tmp_path):
    store, run = tmp_path / "s", saved_sae(tmp_path / "run")
    assert cli("synth", store, "--d-model", 16, "--n-features", 40, "--n-tokens", 4096, cwd=tmp_path).returncode == 0
    gt = store / "ground_truth.npy"
    good = tmp_path / "gt.npy"
    good.write_bytes(gt.read_bytes())
    data = bytearray(gt.read_bytes())
    data[-7] ^= 0x40  # inside the array data: np.load still reads it, with one value changed
    gt.write_bytes(bytes(data))
    assert not np.array_equal(np.load(gt), np.load(good))

    line = cli_error("eval", run, "--data", store, cwd=tmp_path)
    assert str(gt) in line and "checksum mismatch" in line and "--ground-truth" in line, line
    verify = cli("store", "verify", store, cwd=tmp_path)
    assert verify.returncode == 1 and f"FAIL {gt}: checksum mismatch" in verify.stdout, verify.stdout
    done = cli("eval", run, "--data", store, "--ground-truth", good, cwd=tmp_path)
    assert done.returncode == 0 and "mmcs" in done.stdout, done.stdout + done.stderr


def test_eval_nonfinite_message_names_its_own_option(tmp_path):
    x = np.random.default_rng(1).standard_normal((3000, 16)).astype(np.float32)
    x[1234, 5] = np.nan
    np.save(tmp_path / "x.npy", x)
    store, run = tmp_path / "s", saved_sae(tmp_path / "run")
    assert cli("store", "import", store, "--from", tmp_path / "x.npy", cwd=tmp_path).returncode == 0

    line = cli_error("eval", run, "--data", store, cwd=tmp_path)
    assert "row 1234" in line and "--nonfinite skip" in line and "data.nonfinite" not in line, line
    out = tmp_path / "eval.json"
    done = cli("eval", run, "--data", store, "--nonfinite", "skip", "--json", out, cwd=tmp_path)
    assert done.returncode == 0 and "skipped 1 row(s)" in done.stdout, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["tokens"] == 2999 and result["skipped_rows"] == 1

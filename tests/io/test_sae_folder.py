"""The sae/ folder (issue 15): an atomic write that a full disk cannot leave half done, a digest
checked on every load, one clear sentence for every bad input of the Python API, and saved
files readable as the umask allows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from sae_jax import api
from sae_jax import cli as cli_lib
from sae_jax import config as config_lib
from sae_jax.data.synthetic import SynthSpec, write_synthetic
from sae_jax.io import sae_folder, saelens
from sae_jax.models import make_sae
from sae_jax.train import checkpoint
from sae_jax.train.init_from import initial_params
from tests.clitools import ENV, ROOT, assert_no_traceback, cli, cli_error

D_MODEL, D_SAE = 16, 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny synthetic store: 16-d, 48 true features, 8192 tokens."""
    return write_synthetic(tmp_path_factory.mktemp("saefolder") / "store",
                           SynthSpec(d_model=D_MODEL, n_features=48, n_tokens=8192, seed=5, l0=3.0))


def make(architecture: str = "relu", d_sae: int = D_SAE, seed: int = 0):
    """(sae, params, stats) of a freshly initialized SAE."""
    cfg = config_lib.load_config(None, [f"model.d_model={D_MODEL}", f"model.d_sae={d_sae}",
                                        f"model.architecture={architecture}"])
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    x = np.random.default_rng(seed).normal(size=(64, D_MODEL)).astype(np.float32)
    return sae, sae.init_params(jax.random.key(seed), jnp.asarray(x)), sae.init_stats()


def saved(folder: Path, **kw) -> Path:
    api.save(folder, *make(**kw), {"note": "test"})
    return folder


def truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def as_version_1(folder: Path) -> None:
    """Rewrite sae.json as format 1 wrote it: no digest."""
    doc = json.loads((folder / sae_folder.SPEC).read_text())
    del doc["weights_sha256"]
    (folder / sae_folder.SPEC).write_text(json.dumps({**doc, "format_version": 1}))


# --------------------------------------------------------------------------- (5) full disk while writing sae/
def overrides(store, workdir, ckdir, d_sae) -> list[str]:
    return [f"data.store={store.path}", f"train.workdir={workdir}", f"checkpoint.dir={ckdir}", f"model.d_sae={d_sae}",
            "train.steps=10", "train.batch_size=256", "train.log_every=5", "train.progress=false",
            "train.eval_tokens=512", "checkpoint.every=10", "checkpoint.keep=2"]


PRESAVE = f"""
import sys
import jax
from sae_jax import api, config
cfg = config.load_config(None, ["model.d_model={D_MODEL}", "model.d_sae={D_SAE}"])
from sae_jax.models import make_sae
sae = make_sae(cfg.model, cfg.sparsity.penalty)
api.save(sys.argv[1] + "/sae", sae, sae.init_params(jax.random.key(0)), sae.init_stats())
"""
INJECT_ENOSPC = """
import errno, sys
from sae_jax import cli
from sae_jax.io import sae_folder
def full_disk(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
sae_folder.save_file = full_disk
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def full_disk_train(workdir: Path, out: Path, args: list[str]) -> list[str]:
    """Train with workdir on a 200 KiB tmpfs holding a good small sae/ (private mount namespace), then copy
    workdir to out; where no mount namespace is allowed, ENOSPC is injected into the weights write instead."""
    py = sys.executable
    script = (f"mount -t tmpfs -o size=200k tmpfs {workdir} && {py} -c '{PRESAVE}' {workdir} && "
              f"{{ {py} -m sae_jax train {' '.join(args)}; s=$?; cp -a {workdir}/. {out}/; exit $s; }}")
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {workdir}"],
                               capture_output=True)
        if probe.returncode == 0:
            return [*unshare, "sh", "-c", script]
    subprocess.run([py, "-c", PRESAVE, str(out)], cwd=ROOT, env=ENV, check=True)
    return [py, "-c", INJECT_ENOSPC, *[a.replace(str(workdir), str(out)) for a in args]]


def test_full_disk_while_saving_the_sae_exits_3_and_keeps_the_good_folder(store, tmp_path):
    workdir, out, ckdir = tmp_path / "small_disk", tmp_path / "copied", tmp_path / "checkpoints"
    workdir.mkdir()
    out.mkdir()
    args = ["configs/demo.yaml", *overrides(store, workdir, ckdir, d_sae=8192)]  # 1 MiB of weights
    done = subprocess.run(full_disk_train(workdir, out, args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert_no_traceback(done.stdout + done.stderr, "sae-jax train on a full disk")
    assert done.returncode == cli_lib.EXIT_CHECKPOINT_FAILED, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert f"could not write the trained SAE to '{workdir / 'sae'}': no space left on device" in errors[0]
    assert "train.workdir" in errors[0] and "checkpoints are intact" in errors[0]
    # Nothing claims success: no summary, no partial folder, and sae/ is still the good one saved before.
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert api.find_saes(out) == [out / "sae"] and api.load(out).sae.d_sae == D_SAE
    # As the message says, the checkpoints are intact: a rerun elsewhere resumes and saves sae/.
    again = cli("train", "configs/demo.yaml", *overrides(store, tmp_path / "roomy", ckdir, d_sae=8192))
    assert again.returncode == 0 and "resuming from step 10 " in again.stdout, again.stdout + again.stderr
    assert api.load(tmp_path / "roomy").sae.d_sae == 8192


def test_save_replaces_a_folder_whole_and_cleans_a_killed_save(tmp_path):
    folder = saved(tmp_path / "sae", d_sae=32)
    (tmp_path / ".sae.partial").mkdir()  # what a killed save leaves
    (tmp_path / ".sae.partial" / sae_folder.SPEC).write_text("{}")
    assert api.find_saes(tmp_path) == [folder]  # never taken for an SAE
    saved(folder, architecture="topk")
    assert api.load(folder).sae.name == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in folder.iterdir()) == [sae_folder.WEIGHTS, sae_folder.SPEC]
    (tmp_path / "mine").mkdir()  # a folder of the user's own files is never replaced
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"'.*mine' exists and holds notes.txt, not only a saved SAE"):
        saved(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# --------------------------------------------------------------------------- (6) digest, damaged folders
def test_digest_is_recorded_and_version_1_folders_still_load(tmp_path):
    folder = saved(tmp_path / "sae")
    doc = json.loads((folder / sae_folder.SPEC).read_text())
    assert doc["format_version"] == sae_folder.FORMAT_VERSION == 2
    assert doc["weights_sha256"] == sae_folder.sha256_file(folder / sae_folder.WEIGHTS)
    expected = api.load(folder).params
    as_version_1(folder)
    back = api.load(folder)
    assert all(np.array_equal(back.params[k], v) for k, v in expected.items())


def damage(folder: Path, how: str) -> Path:
    """Damage an sae/ folder; the file that is damaged."""
    if how == "truncated weights":
        truncate(folder / sae_folder.WEIGHTS)
        return folder / sae_folder.WEIGHTS
    if how == "truncated weights, format 1":
        as_version_1(folder)
        truncate(folder / sae_folder.WEIGHTS)
        return folder / sae_folder.WEIGHTS
    if how == "flipped byte":
        data = bytearray((folder / sae_folder.WEIGHTS).read_bytes())
        data[-3] ^= 0xFF
        (folder / sae_folder.WEIGHTS).write_bytes(bytes(data))
        return folder / sae_folder.WEIGHTS
    if how == "corrupt sae.json":
        truncate(folder / sae_folder.SPEC, 40)
        return folder / sae_folder.SPEC
    if how == "unknown architecture":
        doc = json.loads((folder / sae_folder.SPEC).read_text())
        (folder / sae_folder.SPEC).write_text(json.dumps({**doc, "sae": {**doc["sae"], "architecture": "nope"}}))
        return folder / sae_folder.SPEC
    if how == "missing weights":
        (folder / sae_folder.WEIGHTS).unlink()
        return folder / sae_folder.WEIGHTS
    raise AssertionError(how)


DAMAGES = ["truncated weights", "truncated weights, format 1", "flipped byte", "corrupt sae.json",
           "unknown architecture", "missing weights"]


def assert_says_resave(message: str, path: Path) -> None:
    assert f"'{path}'" in message and "sae-jax train" in message and message.count(". ") == 0, message


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_folder_is_one_sentence_from_the_api(tmp_path, how):
    bad = damage(saved(tmp_path / "run" / "sae"), how)
    for path in (tmp_path / "run", tmp_path / "run" / "sae"):
        with pytest.raises(api.SAEFileError) as e:
            api.load(path)
        assert_says_resave(str(e.value), bad)
    sae, _, _ = make()
    with pytest.raises(api.SAEFileError) as e:  # model.init_from
        initial_params(tmp_path / "run", sae, 1.0)
    assert_says_resave(str(e.value), bad)


@pytest.mark.parametrize("how", ["truncated weights, format 1", "flipped byte", "corrupt sae.json"])
def test_damaged_folder_is_one_error_line_in_eval(store, tmp_path, how):
    bad = damage(saved(tmp_path / "run" / "sae"), how)
    assert_says_resave(cli_error("eval", tmp_path / "run", "--data", store.path), bad)


def test_a_sweep_member_without_weights_is_reported_not_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        saved(sweep / "members" / name / "sae")
    (sweep / "members" / "b" / "sae" / sae_folder.WEIGHTS).unlink()
    with pytest.raises(api.SAEFileError, match="params.safetensors' is missing"):
        saelens.export_workdir(sweep, tmp_path / "out")
    assert api.load(sweep, member="a").sae.d_sae == D_SAE


def test_damaged_folder_is_one_error_line_in_export_and_eval_lm(tmp_path):
    bad = damage(saved(tmp_path / "run" / "sae"), "truncated weights")
    assert_says_resave(cli_error("export", tmp_path / "run", "--out", tmp_path / "out"), bad)
    assert not (tmp_path / "out" / saelens.SAELENS_CFG).exists()
    assert_says_resave(cli_error("eval-lm", tmp_path / "run", "--model", "none", "--corpus", "none"), bad)


# --------------------------------------------------------------------------- (8) the Python API on bad input
def lens_folder(root: Path, plain: bool = False) -> Path:
    """An exported SAELens folder; plain: without our sidecar (so it imports by SAELens semantics, cfg.json)."""
    saelens.export_saelens(api.load(saved(root / "src" / "sae")), root / "lens")
    if plain:
        (root / "lens" / saelens.SIDECAR).unlink()
        (root / "lens" / saelens.SIDECAR_WEIGHTS).unlink()
    return root / "lens"


def edit_cfg(folder: Path, **fields) -> None:
    cfg = json.loads((folder / saelens.SAELENS_CFG).read_text())
    cfg = {k: v for k, v in {**cfg, **fields}.items() if v is not None}
    (folder / saelens.SAELENS_CFG).write_text(json.dumps(cfg))


def bad_path(root: Path, name: str) -> Path:
    """A path api.load must refuse, made under root."""
    match name:
        case "missing folder" | "missing npz":
            return root / ("nope.npz" if "npz" in name else "nope")
        case "empty folder" | "unrelated files":
            (root / "dir").mkdir()
            if name == "unrelated files":
                (root / "dir" / "notes.txt").write_text("x")
            return root / "dir"
        case "a text file":
            (root / "notes.txt").write_text("x")
            return root / "notes.txt"
        case "the weights file":
            return saved(root / "run" / "sae") / sae_folder.WEIGHTS
        case "a store":
            return Path(write_synthetic(root / "store", SynthSpec(d_model=4, n_features=8, n_tokens=256, l0=2.0)).path)
        case "garbage npz":
            (root / "x.npz").write_bytes(b"not a zip")
        case "npz of one array":
            np.save(root / "x.npy", np.zeros(3))
            (root / "x.npy").rename(root / "x.npz")
        case "npz of strings":
            np.savez(root / "x.npz", W_enc=np.array(["a"]))
        case "npz of pickled objects":
            np.savez(root / "x.npz", W_enc=np.array([{}], object))
        case "npz that is not Gemma Scope":
            np.savez(root / "x.npz", a=np.zeros(3))
        case "sidecar not JSON":
            (lens_folder(root) / saelens.SIDECAR).write_text("{")
        case "sidecar weights truncated":
            truncate(lens_folder(root) / saelens.SIDECAR_WEIGHTS, 50)
        case "SAELens weights truncated":
            truncate(lens_folder(root) / saelens.SAELENS_WEIGHTS)
        case "SAELens weights lack a tensor":
            save_file({"W_enc": np.zeros((D_MODEL, D_SAE), np.float32)},
                      str(lens_folder(root, plain=True) / saelens.SAELENS_WEIGHTS))
        case "SAELens weights of the wrong shape":
            edit_cfg(lens_folder(root, plain=True), d_sae=2 * D_SAE)
        case "SAELens cfg.json not JSON" | "SAELens cfg.json a list":
            (lens_folder(root, plain=True) / saelens.SAELENS_CFG).write_text("{oops" if "JSON" in name else "[1]")
        case "SAELens cfg.json without d_in":
            edit_cfg(lens_folder(root, plain=True), d_in=None)
        case "SAELens cfg.json d_sae a string":
            edit_cfg(lens_folder(root, plain=True), d_sae="64")
    return root / "x.npz" if "npz" in name else root / "lens"


BAD_PATHS = {  # name: (exception, words the message holds)
    "missing folder": (FileNotFoundError, ["does not exist"]),
    "missing npz": (FileNotFoundError, ["does not exist"]),
    "empty folder": (FileNotFoundError, ["holds no trained SAE"]),
    "unrelated files": (FileNotFoundError, ["holds no trained SAE"]),
    "a text file": (ValueError, ["is a file"]),
    "the weights file": (ValueError, ["is a file", "pass its folder"]),
    "a store": (ValueError, ["activation store"]),
    "garbage npz": (ValueError, ["not a readable .npz"]),
    "npz of one array": (ValueError, ["not a readable .npz"]),
    "npz of strings": (ValueError, ["not a readable .npz"]),
    "npz of pickled objects": (ValueError, ["not a readable .npz"]),
    "npz that is not Gemma Scope": (ValueError, ["lacks W_enc"]),
    "sidecar not JSON": (api.SAEFileError, [saelens.SIDECAR, "not valid JSON"]),
    "sidecar weights truncated": (api.SAEFileError, [saelens.SIDECAR_WEIGHTS, "not a readable safetensors"]),
    "SAELens weights truncated": (api.SAEFileError, [saelens.SAELENS_WEIGHTS, "not a readable safetensors"]),
    "SAELens weights lack a tensor": (ValueError, ["W_dec is missing"]),
    "SAELens weights of the wrong shape": (ValueError, ["W_enc is (16, 64) (expected (16, 128))"]),
    "SAELens cfg.json not JSON": (api.SAEFileError, ["cfg.json", "not valid JSON", "sae-jax export"]),
    "SAELens cfg.json a list": (api.SAEFileError, ["cfg.json", "JSON list"]),
    "SAELens cfg.json without d_in": (ValueError, ["cfg.json field 'd_in' is None"]),
    "SAELens cfg.json d_sae a string": (ValueError, ["cfg.json field 'd_sae' is '64'"]),
}


@pytest.mark.parametrize("name", list(BAD_PATHS))
def test_load_of_a_bad_path_is_one_clear_sentence(tmp_path, name):
    kind, words = BAD_PATHS[name]
    path = bad_path(tmp_path, name)
    with pytest.raises(kind) as e:
        api.load(path)
    message = str(e.value)
    assert type(e.value) in (kind, api.SAEFileError) and f"'{path}" in message, message
    assert all(w in message for w in words), message
    assert message.endswith(".") and "\n" not in message


def test_load_of_a_missing_member_names_the_members(tmp_path):
    for name in ("a", "b"):
        saved(tmp_path / "members" / name / "sae")
    with pytest.raises(FileNotFoundError, match=r"has no SAE named 'c'; members: members/a, members/b\."):
        api.load(tmp_path, member="c")
    with pytest.raises(ValueError, match="pick one with member=NAME"):
        api.load(tmp_path)


BAD_ARRAYS = {  # name: (fn(width) -> the bad input, words the message holds)
    "strings": (lambda w: np.array([["a"] * w]), "dtype <U1"),
    "a list of strings": (lambda w: [["a"] * w], "dtype <U1"),
    "complex": (lambda w: np.ones((2, w), np.complex64), "dtype complex64"),
    "jax complex": (lambda w: jnp.ones((2, w), jnp.complex64), "dtype complex64"),
    "objects": (lambda w: np.array([[object()] * w]), "dtype object"),
    "booleans": (lambda w: np.ones((2, w), bool), "dtype bool"),
    "None": (lambda w: None, "dtype object"),
    "a dict": (lambda w: {"x": 1}, "dtype object"),
    "ragged rows": (lambda w: [[1.0] * w, [1.0]], "not one"),
    "a scalar": (lambda w: 3.0, "shape ()"),
    "the wrong width": (lambda w: np.ones((2, w + 1)), f"shape (2, {D_MODEL + 1})"),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_encode_decode_reconstruct_refuse_bad_arrays(tmp_path, name):
    model = api.load(saved(tmp_path / "sae"))
    bad, words = BAD_ARRAYS[name]
    for method, what, width in (("encode", "activations", D_MODEL), ("reconstruct", "activations", D_MODEL),
                                ("decode", "latent codes", D_SAE)):
        with pytest.raises(ValueError) as e:
            getattr(model, method)(bad(width))
        message = str(e.value)
        assert type(e.value) is ValueError and message.startswith(what) and message.endswith("."), message
        assert words.replace(str(D_MODEL + 1), str(width + 1)) in message, message


def test_integer_arrays_and_empty_batches_still_work(tmp_path):
    model = api.load(saved(tmp_path / "sae"))
    x = np.arange(2 * D_MODEL).reshape(2, D_MODEL)
    np.testing.assert_array_equal(model.encode(x), model.encode(x.astype(np.float32)))
    assert model.reconstruct(np.zeros((0, D_MODEL), np.float32)).shape == (0, D_MODEL)


# --------------------------------------------------------------------------- (14) the umask
def file_modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        folder = saved(tmp_path / "run" / "sae")
        saelens.export_workdir(tmp_path / "run", tmp_path / "lens")
        api.import_sae(tmp_path / "lens", tmp_path / "imported")
        ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", 1, 1)
        ckpts.save(1, {"w": jnp.ones(3)}, {"store": {}})
        ckpts.wait()
        ckpts.close()
    finally:
        os.umask(old)
    modes = file_modes(tmp_path)
    for name in (f"run/sae/{sae_folder.WEIGHTS}", f"run/sae/{sae_folder.SPEC}", f"lens/{saelens.SAELENS_WEIGHTS}",
                 f"lens/{saelens.SIDECAR_WEIGHTS}", f"lens/{saelens.SAELENS_CFG}",
                 f"imported/sae/{sae_folder.WEIGHTS}"):
        assert modes[name] == mode, (name, oct(modes[name]))
    assert {m for name, m in modes.items() if name.startswith("ckpt/")} == {mode}
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    shutil.rmtree(tmp_path / "ckpt")

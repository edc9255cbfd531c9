"""Bad input a demanding user tries, through the real CLI (issue 15): one `error:` line naming the
file or key at fault, exit status 2, never a traceback and never a silent exit 0.

Every row runs ``sae-jax`` in a subprocess; ``{store}``, ``{run}``, ``{tmp}`` and ``{demo}`` in its
arguments are filled from module-scoped fixtures (one tiny store, its damaged copies, one 20-step run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.clitools import ROOT, cli_error

DEMO = ROOT / "configs" / "demo.yaml"
TRAIN = ["data.store={store}", "train.workdir={tmp}/rx", "model.d_sae=64", "train.batch_size=256", "train.steps=5",
         "train.progress=false", "train.eval_tokens=1024"]

FILES = {  # name -> bytes of a bad config or input file
    "empty.yaml": b"",
    "list.yaml": b"- a\n- b\n",
    "nonutf.yaml": b"model:\n  d_sae: \xff\xfe\n",
    "section.yaml": b"model: 5\n",
    "dup.yaml": b"model:\n  d_sae: 64\n  d_sae: 128\n",
    "dupsection.yaml": b"train:\n  steps: 3\ntrain:\n  batch_size: 4\n",
    "grid_empty.yaml": b"sweep:\n  grid: {}\n",
    "grid_list.yaml": b"sweep:\n  grid: [1, 2]\n",
    "grid_scalar.yaml": b"sweep:\n  grid:\n    sparsity.coefficient: 0.1\n",
    "grid_steps.yaml": b"sweep:\n  grid:\n    train.steps: [1, 2]\n",
    "garbage.npy": b"garbage",
}

# (store copy, python statement on `m` = its metadata dict, or a file operation)
DAMAGED = {
    "d_model_str": 'm["d_model"] = "16"',
    "n_tokens_str": 'm["n_tokens"] = "lots"',
    "n_tokens_neg": 'm["n_tokens"] = -5',
    "sites_list": 'm["sites"] = ["activations"]',
    "chunk_zero": 'm["rows_per_chunk"] = 0',
    "norm_str": 'm["sites"]["activations"]["norm_scalar"] = "x"',
    "n_tokens_big": 'm["n_tokens"] = 100000',
    "no_d_model": 'del m["d_model"]',
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    from sae_jax.data.synthetic import SynthSpec, write_synthetic

    tmp = tmp_path_factory.mktemp("bad_inputs")
    store = tmp / "store"
    write_synthetic(store, SynthSpec(d_model=16, n_features=48, n_tokens=8192, seed=5, l0=3.0))
    for name, data in FILES.items():
        (tmp / name).write_bytes(data)
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("not a store")
    np.save(tmp / "oned.npy", np.zeros(30, np.float32))
    np.save(tmp / "ints.npy", np.zeros((4, 16), np.int64))
    np.save(tmp / "w8.npy", np.zeros((4, 8), np.float32))
    np.savez(tmp / "z.npz", a=np.ones((4, 16)))
    for name, edit in DAMAGED.items():
        shutil.copytree(store, tmp / name)
        meta_path = tmp / name / "metadata.json"
        m = json.loads(meta_path.read_text())
        exec(edit)  # noqa: S102 - the table's edits
        meta_path.write_text(json.dumps(m))
    shutil.copytree(store, tmp / "no_zarr")
    (tmp / "no_zarr" / "activations" / "zarr.json").unlink()
    shutil.copytree(store, tmp / "truncated")
    shard = tmp / "truncated" / "activations" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:1000])
    return {"tmp": str(tmp), "store": str(store), "demo": str(DEMO)}


@pytest.fixture(scope="module")
def run(paths) -> str:
    """A 20-step run on the tiny store."""
    from tests.clitools import cli

    workdir = Path(paths["tmp"]) / "run"
    done = cli("train", DEMO, f"data.store={paths['store']}", f"train.workdir={workdir}", "model.d_sae=64",
               "train.batch_size=256", "train.steps=20", "train.progress=false", "train.eval_tokens=1024")
    assert done.returncode == 0, done.stderr
    return str(workdir)


def _fill(args, values: dict[str, str]) -> list[str]:
    return [a.format(**values) for a in args]


# (id, arguments, a fragment the one error line must hold); every row exits with status 2
CONFIG_CASES = [
    ("missing-config", ["train", "{tmp}/nothere.yaml"], "config file '{tmp}/nothere.yaml' does not exist"),
    ("config-is-dir", ["train", "{tmp}/adir"], "is a directory"),
    ("empty-yaml", ["train", "{tmp}/empty.yaml"], "config key 'data.store' is empty"),
    ("yaml-list", ["train", "{tmp}/list.yaml"], "must hold a mapping of sections, got list"),
    ("non-utf8", ["train", "{tmp}/nonutf.yaml"], "pass a readable UTF-8 YAML file"),
    ("section-scalar", ["train", "{tmp}/section.yaml"], "config section 'model'"),
    ("duplicate-key", ["train", "{tmp}/dup.yaml"], "at line 3, column 3: key 'd_sae' is given twice"),
    ("duplicate-section", ["train", "{tmp}/dupsection.yaml"], "at line 3, column 1: key 'train' is given twice"),
    ("negative-steps", ["train", "{demo}", *TRAIN, "train.steps=-5"], "'train.steps' must be a positive integer"),
    ("batch-size-0", ["train", "{demo}", *TRAIN, "train.batch_size=0"], "'train.batch_size' must be a positive"),
    ("steps-string", ["train", "{demo}", *TRAIN, "train.steps=abc"], "'train.steps' expects int, got 'abc'"),
    ("steps-float", ["train", "{demo}", *TRAIN, "train.steps=2.5"], "'train.steps' expects int, got 2.5"),
    ("lr-list", ["train", "{demo}", *TRAIN, "optim.lr=[1,2]"], "'optim.lr' expects float"),
    ("lr-nan", ["train", "{demo}", *TRAIN, "optim.lr=.nan"], "'optim.lr' must be a finite number"),
    ("coefficient-inf", ["train", "{demo}", *TRAIN, "sparsity.coefficient=.inf"],
     "'sparsity.coefficient' must be a finite number"),
    ("unknown-architecture", ["train", "{demo}", *TRAIN, "model.architecture=foo"], "'model.architecture' must be"),
    ("k-above-d_sae", ["train", "{demo}", *TRAIN, "model.architecture=topk", "sparsity.penalty=none", "model.k=100"],
     "'model.k' must be in 1..model.d_sae (64)"),
    ("override-no-value", ["train", "{demo}", *TRAIN, "model.d_sae"], "override 'model.d_sae' must look like"),
    ("unknown-key", ["train", "{demo}", *TRAIN, "model.dsae=3"], "did you mean 'model.d_sae'"),
    ("bool-string", ["train", "{demo}", *TRAIN, "train.progress=maybe"], "'train.progress' expects bool"),
    ("holdout-1", ["train", "{demo}", *TRAIN, "data.holdout_fraction=1"], "'data.holdout_fraction' must be in"),
    ("decay-fraction-2", ["train", "{demo}", *TRAIN, "optim.decay_fraction=2"], "'optim.decay_fraction' must be in"),
    ("grad-clip-negative", ["train", "{demo}", *TRAIN, "optim.grad_clip=-1"], "'optim.grad_clip' must be non-neg"),
    ("warmup-negative", ["train", "{demo}", *TRAIN, "optim.warmup_steps=-3"], "'optim.warmup_steps' must be non-neg"),
    ("dead-tokens-negative", ["train", "{demo}", *TRAIN, "train.dead_tokens=-1"], "'train.dead_tokens' must be"),
    ("k_aux-0", ["train", "{demo}", *TRAIN, "model.architecture=topk", "sparsity.penalty=none", "model.k=4",
                 "model.k_aux=0"], "'model.k_aux' must be a positive integer"),
    ("threshold-momentum-2", ["train", "{demo}", *TRAIN, "model.architecture=batchtopk", "sparsity.penalty=none",
                              "model.k=4", "model.threshold_momentum=2"], "'model.threshold_momentum' must be in"),
    ("decoder-norm-negative", ["train", "{demo}", *TRAIN, "model.init_decoder_norm=-1"],
     "'model.init_decoder_norm' must be positive"),
    ("store-missing", ["train", "{demo}", *TRAIN, "data.store={tmp}/nothere"], "{tmp}/nothere: no such store"),
    ("store-is-file", ["train", "{demo}", *TRAIN, "data.store={demo}"], "is a file, not an activation store"),
    ("d_model-mismatch", ["train", "{demo}", *TRAIN, "model.d_model=15"], "the store's d_model is 16"),
    ("unknown-site", ["train", "{demo}", *TRAIN, "data.site=nope"], "no site 'nope'"),
    ("workdir-is-file", ["train", "{demo}", *TRAIN, "train.workdir={demo}"], "'train.workdir'"),
    ("checkpoint-dir-is-file", ["train", "{demo}", *TRAIN, "checkpoint.dir={tmp}/afile/sub"],
     "set config key 'checkpoint.dir' to a directory"),
    ("init-from-missing", ["train", "{demo}", *TRAIN, "model.init_from={tmp}/nothere"], "'model.init_from'"),
    ("train-truncated-shard", ["train", "{demo}", *TRAIN, "data.store={tmp}/truncated"], "sae-jax store verify"),
    ("train-no-zarr-json", ["train", "{demo}", *TRAIN, "data.store={tmp}/no_zarr"], "activations/zarr.json"),
    ("sweep-grid-empty", ["sweep", "{tmp}/grid_empty.yaml", "data.store={store}"], "'sweep.grid' is empty"),
    ("sweep-grid-list", ["sweep", "{tmp}/grid_list.yaml", "data.store={store}"], "must map config keys to lists"),
    ("sweep-grid-scalar", ["sweep", "{tmp}/grid_scalar.yaml", "data.store={store}"],
     "'sweep.sparsity.coefficient' in '{tmp}/grid_scalar.yaml' must be a non-empty list"),
    ("sweep-grid-steps", ["sweep", "{tmp}/grid_steps.yaml", "data.store={store}"], "'train.steps' cannot be swept"),
    ("sweep-value-twice", ["sweep", "{demo}", "data.store={store}", "sweep.sparsity.coefficient=[1,1]"],
     "lists a value twice"),
    ("compile-check-mesh", ["compile-check", "{demo}", "--mesh", "4by2", "model.d_model=16"], "--mesh '4by2'"),
    ("compile-check-mesh-0", ["compile-check", "{demo}", "--mesh", "0x2", "model.d_model=16"], "--mesh '0x2'"),
    ("compile-check-memory-no-unit", ["compile-check", "{demo}", "--device-memory", "16", "model.d_model=16"],
     "--device-memory '16' has no unit"),
    ("compile-check-memory-negative", ["compile-check", "{demo}", "--device-memory", "-5GB", "model.d_model=16"],
     "--device-memory '-5GB'"),
]

STORE_CASES = [
    ("synth-negative-d", ["synth", "{tmp}/s", "--d-model", "-4"], "--d-model must be a positive integer"),
    ("synth-no-tokens", ["synth", "{tmp}/s", "--n-tokens", "0"], "--n-tokens must be a positive integer"),
    ("synth-features-below-d", ["synth", "{tmp}/s", "--d-model", "16", "--n-features", "4"], "--n-features (4)"),
    ("synth-l0-negative", ["synth", "{tmp}/s", "--l0", "-1"], "--l0"),
    ("synth-l0-above-features", ["synth", "{tmp}/s", "--n-features", "8", "--d-model", "4", "--l0", "100"], "--l0"),
    ("synth-l0-nan", ["synth", "{tmp}/s", "--l0", "nan"], "--l0"),
    ("synth-seed-negative", ["synth", "{tmp}/s", "--seed", "-1"], "--seed must be a non-negative integer"),
    ("synth-empty-out", ["synth", ""], "the store path is empty"),
    ("synth-out-is-file", ["synth", "{tmp}/afile"], "{tmp}/afile: already exists and is not an activation store"),
    ("synth-over-store", ["synth", "{store}"], "a store already exists there"),
    ("import-missing", ["store", "import", "{tmp}/i", "--from", "{tmp}/nothere.npy"], "nothere.npy: no such file"),
    ("import-dir", ["store", "import", "{tmp}/i", "--from", "{tmp}/adir"], "{tmp}/adir: is a directory"),
    ("import-1d", ["store", "import", "{tmp}/i", "--from", "{tmp}/oned.npy"], "oned.npy: the array has shape (30,)"),
    ("import-ints", ["store", "import", "{tmp}/i", "--from", "{tmp}/ints.npy"], "unsupported dtype int64"),
    ("import-two-widths", ["store", "import", "{tmp}/i", "--from", "{store}/ground_truth.npy", "{tmp}/w8.npy"],
     "w8.npy: rows have shape (4, 8)"),
    ("import-npz", ["store", "import", "{tmp}/i", "--from", "{tmp}/z.npz"], "unsupported file type '.npz'"),
    ("import-garbage", ["store", "import", "{tmp}/i", "--from", "{tmp}/garbage.npy"], "not a valid .npy"),
    ("info-empty-path", ["store", "info", ""], "the store path is empty"),
    ("info-file", ["store", "info", "{tmp}/afile"], "{tmp}/afile: is a file"),
    ("info-dir", ["store", "info", "{tmp}/adir"], "{tmp}/adir/metadata.json: missing"),
    ("info-d_model-string", ["store", "info", "{tmp}/d_model_str"], "field 'd_model' must be a positive integer"),
    ("info-n_tokens-string", ["store", "info", "{tmp}/n_tokens_str"], "field 'n_tokens' must be a positive integer"),
    ("verify-n_tokens-negative", ["store", "verify", "{tmp}/n_tokens_neg"], "n_tokens_neg/metadata.json: field "
                                                                            "'n_tokens'"),
    ("info-sites-list", ["store", "info", "{tmp}/sites_list"], "field 'sites' must be a mapping"),
    ("info-rows_per_chunk-0", ["store", "info", "{tmp}/chunk_zero"], "field 'rows_per_chunk' must be a positive"),
    ("info-norm-string", ["store", "info", "{tmp}/norm_str"], "field 'sites.activations.norm_scalar' must be a number"),
    ("info-checksums-short", ["store", "info", "{tmp}/n_tokens_big"], "must be a list of 4 checksum string(s), one "
                                                                     "per shard, got a list of 1"),
    ("verify-no-d_model", ["store", "verify", "{tmp}/no_d_model"], "missing field(s) ['d_model']"),
    ("report-no-runs", ["report", "{tmp}/adir"], "'{tmp}/adir' holds no finished run"),
    ("export-no-sae", ["export", "{tmp}/adir", "--out", "{tmp}/ex"], "'{tmp}/adir' holds no trained SAE"),
    ("import-no-sae", ["import", "{tmp}/adir", "--out", "{tmp}/im"], "'{tmp}/adir' holds no trained SAE"),
    ("import-npz-wrong-arrays", ["import", "{tmp}/z.npz", "--out", "{tmp}/im"], "'{tmp}/z.npz' lacks W_enc"),
    ("eval-missing-run", ["eval", "{tmp}/nothere", "--data", "{store}"], "'{tmp}/nothere' does not exist"),
]

RUN_CASES = [
    ("eval-batch-size-0", ["eval", "{run}", "--data", "{store}", "--batch-size", "0"], "--batch-size"),
    ("eval-max-tokens-negative", ["eval", "{run}", "--data", "{store}", "--max-tokens", "-5"], "--max-tokens"),
    ("eval-truncated-store", ["eval", "{run}", "--data", "{tmp}/truncated"], "sae-jax store verify"),
    ("eval-store-is-file", ["eval", "{run}", "--data", "{tmp}/afile"], "{tmp}/afile: is a file"),
    ("eval-ground-truth-garbage", ["eval", "{run}", "--data", "{store}", "--ground-truth", "{tmp}/garbage.npy"],
     "--ground-truth file '{tmp}/garbage.npy'"),
    ("train-init-from-other-d_sae", ["train", "{demo}", *TRAIN, "model.init_from={run}", "model.d_sae=32"],
     "'model.d_sae' is 32, but model.init_from"),
]


def _check(args, fragment, values):
    message = cli_error(*_fill(args, values), status=2, cwd=values["tmp"])
    assert fragment.format(**values) in message, message


@pytest.mark.parametrize("args,fragment", [c[1:] for c in CONFIG_CASES + STORE_CASES],
                         ids=[c[0] for c in CONFIG_CASES + STORE_CASES])
def test_bad_input(paths, args, fragment):
    _check(args, fragment, paths)


@pytest.mark.parametrize("args,fragment", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_bad_input_with_run(paths, run, args, fragment):
    _check(args, fragment, paths | {"run": run})


def test_rejected_inputs_wrote_nothing(paths):
    """After the table: no refused command left a store, a partial store or a work directory behind."""
    tmp = Path(paths["tmp"])
    left = [p.name for p in tmp.iterdir() if p.name in ("s", "s.partial", "i", "i.partial", "ex", "im", "rx")]
    assert not left or left == ["rx"] and not (tmp / "rx" / "summary.json").exists(), left

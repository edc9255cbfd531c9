"""Export to SAELens folders, import from SAELens and Gemma Scope, the Python API, init_from.

SAEs are built from the registry (make_sae + init) with biases, thresholds and decoder norms
moved off their init values so every mapping is exercised; one is trained on the small store.
The SAELens test runs where sae-lens is installed (the `saelens` extra) and skips otherwise.
"""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import api, cli
from sae_jax import config as config_lib
from sae_jax.data import pipeline
from sae_jax.eval.store import evaluate
from sae_jax.io import sae_folder, saelens
from sae_jax.models import make_sae
from sae_jax.train import loop
from sae_jax.train.init_from import initial_params

D_SAE = 64
CASES = {
    "relu": [],
    "relu_decoder_norm": ["sparsity.penalty=l1_decoder_norm"],
    "gated": ["model.architecture=gated"],
    "gated_decoder_norm": ["model.architecture=gated", "sparsity.penalty=l1_decoder_norm"],
    "jumprelu": ["model.architecture=jumprelu"],
    "jumprelu_raw": ["model.architecture=jumprelu", "model.jumprelu_theta_param=raw"],
    "prolu": ["model.architecture=prolu"],
    "topk": ["model.architecture=topk", "model.k=6"],
    "batchtopk": ["model.architecture=batchtopk", "model.k=6"],
    "matryoshka": ["model.architecture=matryoshka", "model.k=6"],
}


def _rows(store, n=2048):
    return np.asarray(store.read(0, n), np.float32)


def _make(case, x, seed=0):
    """(sae, params, stats) of one case, with non-trivial biases, thresholds and norms."""
    cfg = config_lib.load_config(None, [f"model.d_model={x.shape[1]}", f"model.d_sae={D_SAE}", *CASES[case]])
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(v) for k, v in sae.init_params(jax.random.key(seed), jnp.asarray(x)).items()}
    pre = (x - p["b_dec"] * sae.apply_b_dec_to_input) @ p["W_enc"]
    q = np.quantile(pre, 0.7, axis=0)
    spread = np.std(pre, axis=0)
    for b in ("b_enc", "b_gate", "b_mag"):
        if b in p:  # about 30% firing; both signs (ProLU's b > 0 has no SAELens form)
            p[b] = (-q + rng.normal(size=D_SAE) * spread).astype(np.float32)
    if "r_mag" in p:
        p["r_mag"] = (rng.normal(size=D_SAE) * 0.1).astype(np.float32)
    if "log_threshold" in p:
        theta = np.abs(q) + 0.1 * spread
        p["log_threshold"] = (np.log(theta) if sae.theta_param == "log" else theta).astype(np.float32)
    if sae.penalty == "l1_decoder_norm":
        p["W_dec"] = (p["W_dec"] * rng.uniform(0.05, 2.0, size=(D_SAE, 1))).astype(np.float32)
    stats = {k: np.asarray(v) for k, v in sae.init_stats().items()}
    stats["tokens_since_fired"] = rng.integers(0, 10_000, D_SAE).astype(np.int32)
    if "threshold" in stats:
        stats["threshold"] = np.float32(np.quantile(np.maximum(pre, 0), 0.9))
    return sae, p, stats


def _saved(case, store, root):
    """A work directory holding one case's SAE; returns its loaded TrainedSAE."""
    sae, p, stats = _make(case, _rows(store))
    api.save(root / "run" / sae_folder.SAE_DIR, sae, p, stats, {"norm_scale": 1.0, "case": case})
    return api.load(root / "run")


def _bits(tree):
    return {k: (np.asarray(v).dtype, np.asarray(v).shape, np.asarray(v).tobytes()) for k, v in tree.items()}


def _eval(model, store):
    return evaluate(model, pipeline.iter_eval(store, batch_size=1024, split="all", max_tokens=4096))


def _norm_factor(model):
    """Feature scale of an exported SAE relative to ours: decoder norms where they were folded."""
    if model.sae.penalty != "l1_decoder_norm":
        return 1.0
    return np.linalg.norm(np.asarray(model.params["W_dec"], np.float64), axis=1)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(case, small_store, tmp_path):
    model = _saved(case, small_store, tmp_path)
    [exported] = saelens.export_workdir(tmp_path / "run", tmp_path / "saelens")
    assert {p.name for p in exported.path.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sae_jax.json",
                                                         "sae_jax.safetensors"}
    folder, _ = api.import_sae(exported.path, tmp_path / "imported")
    back = api.load(tmp_path / "imported")
    assert back.sae.spec() == model.sae.spec()
    assert _bits(back.params) == _bits(model.params) and _bits(back.stats) == _bits(model.stats)
    assert _eval(back, small_store) == _eval(model, small_store)
    # The written config rebuilds the same architecture and points train at the import.
    cfg = config_lib.load_config(tmp_path / "imported" / "config.yaml")
    assert make_sae(cfg.model, cfg.sparsity.penalty, cfg.train.dead_tokens).spec() == model.sae.spec()
    assert cfg.model.init_from == str(folder.resolve())

    # The SAELens files alone (no sidecar) give the same SAE by SAELens's semantics.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(exported.path / name, plain / name)
    other = api.load(plain)
    x = _rows(small_store, 1024)
    np.testing.assert_allclose(other.encode(x), model.encode(x) * _norm_factor(model), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other.reconstruct(x), model.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_loads_every_exported_architecture(case, small_store, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install 'sae_jax[saelens]')")
    torch = pytest.importorskip("torch", reason="torch is not installed (needed by sae-lens)")
    model = _saved(case, small_store, tmp_path)
    [exported] = saelens.export_workdir(tmp_path / "run", tmp_path / "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(exported.path))
    assert type(theirs).__name__ == {"relu": "StandardSAE", "gated": "GatedSAE", "topk": "TopKSAE"}.get(
        model.sae.name, "JumpReLUSAE")
    x = _rows(small_store, 1024)
    with torch.no_grad():
        f = theirs.encode(torch.from_numpy(x))
        x_hat = theirs.decode(f).numpy()
    f = f.numpy()
    ours = model.encode(x) * _norm_factor(model)
    assert np.array_equal(f != 0, ours != 0)
    np.testing.assert_allclose(f, ours, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat, model.reconstruct(x), rtol=1e-5, atol=1e-5)


def _gemma_scope_npz(path, d, m, x, seed=3):
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(m, d)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = (W_dec.T * rng.uniform(0.5, 1.5, size=m)).astype(np.float32)
    b_enc = (rng.normal(size=m) * 0.1).astype(np.float32)
    pre = x @ W_enc + b_enc
    threshold = np.maximum(np.quantile(pre, 0.8, axis=0), 1e-3).astype(np.float32)
    b_dec = x.mean(0).astype(np.float32)
    arrays = dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    np.savez(path, **arrays)
    return arrays


def test_gemma_scope_import_eval_and_errors(small_store, tmp_path, capsys):
    x = _rows(small_store)
    a = _gemma_scope_npz(tmp_path / "params.npz", x.shape[1], D_SAE, x)
    model = api.load(tmp_path / "params.npz")
    assert model.sae.name == "jumprelu" and not model.sae.apply_b_dec_to_input
    pre = x @ a["W_enc"] + a["b_enc"]  # Gemma Scope: no b_dec subtraction, f = pre * H(pre - threshold)
    f = pre * (pre > a["threshold"])
    np.testing.assert_allclose(model.encode(x), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.reconstruct(x), f @ a["W_dec"] + a["b_dec"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.params["log_threshold"]), a["threshold"])  # raw: bit-exact

    out = tmp_path / "gs"
    assert cli.main(["import", str(tmp_path / "params.npz"), "--out", str(out)]) == 0
    assert "continue training" in capsys.readouterr().out
    result_file = tmp_path / "eval.json"
    assert cli.main(["eval", str(out), "--data", str(small_store.path), "--max-tokens", "2048",
                     "--json", str(result_file)]) == 0
    fvu = np.sum((x - (f @ a["W_dec"] + a["b_dec"])) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert json.loads(result_file.read_text())["fvu"] == pytest.approx(fvu, rel=1e-4)
    # Import refuses to overwrite; a file lacking a documented key is a one-line error naming it.
    assert cli.main(["import", str(tmp_path / "params.npz"), "--out", str(out)]) == cli.EXIT_USER_ERROR
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in a.items() if k != "threshold"})
    assert cli.main(["import", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "bad")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "threshold" in err


def test_trained_export_import_continues_training(small_store, tmp_path, capsys):
    base = [f"data.store={small_store.path}", "model.architecture=jumprelu", f"model.d_sae={D_SAE}",
            "train.batch_size=256", "train.log_every=20", "train.progress=false", "train.eval_tokens=2048"]
    first = loop.train(config_lib.load_config(None, [*base, "train.steps=40", f"train.workdir={tmp_path / 'a'}"]))
    assert cli.main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "e"), "--hook-name", "blocks.0.hook"]) == 0
    cfg_json = json.loads((tmp_path / "e" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["metadata"]["hook_name"] == "blocks.0.hook"
    assert cli.main(["import", str(tmp_path / "e"), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    trained, imported = api.load(tmp_path / "a"), api.load(tmp_path / "b")
    assert _bits(imported.params) == _bits(trained.params)

    # init_from: the state starts at the imported SAE, un-folded to the training scale.
    cfg = config_lib.load_config(tmp_path / "b" / "config.yaml", [
        *base, "train.steps=5", "optim.lr=1e-9", f"train.workdir={tmp_path / 'c'}"])
    run = loop.prepare(cfg)
    state = loop.init_train_state(run)
    folded, _ = run.sae.fold_scale(jax.device_get(state.params), jax.device_get(state.stats), run.scale)
    for k, v in trained.params.items():
        np.testing.assert_allclose(folded[k], v, rtol=1e-6, atol=1e-7)
    again = loop.train(cfg)
    assert again["fvu"] == pytest.approx(first["fvu"], abs=0.01) and again["l0"] == pytest.approx(first["l0"], rel=0.05)

    wrong = config_lib.load_config(None, [f"model.d_model={run.sae.d_model}", "model.d_sae=32",
                                          "model.architecture=jumprelu"])
    with pytest.raises(config_lib.ConfigError, match="d_sae"):
        initial_params(tmp_path / "b", make_sae(wrong.model, wrong.sparsity.penalty), 1.0)


def test_api_members_arrays_and_foreign_folders(small_store, tmp_path):
    x = _rows(small_store, 256)
    for i, case in enumerate(("relu", "topk")):
        sae, p, stats = _make(case, x, seed=i)
        api.save(tmp_path / "sweep" / "members" / case / sae_folder.SAE_DIR, sae, p, stats)
    with pytest.raises(ValueError, match="members/relu"):
        api.load(tmp_path / "sweep")
    topk = api.load(tmp_path / "sweep", member="topk")
    assert topk.sae.name == "topk"
    # numpy in, numpy out; jax in, jax out; any leading shape.
    f = topk.encode(x.reshape(4, 64, -1))
    assert isinstance(f, np.ndarray) and f.shape == (4, 64, D_SAE) and np.all((f != 0).sum(-1) <= 6)
    assert isinstance(topk.reconstruct(jnp.asarray(x)), jax.Array)
    np.testing.assert_allclose(topk.decode(f).reshape(256, -1), topk.reconstruct(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="d_model"):
        topk.encode(x[:, :5])

    # A sweep exports one folder per member; the API loads them by name.
    results = saelens.export_workdir(tmp_path / "sweep", tmp_path / "out")
    assert sorted(r.path.relative_to(tmp_path / "out").as_posix() for r in results) == ["members/relu", "members/topk"]
    np.testing.assert_array_equal(api.load(tmp_path / "out", member="topk").encode(x), topk.encode(x))

    # Edited SAELens weights: the sidecar is ignored (with a warning), SAELens semantics apply.
    folder = tmp_path / "out" / "members" / "relu"
    from safetensors.numpy import load_file, save_file
    weights = load_file(str(folder / saelens.SAELENS_WEIGHTS))
    save_file({**weights, "b_enc": weights["b_enc"] + 1}, str(folder / saelens.SAELENS_WEIGHTS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edited = api.load(folder)
    assert any("changed since sae_jax exported it" in str(w.message) for w in caught)
    np.testing.assert_array_equal(np.asarray(edited.params["b_enc"]), weights["b_enc"] + 1)
    cfg = json.loads((folder / saelens.SAELENS_CFG).read_text())
    (folder / saelens.SAELENS_CFG).write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(ValueError, match="transcoder"):
        saelens.load_saelens(folder)

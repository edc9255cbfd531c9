"""The architecture zoo on synthetic ground-truth data: recovery, sparsity control, TopK and
BatchTopK exactness, normalization folding, and one interface under vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import metrics
from sae_jax.config import load_config, with_d_model
from sae_jax.data.synthetic import SynthSpec, generate, ground_truth
from sae_jax.models import activations as act
from sae_jax.models.sae import REGISTRY, make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state

SPEC = SynthSpec(d_model=32, n_features=96, n_tokens=131072, seed=1, l0=4.0)
TRAIN_ROWS = 120_000
# Settings per architecture for a 2000-step run (the recipe's defaults plus a coefficient or k
# that suits 4 true features per token), and a sparser setting for the monotonicity check.
SETTINGS = {
    "relu": (["sparsity.coefficient=0.3"], ["sparsity.coefficient=0.1"]),
    "gated": (["sparsity.coefficient=0.8"], ["sparsity.coefficient=0.2"]),
    "jumprelu": (["sparsity.coefficient=0.1", "model.jumprelu_theta_init=0.05"],
                 ["sparsity.coefficient=0.01", "model.jumprelu_theta_init=0.05"]),
    "topk": (["model.k=4"], ["model.k=12"]),
    "batchtopk": (["model.k=4"], ["model.k=12"]),
    "prolu": (["sparsity.coefficient=0.2"], ["sparsity.coefficient=0.05"]),
}


@functools.cache
def data():
    x = np.concatenate(list(generate(SPEC)))
    return x, ground_truth(SPEC), float(1 / np.sqrt(np.mean(np.sum(x[:TRAIN_ROWS] ** 2, axis=1))))


def train(arch, overrides, steps=2000):
    """Train with the library's step on in-memory batches; return (sae, raw params, stats)."""
    x, _, scale = data()
    cfg = load_config(None, [f"model.architecture={arch}", "model.d_sae=192", f"train.steps={steps}",
                             "train.batch_size=512", "optim.lr=3e-3", "optim.decay=linear", *overrides])
    cfg = with_d_model(cfg, SPEC.d_model)
    sae = make_sae(cfg.model, cfg.sparsity.penalty, dead_tokens=100_000)
    o = cfg.optim
    tx = step_lib.optimizer(o.beta1, o.beta2, o.grad_clip)
    step = jax.jit(step_lib.make_train_step(
        sae, tx, step_lib.lr_factor(o.warmup_steps, steps, o.decay), step_lib.coefficient_factor(
            cfg.sparsity.warmup_steps), scale), donate_argnums=0)
    state = init_state(sae, tx, jax.random.key(0), jnp.asarray(x[:4096] * scale), o.lr, cfg.sparsity.coefficient)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        state, _ = step(state, jnp.asarray(x[rng.integers(0, TRAIN_ROWS, 512)]))
    params, stats = sae.fold_scale(state.params, state.stats, scale)
    return sae, params, stats


def held_out(sae, params, stats):
    x, g, _ = data()
    xe = jnp.asarray(x[TRAIN_ROWS:])
    f = sae.encode(params, xe, stats)
    out = {"l0": float(metrics.l0(f)), "fvu": float(metrics.fvu(xe, sae.decode(params, f)))}
    return out | metrics.mmcs(np.asarray(params["W_dec"]), g), f


@pytest.mark.parametrize("arch", sorted(SETTINGS))
def test_recovers_features_and_sparsity_follows_its_knob(arch):
    main, sparser_or_denser = SETTINGS[arch]
    result, _ = held_out(*train(arch, main))
    assert result["mmcs"] >= 0.8, result
    other, _ = held_out(*train(arch, sparser_or_denser, steps=800))
    short, _ = held_out(*train(arch, main, steps=800))
    # A lower coefficient (or a larger k) gives a larger L0, at the same training length.
    assert other["l0"] > short["l0"], (other, short)


def test_topk_keeps_at_most_k_and_exactly_k_where_positive():
    sae, params, stats = train("topk", ["model.k=4"], steps=300)
    x, _, _ = data()
    xe = jnp.asarray(x[TRAIN_ROWS:TRAIN_ROWS + 2048])
    f = np.asarray(sae.encode(params, xe, stats))
    active = (f != 0).sum(axis=1)
    positive = (np.asarray(sae.pre_acts(params, xe)) > 0).sum(axis=1)
    assert active.max() <= 4
    assert np.array_equal(active, np.minimum(positive, 4))


def test_batchtopk_averages_k_and_its_threshold_reproduces_it():
    sae, params, stats = train("batchtopk", ["model.k=4"])
    x, _, _ = data()
    # Training forward: k per token on average over the batch.
    out = sae.forward(params, jnp.asarray(x[:512]), stats)
    assert float(metrics.l0(out.f)) == pytest.approx(4.0, abs=1e-6)
    # Inference with the tracked threshold: within 10% of k on held-out tokens.
    result, _ = held_out(sae, params, stats)
    assert abs(result["l0"] - 4.0) / 4.0 < 0.10, result


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_decode_agree_in_values_and_gradients(arch):
    d, m, k, b = 16, 64, 5, 24
    sae = REGISTRY[arch](d_model=d, d_sae=m, k=k, penalty="none", aux_coefficient=0.0)
    params = sae.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (b, d))
    stats = sae.init_stats()

    def sparse_loss(p):
        return sae.forward(p, x, stats).recon

    def dense_loss(p):
        f = sae.forward(p, x, stats).f  # the kept code, then a dense B x m x d decode
        mask = jax.lax.stop_gradient(f != 0)
        pre = sae.pre_acts(p, x)
        x_hat = jnp.where(mask, jax.nn.relu(pre), 0.0) @ p["W_dec"] + p["b_dec"]
        return jnp.sum(jnp.square(x - x_hat)) / jnp.sum(jnp.square(x - x.mean(0)))

    np.testing.assert_allclose(sparse_loss(params), dense_loss(params), rtol=1e-5)
    gs, gd = jax.grad(sparse_loss)(params), jax.grad(dense_loss)(params)
    for name in gs:
        np.testing.assert_allclose(gs[name], gd[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_fold_scale_gives_raw_space_reconstruction(arch):
    cfg = with_d_model(load_config(None, [f"model.architecture={arch}", "model.d_sae=48", "model.k=4"]), 16)
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    params = sae.init(jax.random.key(0), jax.random.normal(jax.random.key(2), (64, 16)))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
    stats = sae.init_stats()
    if "threshold" in stats:
        stats = dict(stats, threshold=jnp.asarray(0.05))
    x = jax.random.normal(jax.random.key(4), (32, 16)) * 3.0
    scale = 0.25
    x_hat_n = sae.decode(params, sae.encode(params, x * scale, stats))
    raw_p, raw_s = sae.fold_scale(params, stats, scale)
    x_hat_raw = sae.decode(raw_p, sae.encode(raw_p, x, raw_s))
    np.testing.assert_allclose(x_hat_raw, x_hat_n / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_architecture_vmaps_over_stacked_params(arch):
    cfg = with_d_model(load_config(None, [f"model.architecture={arch}", "model.d_sae=32", "model.k=4"]), 8)
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    keys = jax.random.split(jax.random.key(0), 2)
    stacked = jax.vmap(lambda k: sae.init(k))(keys)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    stats = sae.init_stats()
    loss = jax.vmap(lambda p: sae.loss(p, x, 0.1, stats)[0])(stacked)
    one = [sae.loss(jax.tree.map(lambda a, i=i: a[i], stacked), x, 0.1, stats)[0] for i in range(2)]
    np.testing.assert_allclose(loss, np.array(one), rtol=1e-5)


def test_topk_select_is_relu_of_topk():
    pre = jnp.array([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 1.0]])
    values, idx = act.topk_select(pre, 2)
    assert values.tolist() == [[3.0, 2.0], [1.0, 0.0]] and idx[0].tolist() == [0, 2]

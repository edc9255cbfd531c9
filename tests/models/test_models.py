"""The architecture zoo on synthetic ground-truth data and at the level of one SAE.

Recovery (MMCS >= 0.8) with each recipe's defaults, the sparsity knob, TopK/BatchTopK
exactness and the BatchTopK inference threshold, sparse and dense TopK paths equal in values
and gradients (AuxK included), the cheap b_dec gradient, gated's frozen aux decoder, ProLU's
sqrt(L1), normalization folding, vmap over stacked parameters, and the compiled step's
matmuls. Training runs use the library's step in a jitted scan over in-memory batches,
vmapped over the sparsity coefficient as the sweep does.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sae_jax.config import RECIPES, ConfigError, load_config, with_d_model
from sae_jax.data.synthetic import SynthSpec, generate, ground_truth
from sae_jax.eval import metrics
from sae_jax.models import activations as act
from sae_jax.models import make_sae, registry
from sae_jax.models.sae import normalized_mse
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state

ARCHS = sorted(registry())
SPEC = SynthSpec(d_model=32, n_features=96, n_tokens=131072, seed=1, l0=4.0)
TRAIN_ROWS = 120_000
STEPS, BATCH = 3000, 512
# A short run (1.5M tokens): the recipe's coefficients, a higher lr than the recipes' 1e-3 (which
# needs ~8M tokens here), a dead window of 200 steps so AuxK runs. k is the one setting that names a
# property of the data (4 true features per token); the recipes' k = 32 suits LM activations.
RUN = ("model.d_sae=192", f"train.steps={STEPS}", f"train.batch_size={BATCH}", "optim.lr=3e-3", "optim.decay=linear",
       "train.dead_tokens=100000")


@functools.cache
def data():
    """Synthetic activations, ground truth and the normalization scale (E||x||^2 = 1)."""
    x = np.concatenate(list(generate(SPEC)))
    return x, ground_truth(SPEC), float(1 / np.sqrt(np.mean(np.sum(x[:TRAIN_ROWS] ** 2, axis=1))))


def configure(arch, *overrides, d_model=SPEC.d_model):
    cfg = with_d_model(load_config(None, [f"model.architecture={arch}", *overrides]), d_model)
    return cfg, make_sae(cfg.model, cfg.sparsity.penalty, cfg.train.dead_tokens)


@functools.cache
def trained(arch, overrides=(), coefficients=None):
    """Train one SAE per coefficient (vmapped); returns (sae, [(raw params, raw stats)])."""
    x, _, scale = data()
    cfg, sae = configure(arch, *RUN, *overrides)
    o = cfg.optim
    tx = step_lib.optimizer(o.beta1, o.beta2, o.grad_clip)
    step = step_lib.make_train_step(sae, tx, step_lib.lr_factor(o.warmup_steps, STEPS, o.decay, o.decay_fraction),
                                    step_lib.coefficient_factor(cfg.sparsity.warmup_steps), scale)
    rows = jnp.asarray(x[:TRAIN_ROWS])

    def one(coefficient):
        state = init_state(sae, tx, jax.random.key(0), rows[:4096] * scale, o.lr, coefficient)

        def body(state, key):
            return step(state, rows[jax.random.randint(key, (BATCH,), 0, TRAIN_ROWS)])[0], None

        return jax.lax.scan(body, state, jax.random.split(jax.random.key(1), STEPS))[0]

    coefficients = coefficients or (cfg.sparsity.coefficient,)
    states = jax.jit(jax.vmap(one))(jnp.asarray(coefficients, jnp.float32))
    members = [jax.tree.map(lambda a, i=i: a[i], states) for i in range(len(coefficients))]
    return sae, [sae.fold_scale(s.params, s.stats, scale) for s in members]


def held_out(sae, params, stats):
    x, g, _ = data()
    xe = jnp.asarray(x[TRAIN_ROWS:])
    bound = sae.bind(params, stats)
    f = bound.encode(xe)
    out = {"l0": float(metrics.l0(f)), "fvu": float(metrics.fvu(xe, bound.decode(f)))}
    return out | metrics.mmcs(np.asarray(params["W_dec"]), g)


# --------------------------------------------------------------------------- on ground truth
@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_recovers_features_and_sparsity_follows_its_knob(arch):
    if arch in ("topk", "batchtopk", "matryoshka"):
        sae, [main] = trained(arch, ("model.k=4",))
        _, [denser] = trained(arch, ("model.k=8",))
        result, other = held_out(sae, *main), held_out(sae, *denser)
        assert other["l0"] > result["l0"], (other, result)  # a larger k, a larger L0
    else:
        c = RECIPES[arch]["coefficient"]
        sae, (main, sparser) = trained(arch, (), (c, 3 * c))
        result, other = held_out(sae, *main), held_out(sae, *sparser)
        assert other["l0"] < result["l0"], (other, result)  # a larger coefficient, a smaller L0
    assert result["mmcs"] >= 0.8 and result["fvu"] < 0.3, result


def test_matryoshka_prefixes_reconstruct_on_their_own():
    """The nested losses make the first latents a usable SAE by themselves, unlike BatchTopK's."""
    x, _, _ = data()
    xe = jnp.asarray(x[TRAIN_ROWS:])

    def prefix_fvu(arch):
        sae, [(params, stats)] = trained(arch, ("model.k=4",))
        bound = sae.bind(params, stats)
        f = bound.encode(xe)
        first = sae.widths[0] if arch == "matryoshka" else 12
        return float(metrics.fvu(xe, bound.decode(f * (jnp.arange(sae.d_sae) < first))))

    _, sae = configure("matryoshka", *RUN)
    assert sae.widths == (12, 24, 48, 96, 192)  # the default: d_sae/16 ... d_sae
    nested, flat = prefix_fvu("matryoshka"), prefix_fvu("batchtopk")
    assert nested < 0.75 * flat, (nested, flat)


def test_matryoshka_widths_are_checked():
    with pytest.raises(ConfigError, match="model.matryoshka_widths.*ending with model.d_sae"):
        load_config(None, ["model.architecture=matryoshka", "model.d_sae=64", "model.matryoshka_widths=[8,4,64]"])
    with pytest.raises(ConfigError, match="model.matryoshka_widths"):
        load_config(None, ["model.architecture=matryoshka", "model.d_sae=64", "model.matryoshka_widths=[8,32]"])
    cfg = load_config(None, ["model.architecture=matryoshka", "model.d_sae=64", "model.matryoshka_widths=[8,32,64]"])
    assert make_sae(cfg.model, cfg.sparsity.penalty).widths == (8, 32, 64)


def test_topk_keeps_at_most_k_and_exactly_k_where_positive():
    sae, [(params, stats)] = trained("topk", ("model.k=4",))
    x, _, _ = data()
    xe = jnp.asarray(x[TRAIN_ROWS:])
    bound = sae.bind(params, stats)
    f = np.asarray(bound.encode(xe))
    active = (f != 0).sum(axis=1)
    positive = (np.asarray(bound.pre_acts(xe)) > 0).sum(axis=1)
    assert active.max() <= 4 and np.array_equal(active, np.minimum(positive, 4))
    # The training forward keeps the same latents as inference.
    out = bound.forward(xe[:512])
    np.testing.assert_array_equal(np.asarray(out.f) != 0, f[:512] != 0)


def test_batchtopk_averages_k_and_its_threshold_reproduces_it():
    sae, [(params, stats)] = trained("batchtopk", ("model.k=4",))
    x, _, _ = data()
    out = sae.bind(params, stats).forward(jnp.asarray(x[:BATCH]))
    assert float(metrics.l0(out.f)) == 4.0  # exactly k·B kept over the batch
    per_token = np.asarray((out.f != 0).sum(axis=1))
    assert per_token.min() != per_token.max()  # ... spread unevenly over the tokens
    result = held_out(sae, params, stats)  # inference: ReLU(pre) > the tracked threshold
    assert abs(result["l0"] - 4.0) / 4.0 < 0.10, result


# --------------------------------------------------------------------------- one SAE, exact
@pytest.mark.parametrize("skew", [1.0, 50.0])
def test_batchtopk_code_selects_what_batch_topk_select_does(skew):
    """Per-row candidates give the whole batch's top k·B; a row holding more than its candidates
    (one row scaled up: skew 50) takes the full selection instead. Both equal the reference."""
    pre = jax.random.normal(jax.random.key(0), (32, 96)).at[3].multiply(skew)
    pre = pre.at[5, :8].set(pre[5, 0])  # ties
    for k in (3, 2.5):
        code = jax.jit(act.batch_topk_code, static_argnums=1)(pre, k)
        dense, _ = act.batch_topk_select(pre, k)
        np.testing.assert_array_equal(act.densify_code(code, 32, 96), dense)
        flat = np.asarray(code.rows * 96 + code.cols).reshape(-1)[: int(k * 32)]
        assert (np.diff(flat) > 0).all()  # row-major, no repeats
    if skew > 1:
        assert int((dense[3] > 0).sum()) > act.ROW_CANDIDATES * 3  # the fallback really ran


def small(arch, *overrides, d=16, m=64):
    _, sae = configure(arch, f"model.d_sae={m}", "model.k=5", "train.dead_tokens=10", *overrides, d_model=d)
    params = sae.init_params(jax.random.key(0), jax.random.normal(jax.random.key(5), (64, d)))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
    return sae, params


def half_dead(sae):
    return {"tokens_since_fired": jnp.where(jnp.arange(sae.d_sae) % 2 == 0, 10**6, 0).astype(jnp.int32)}


def dense_topk_loss(sae, params, x, stats):
    """TopK's loss with a dense B·m·d decode and autodiff through the dense pre-activations."""
    pre = (x - params["b_dec"] * sae.apply_b_dec_to_input) @ params["W_enc"] + params["b_enc"]
    if sae.batch_select:
        kept, _ = act.batch_topk_select(pre, sae.k)
    else:
        kept = act.densify(*act.topk_select(pre, sae.k), sae.d_sae)
    f = jnp.where(jax.lax.stop_gradient(kept != 0), jax.nn.relu(pre), 0.0)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    widths = getattr(sae, "widths", (sae.d_sae,))  # Matryoshka: every nested prefix reconstructs
    recon = sum(normalized_mse(x, (f * (jnp.arange(sae.d_sae) < w)) @ params["W_dec"] + params["b_dec"])
                for w in widths)
    dead = sae.dead_mask(stats)
    aux_kept = act.densify(*act.topk_select(jnp.where(dead, pre, -jnp.inf), sae.k_aux), sae.d_sae)
    e_hat = jnp.where(jax.lax.stop_gradient(aux_kept != 0), jax.nn.relu(pre), 0.0) @ params["W_dec"]
    aux = sae.aux_coefficient * normalized_mse(jax.lax.stop_gradient(x - x_hat), e_hat)
    return recon + jnp.where(jnp.any(dead), aux, 0.0)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead", [False, True])
def test_sparse_paths_equal_the_dense_model_in_values_and_gradients(arch, dead):
    sae, params = small(arch, "model.k_aux=6")
    stats = dict(sae.init_stats(), **(half_dead(sae) if dead else {}))
    x = jax.random.normal(jax.random.key(1), (24, 16)) + 0.3

    def sparse_loss(p):
        return sae.loss(p, x, 0.0, stats)[0]

    loss, grads = jax.jit(jax.value_and_grad(sparse_loss))(params)
    ref, ref_grads = jax.value_and_grad(lambda p: dense_topk_loss(sae, p, x, stats))(params)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for name in grads:
        scale = float(jnp.abs(ref_grads[name]).max())
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    if dead:  # AuxK trains encoder columns of dead latents
        assert float(jnp.abs(grads["W_enc"][:, ::2]).max()) > 0


def test_sparse_encode_gradients_include_the_input():
    """x's cotangent (dropped by XLA in the training step) is exact where asked for."""
    sae, params = small("topk")
    x = jax.random.normal(jax.random.key(1), (8, 16))

    def f(x, impl):
        if impl == "sparse":
            code, _ = act.sparse_encode(x, params["W_enc"], params["b_enc"], params["b_dec"],
                                        jnp.zeros(64, bool), 5, 0, False)
            return jnp.sum(jnp.sin(act.densify_code(code, 8, 64)))
        bound = sae.bind(params)
        kept = act.densify(*act.topk_select(bound.pre_acts(jax.lax.stop_gradient(x)), 5), 64)
        return jnp.sum(jnp.sin(jnp.where(kept != 0, jax.nn.relu(bound.pre_acts(x)), 0.0)))

    np.testing.assert_allclose(jax.grad(f)(x, "sparse"), jax.grad(f)(x, "dense"), rtol=1e-5, atol=1e-6)


def test_encoder_pre_gradient_is_autodiffs():
    """b_dec's gradient as -W_enc sum(delta) equals autodiff of (x - b_dec) W_enc + b_enc."""
    keys = jax.random.split(jax.random.key(0), 4)
    args = (jax.random.normal(keys[0], (5, 3)), jax.random.normal(keys[1], (3, 7)),
            jax.random.normal(keys[2], (7,)), jax.random.normal(keys[3], (3,)))
    check_grads(act.encoder_pre, args, order=1, modes=("rev",))
    g = jnp.cos(jnp.arange(35.0).reshape(5, 7))
    plain = jax.vjp(lambda x, w, b, c: (x - c) @ w + b, *args)[1](g)
    for ours, ref in zip(jax.vjp(act.encoder_pre, *args)[1](g), plain, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_decoder_matmul_gradient_is_autodiffs():
    keys = jax.random.split(jax.random.key(1), 3)
    f, W, g = (jax.random.normal(k, s) for k, s in zip(keys, [(5, 7), (7, 3), (5, 3)], strict=True))
    check_grads(act.decoder_matmul, (f, W), order=1, modes=("rev",))
    out, pullback = jax.vjp(act.decoder_matmul, f, W)
    np.testing.assert_allclose(out, f @ W, rtol=1e-6)
    for ours, ref in zip(pullback(g), jax.vjp(jnp.matmul, f, W)[1](g), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def gated_code_reference(x, W_gate, b_gate, r_mag, b_mag, b_dec):
    """Gated's code and gate in plain jnp: what autodiff differentiates for act.gated_code."""
    h = (x - b_dec) @ W_gate
    pi_gate, pi_mag = h + b_gate, h * jnp.exp(r_mag) + b_mag
    f = jax.lax.stop_gradient((pi_gate > 0).astype(x.dtype)) * jax.nn.relu(pi_mag)
    return f, jax.nn.relu(pi_gate)


def test_gated_code_value_and_gradient_are_autodiffs():
    """All four (π_gate, π_mag) sign cases occur; the written-out VJP equals autodiff of the plain code."""
    keys = jax.random.split(jax.random.key(2), 8)
    args = (jax.random.normal(keys[0], (12, 5)), jax.random.normal(keys[1], (5, 9)),
            0.3 * jax.random.normal(keys[2], (9,)), 0.5 * jax.random.normal(keys[3], (9,)),
            jax.random.normal(keys[4], (9,)), 0.2 * jax.random.normal(keys[5], (5,)))
    cot = (jax.random.normal(keys[6], (12, 9)), jax.random.normal(keys[7], (12, 9)))
    (f, gate), pullback = jax.vjp(act.gated_code, *args)
    (f_ref, gate_ref), pullback_ref = jax.vjp(gated_code_reference, *args)
    np.testing.assert_allclose(f, f_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gate, gate_ref, rtol=1e-6, atol=1e-7)
    h = (args[0] - args[5]) @ args[1]
    pi_gate, pi_mag = h + args[2], h * jnp.exp(args[3]) + args[4]
    cases = {(bool(a), bool(b)) for a, b in zip((pi_gate > 0).ravel(), (pi_mag > 0).ravel(), strict=True)}
    assert cases == {(True, True), (True, False), (False, True), (False, False)}
    for name, ours, ref in zip(["x", "W_gate", "b_gate", "r_mag", "b_mag", "b_dec"], pullback(cot), pullback_ref(cot),
                               strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("arch", ["relu", "topk", "gated"])
def test_step_l0_and_firing_statistics_come_from_the_code(arch):
    """One shared count per latent gives L0 and the dead-latent counters (TopK's from its sparse code)."""
    _, sae = configure(arch, "model.d_sae=256", "model.k=5", d_model=16)
    tx = step_lib.optimizer(0.9, 0.999)
    state = init_state(sae, tx, jax.random.key(0), None, 1e-3, 0.1)
    state = state.replace(stats=dict(state.stats, tokens_since_fired=jnp.full((256,), 7, jnp.int32)))
    x = jax.random.normal(jax.random.key(1), (4, 16))  # 4 tokens: some latents fire on none
    new, m = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 10), step_lib.coefficient_factor(1)))(
        state, x)
    f = sae.bind(state.params, state.stats).forward(x).f
    assert float(m["l0"]) == pytest.approx(float(metrics.l0(f)), abs=1e-6)
    fired = np.asarray(jnp.any(f != 0, axis=0))
    assert 0 < fired.sum() < 256
    np.testing.assert_array_equal(np.asarray(new.stats["tokens_since_fired"]), np.where(fired, 0, 7 + 4))


@pytest.mark.parametrize("penalty", ["l1", "l1_decoder_norm"])
def test_gated_aux_term_and_penalty_see_a_frozen_decoder(penalty):
    sae, params = small("gated", f"sparsity.penalty={penalty}")
    x = jax.random.normal(jax.random.key(1), (24, 16))

    def side_terms(p):  # what trains the gate path only
        out = sae.bind(p).forward(x)
        return out.aux + 0.7 * out.sparsity

    grads = jax.grad(side_terms)(params)
    assert float(jnp.abs(grads["W_dec"]).max()) == 0  # sg(W_dec) in the aux term; sg(norms) in the penalty
    assert float(jnp.abs(grads["b_gate"]).max()) > 0 and float(jnp.abs(grads["b_mag"]).max()) == 0
    assert sae.unit_norm_decoder == (penalty == "l1")
    # The magnitude path shares W_gate: f's magnitude is (x - b_dec)(W_gate * exp(r_mag)) + b_mag.
    pi_gate, pi_mag = sae.bind(params).gate_and_mag(x)
    h = (x - params["b_dec"]) @ params["W_enc"]
    np.testing.assert_allclose(pi_mag, h * jnp.exp(params["r_mag"]) + params["b_mag"], rtol=1e-5, atol=1e-5)
    f = sae.bind(params).forward(x).f  # f = H(π_gate) ReLU(π_mag)
    np.testing.assert_allclose(f, jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sae.bind(params).encode(x), f)


def test_jumprelu_parameterizations_and_raw_projection():
    sae_log, params = small("jumprelu")
    sae_raw, _ = small("jumprelu", "model.jumprelu_theta_param=raw")
    theta = jnp.linspace(0.01, 0.2, 64)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    f_log = sae_log.bind(dict(params, log_threshold=jnp.log(theta))).encode(x)
    f_raw = sae_raw.bind(dict(params, log_threshold=theta)).encode(x)
    np.testing.assert_allclose(f_log, f_raw, rtol=1e-6)
    clamped = sae_raw.constrain_params(dict(params, log_threshold=theta - 0.1))["log_threshold"]
    assert float(clamped.min()) == 0.0  # raw theta is kept >= 0, as SAELens does


def test_dead_latents_are_counted_in_tokens():
    sae, params = small("topk", "train.dead_tokens=48")
    stats = sae.init_stats()
    x = jax.random.normal(jax.random.key(1), (24, 16))
    for _ in range(2):
        out = sae.bind(params, stats).forward(x)
        stats = sae.update_stats(stats, out)
    fired = np.asarray((out.f != 0).any(axis=0))
    since = np.asarray(stats["tokens_since_fired"])
    assert (since[fired] == 0).all() and (since[~fired] == 48).all()
    np.testing.assert_array_equal(np.asarray(sae.dead_mask(stats)), ~fired)


@pytest.mark.parametrize("arch, variant", [(a, "") for a in ARCHS] + [
    ("relu", "sparsity.penalty=l1_decoder_norm"), ("gated", "sparsity.penalty=l1_decoder_norm"),
    ("jumprelu", "model.jumprelu_theta_param=raw")])
def test_fold_scale_gives_raw_space_reconstruction(arch, variant):
    sae, params = small(arch, *([variant] if variant else []), d=16, m=48)
    stats = sae.init_stats()
    if "threshold" in stats:
        stats = dict(stats, threshold=jnp.asarray(0.05))
    x = jax.random.normal(jax.random.key(4), (32, 16)) * 3.0
    scale = 0.25
    x_hat_n = sae.bind(params, stats)(x * scale)
    raw_p, raw_s = sae.fold_scale(params, stats, scale)
    x_hat_raw = sae.bind(raw_p, raw_s)(x)
    np.testing.assert_allclose(x_hat_raw, x_hat_n / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_vmaps_over_stacked_params(arch):
    sae, _ = small(arch, d=8, m=32)
    stacked = jax.vmap(lambda k: sae.init_params(k))(jax.random.split(jax.random.key(0), 2))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    stats = dict(sae.init_stats(), **half_dead(sae))  # AuxK's conditional under vmap too
    fn = jax.value_and_grad(lambda p: sae.loss(p, x, 0.1, stats)[0])
    losses, grads = jax.jit(jax.vmap(fn))(stacked)
    for i in range(2):
        loss, grad = fn(jax.tree.map(lambda a, i=i: a[i], stacked))
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        for name in grad:
            np.testing.assert_allclose(grads[name][i], grad[name], rtol=1e-4, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- the compiled step
def matmul_shapes(arch, b=96, d=24, m=160):
    """Output shapes of the dot ops in the compiled train step (all other work is elementwise,
    reductions, gathers and scatters)."""
    _, sae = configure(arch, f"model.d_sae={m}", "model.k=4", d_model=d)
    tx = step_lib.optimizer(0.9, 0.999)
    state = init_state(sae, tx, jax.random.key(0), None, 1e-3, 0.1)
    fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 10), step_lib.coefficient_factor(1)))
    hlo = fn.lower(state, jnp.zeros((b, d))).compile().as_text()
    return sorted(re.findall(r"f32\[([\d,]+)\]\{[\d,]+\} dot\(", hlo))


@pytest.mark.parametrize("arch", [a for a in ARCHS if not registry()[a].uses_k])
def test_dense_step_is_its_five_matmuls_without_the_input_cotangent(arch):
    b, d, m = 96, 24, 160
    shapes = [s for s in matmul_shapes(arch, b, d, m) if "1" not in s.split(",")]  # drop matrix-vector products
    # enc and d f; dec; d W_dec (formed transposed: act.decoder_matmul) and d W_enc
    expected = {f"{b},{m}": 2, f"{b},{d}": 1, f"{d},{m}": 2}
    if arch == "gated":  # the aux term's frozen-decoder forward and its backward to the gate
        expected[f"{b},{m}"], expected[f"{b},{d}"] = 3, 2
    assert {s: shapes.count(s) for s in set(shapes)} == expected, shapes


@pytest.mark.parametrize("arch", [a for a in ARCHS if registry()[a].uses_k])
def test_sparse_step_has_one_dense_matmul(arch):
    b, d, m = 96, 24, 160
    shapes = [s for s in matmul_shapes(arch, b, d, m) if "1" not in s.split(",")]
    assert shapes == [f"{b},{m}"], shapes  # the encoder forward; decode and weight gradients are sparse

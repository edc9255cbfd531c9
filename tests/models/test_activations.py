"""Values and gradients of the sparsity nonlinearities against their sources' formulas.

Each custom VJP is compared with the formula written out here in numpy (JumpReLU paper
eqs. 11-12 / SAELens ``jumprelu_sae.py``; nqgl/sae_components ``prolu.py``; the dense
TopK decode/encode), on hand-chosen inputs on both sides of each threshold and inside and
outside the kernel window, with a batch dim so parameter-gradient summation is checked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from sae_jax.models import activations as act

EPS = 0.1
# Rows: a batch of 4; columns: latents with θ = 0.5 and θ = 1.0. (π − θ)/ε per entry:
#   row 0: +0.2 (window, above)    +2.0 (outside, above)
#   row 1: -0.3 (window, below)    -0.6 (outside, below)
#   row 2:  0   (equality: off)     0   (equality: off)
#   row 3: +4.0 (outside, above)   +0.4 (window, above)
PI = np.array([[0.52, 1.2], [0.47, 0.94], [0.5, 1.0], [0.9, 1.04]], np.float32)
THETA = np.array([0.5, 1.0], np.float32)
G = np.array([[1.0, 2.0], [-3.0, 0.5], [0.25, -1.0], [2.0, 4.0]], np.float32)


def _kernel(u):
    return (np.abs(u) < 0.5).astype(np.float32)


def _vjp(f, g, *args):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(jnp.asarray(g, out.dtype))


def test_rectangle_is_open_unit_window():
    u = jnp.array([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6], jnp.float32)
    np.testing.assert_array_equal(act.rectangle(u), [0, 0, 1, 1, 1, 0, 0])
    assert act.rectangle(u).dtype == jnp.float32


# --------------------------------------------------------------------------- JumpReLU
def test_jumprelu_value_matches_reference_and_is_off_at_equality():
    out = act.jumprelu(PI, THETA, EPS)
    np.testing.assert_array_equal(out, act.jumprelu_reference(PI, THETA))
    np.testing.assert_array_equal(out, np.where(PI > THETA, PI, 0))
    np.testing.assert_array_equal(out[2], [0.0, 0.0])  # π == θ: H(0) = 0, as SAELens


def test_jumprelu_vjp_is_the_papers_formula():
    _, (d_pi, d_theta) = _vjp(lambda p, t: act.jumprelu(p, t, EPS), G, PI, THETA)
    u = (PI - THETA) / EPS
    np.testing.assert_allclose(d_pi, (PI > THETA) * G)
    expected = (-(THETA / EPS) * _kernel(u) * G).sum(0)
    np.testing.assert_allclose(d_theta, expected, rtol=1e-6)
    # By hand: θ0 window rows 0,1,2 -> -5·(1 − 3 + 0.25); θ1 rows 2,3 -> -10·(-1 + 4).
    np.testing.assert_allclose(d_theta, [8.75, -30.0], rtol=1e-6)


def test_jumprelu_pi_gradient_is_exact_away_from_threshold():
    pi = jnp.array([[0.9, -0.3], [0.1, 2.0]], jnp.float32)  # all ≥ 0.4 from θ
    check_grads(lambda p: act.jumprelu(p, THETA, EPS), (pi,), 1, modes=("rev",))


@pytest.mark.parametrize("shape", [(), (1, 2)])
def test_jumprelu_theta_gradient_sums_to_theta_shape(shape):
    theta = np.broadcast_to(np.float32(0.5), shape).copy()
    d_theta = jax.grad(lambda t: act.jumprelu(PI, t, EPS).sum())(theta)
    assert d_theta.shape == shape
    per_entry = -(0.5 / EPS) * _kernel((PI - 0.5) / EPS)
    expected = per_entry.sum() if shape == () else per_entry.sum(0, keepdims=True)
    np.testing.assert_allclose(d_theta, expected, rtol=1e-6)


# --------------------------------------------------------------------------- L0 step
def test_heaviside_step_value_and_vjp():
    out, (d_pi, d_theta) = _vjp(lambda p, t: act.heaviside_step(p, t, EPS), G, PI, THETA)
    np.testing.assert_array_equal(out, (PI > THETA).astype(np.float32))
    np.testing.assert_array_equal(out, act.heaviside_step_reference(PI, THETA))
    np.testing.assert_array_equal(d_pi, np.zeros_like(PI))
    expected = (-(1.0 / EPS) * _kernel((PI - THETA) / EPS) * G).sum(0)
    np.testing.assert_allclose(d_theta, expected, rtol=1e-6)
    np.testing.assert_allclose(d_theta, [17.5, -30.0], rtol=1e-6)  # by hand


def test_heaviside_step_pi_gradient_is_zero_like_the_true_one():
    pi = jnp.array([[0.9, -0.3], [0.1, 2.0]], jnp.float32)
    check_grads(lambda p: act.heaviside_step(p, THETA, EPS), (pi,), 1, modes=("rev",))


# --------------------------------------------------------------------------- TopK
def _rng(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, "float32")


def test_topk_select_values_indices_and_ties():
    pre = jnp.array([[3.0, -1.0, 2.0, 2.0, 0.5], [-1.0, -2.0, -0.5, -3.0, 0.25]])
    values, indices = act.topk_select(pre, 3)
    np.testing.assert_array_equal(values, [[3.0, 2.0, 2.0], [0.25, 0.0, 0.0]])
    np.testing.assert_array_equal(indices, [[0, 2, 3], [4, 2, 0]])  # ties: lower index
    top_of_relu = lax.top_k(jax.nn.relu(pre), 3)[0]
    np.testing.assert_array_equal(values, top_of_relu)


def test_batch_topk_select_keeps_k_times_batch_over_the_whole_batch():
    pre = _rng(0, (4, 8))
    acts, mask = act.batch_topk_select(pre, 2.5)  # ⌊2.5 · 4⌋ = 10 kept
    assert int(mask.sum()) == 10
    flat = np.maximum(np.asarray(pre), 0).ravel()
    keep = np.argsort(-flat, kind="stable")[:10]
    expected = np.zeros_like(flat)
    expected[keep] = flat[keep]
    np.testing.assert_array_equal(acts, expected.reshape(4, 8))
    g = jax.grad(lambda p: act.batch_topk_select(p, 2.5)[0].sum())(pre)
    np.testing.assert_array_equal(g, (np.asarray(mask) & (np.asarray(pre) > 0)))


def test_batch_topk_select_ties_and_too_few_positives():
    pre = jnp.array([[1.0, -1.0, 1.0], [1.0, -2.0, -3.0]])
    acts, mask = act.batch_topk_select(pre, 2)  # 4 kept, only 3 positive
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])  # lower flat index
    np.testing.assert_array_equal(acts, [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def _decode_case():
    values = _rng(1, (5, 3))
    indices = jnp.array([[0, 4, 2], [4, 1, 0], [2, 3, 4], [7, 0, 1], [4, 2, 6]])
    return values, indices, _rng(2, (8, 6))  # latent 4 is in four rows: scatter-add


def test_sparse_decode_value_and_vjp_equal_the_dense_decode():
    values, indices, W_dec = _decode_case()
    g = _rng(3, (5, 6))
    out, (d_v, d_W) = _vjp(lambda v, w: act.sparse_decode(v, indices, w), g, values, W_dec)
    ref, (r_v, r_W) = _vjp(lambda v, w: act.dense_decode_reference(v, indices, w), g, values, W_dec)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_v, r_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_W, r_W, rtol=1e-5, atol=1e-6)
    # The formula: d values[b, j] = <g[b], W_dec[idx[b, j]]>.
    np.testing.assert_allclose(d_v, np.einsum("bd,bkd->bk", g, W_dec[indices]), 1e-5)


def test_sparse_decode_check_grads_and_leading_dims():
    values, indices, W_dec = _decode_case()
    check_grads(
        lambda v, w: act.sparse_decode(v, indices, w),
        (values, W_dec),
        1,
        modes=("rev",),
    )
    v2, i2 = values[:4].reshape(2, 2, 3), indices[:4].reshape(2, 2, 3)
    out = act.sparse_decode(v2, i2, W_dec)
    ref = act.dense_decode_reference(values[:4], indices[:4], W_dec)
    np.testing.assert_allclose(out.reshape(4, 6), ref, rtol=1e-5, atol=1e-6)


def _encoder_case():
    x = _rng(4, (5, 6)).at[0].set(0.0)  # row 0: pre = b_enc, so 2 of its top 6 are < 0
    b_enc = jnp.linspace(-3.0, 1.0, 16, dtype=jnp.float32)  # 4 positive entries
    return x, _rng(5, (6, 16)), b_enc, 6


def test_sparse_encoder_topk_value_equals_reference():
    x, W_enc, b_enc, k = _encoder_case()
    values, indices = act.sparse_encoder_topk(x, W_enc, b_enc, k)
    r_values, r_indices = act.topk_encoder_reference(x, W_enc, b_enc, k)
    np.testing.assert_array_equal(indices, r_indices)
    np.testing.assert_allclose(values, r_values, rtol=1e-6)
    assert int((values[0] == 0).sum()) == 2


def test_sparse_encoder_topk_vjp_is_the_scatter_formula():
    x, W_enc, b_enc, k = _encoder_case()
    g = _rng(6, (5, k))
    (_, indices), pullback = jax.vjp(lambda *a: act.sparse_encoder_topk(*a, k), x, W_enc, b_enc)
    d_x, d_W, d_b = pullback((g, np.zeros(indices.shape, jax.dtypes.float0)))
    pre = np.asarray(x @ W_enc + b_enc)
    e_x, e_W, e_b = np.zeros(x.shape), np.zeros(W_enc.shape), np.zeros(b_enc.shape)
    for b in range(x.shape[0]):
        for j, i in enumerate(np.asarray(indices[b])):
            delta = g[b, j] * (pre[b, i] > 0)
            e_W[:, i] += np.asarray(x[b]) * delta
            e_b[i] += delta
            e_x[b] += delta * np.asarray(W_enc[:, i])
    for got, want in ((d_x, e_x), (d_W, e_W), (d_b, e_b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _sae_loss(params, x, encode, decode, k):
    W_enc, b_enc, W_dec, b_dec = params
    values, indices = encode(x - b_dec, W_enc, b_enc, k)
    x_hat = decode(values, indices, W_dec) + b_dec
    return ((x - x_hat) ** 2).sum(-1).mean()


def _dense_sae_loss(params, x, k):
    """Plain dense TopK SAE: relu(topk(pre)) scattered into [B, m], dense matmul decode."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    top, idx = lax.top_k(pre, k)
    z = jnp.zeros_like(pre).at[jnp.arange(x.shape[0])[:, None], idx].set(jax.nn.relu(top))
    return ((x - (z @ W_dec + b_dec)) ** 2).sum(-1).mean()


def test_sparse_topk_sae_gradients_equal_the_dense_sae():
    x, W_enc, b_enc, k = _encoder_case()
    params = (W_enc, b_enc, _rng(7, (16, 6)), _rng(8, (6,), 0.1))
    sparse = jax.grad(_sae_loss)(params, x, act.sparse_encoder_topk, act.sparse_decode, k)
    dense = jax.grad(_dense_sae_loss)(params, x, k)
    for got, want in zip(sparse, dense, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- jit / vmap
def test_jit_matches_eager():
    f = jax.grad(lambda p, t, e: act.jumprelu(p, t, e).sum(), argnums=(0, 1))
    for got, want in zip(jax.jit(f)(PI, THETA, EPS), f(PI, THETA, EPS), strict=True):
        np.testing.assert_allclose(got, want)
    x, W_enc, b_enc, k = _encoder_case()
    params = (W_enc, b_enc, _rng(7, (16, 6)), _rng(8, (6,), 0.1))
    loss = jax.jit(_sae_loss, static_argnums=(2, 3, 4))
    grads = jax.grad(loss)(params, x, act.sparse_encoder_topk, act.sparse_decode, k)
    for got, want in zip(grads, jax.grad(_dense_sae_loss)(params, x, k), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_over_a_sweep_axis_matches_a_loop():
    """A leading "sweep" axis over θ and ε (traced), and over whole TopK SAEs."""
    thetas = jnp.stack([THETA, THETA + 0.02])
    epss = jnp.array([EPS, 0.2], jnp.float32)

    def l0_grad(theta, eps):
        return jax.grad(lambda t: act.heaviside_step(PI, t, eps).sum())(theta)

    swept = jax.vmap(l0_grad)(thetas, epss)
    for s in range(2):
        np.testing.assert_allclose(swept[s], l0_grad(thetas[s], float(epss[s])))
    x, W_enc, b_enc, k = _encoder_case()
    params = (W_enc, b_enc, _rng(7, (16, 6)), _rng(8, (6,), 0.1))
    stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
    grad = jax.grad(_sae_loss)
    swept = jax.vmap(grad, in_axes=(0, None, None, None, None))(
        stacked, x, act.sparse_encoder_topk, act.sparse_decode, k
    )
    for s in range(2):
        one = jax.tree.map(lambda p, s=s: p[s], stacked)
        for got, want in zip(
            jax.tree.map(lambda p, s=s: p[s], swept),
            jax.grad(_dense_sae_loss)(one, x, k),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [False, True])
def test_grouped_sparse_ops_equal_the_ungrouped_ones(batch):
    """``groups`` (the latent axis's shards) changes only where each entry is summed: the decode, its VJP
    and the sparse encoder's backward equal the one-group ops (up to float32 summation order)."""
    rng = np.random.default_rng(3)
    n, m, d, k = 16, 64, 8, 5
    pre = jnp.asarray(rng.normal(size=(n, m)))
    code = act.batch_topk_code(pre, k, 1) if batch else act.topk_code(pre, k, 1)
    W = jnp.asarray(rng.normal(size=(m, d)))
    x, W_enc = jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=(d, m)))
    dead = jnp.arange(m) % 3 == 0

    def decoded(groups):
        def f(values, W):
            return jnp.sum(jnp.sin(act.decode_code(code._replace(values=values), W, n, groups)))
        return jax.value_and_grad(f, argnums=(0, 1))(code.values, W)

    def encoded(groups):
        def f(x, W_enc, b_enc, b_dec):
            main, aux = act.sparse_encode(x, W_enc, b_enc, b_dec, dead, k, 6, batch, groups)
            return jnp.sum(jnp.sin(main.values)) + jnp.sum(jnp.cos(aux.values))
        return jax.grad(f, argnums=(0, 1, 2, 3))(x, W_enc, jnp.zeros(m), jnp.zeros(d))

    for one, four in ((decoded(1), decoded(4)), (encoded(1), encoded(4))):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)

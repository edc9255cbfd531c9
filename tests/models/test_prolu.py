"""ProLU (Taggart 2024): its estimators against the author's formulas, its sqrt(L1) penalty, its
l1 variant's normalization folding and its dense step. The recipe, export, sharding and vmap tests
of every architecture cover it through the registry."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from sae_jax.models import prolu
from tests.models.test_models import small, test_fold_scale_gives_raw_space_reconstruction


def _vjp(f, g, *args):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(jnp.asarray(g, out.dtype))


# --------------------------------------------------------------------------- the estimators
# Columns: gate on; m + b < 0; m + b == 0 in row 0 (off); m == 0 (off); m < 0; on, m > 1.
M = np.array([[0.5, 0.2, 0.5, 0.0, -0.4, 1.5], [0.8, 0.3, 0.25, 0.0, -1.0, 2.0]], np.float32)
B = np.array([0.1, -0.5, -0.5, 1.0, 2.0, -1.0], np.float32)
G_P = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-1.0, 0.5, 2.0, 1.0, 1.0, 0.5]])
GATE = ((M + B > 0) & (M > 0)).astype(np.float32)


def test_prolu_value_matches_reference_and_gate():
    np.testing.assert_array_equal(GATE[0], [1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(GATE[1], [1, 0, 0, 0, 0, 1])
    for fn in (prolu.prolu_relu, prolu.prolu_ste):
        np.testing.assert_array_equal(fn(M, B), prolu.prolu_reference(M, B))
        np.testing.assert_array_equal(fn(M, B), M * GATE)


def test_prolu_relu_vjp_is_the_authors_formula():
    _, (d_m, d_b) = _vjp(prolu.prolu_relu, G_P, M, B)
    np.testing.assert_allclose(d_m, GATE * G_P)  # ProLU_ReLU: grad_m = gated_grad
    np.testing.assert_allclose(d_b, (GATE * G_P).sum(0))  # grad_b = gated_grad


def test_prolu_ste_vjp_is_the_authors_formula():
    _, (d_m, d_b) = _vjp(prolu.prolu_ste, G_P, M, B)
    gated = GATE * G_P
    np.testing.assert_allclose(d_b, (gated * M).sum(0), rtol=1e-6)  # gated · m
    np.testing.assert_allclose(d_m, gated + gated * M, rtol=1e-6)  # gated · (1 + m)
    # By hand, the gated columns 0 and 5: 1·0.5 − 1·0.8 and 6·1.5 + 0.5·2.0.
    np.testing.assert_allclose(d_b[np.array([0, 5])], [-0.3, 10.0], rtol=1e-6)


def test_prolu_relu_m_gradient_is_exact_away_from_kinks():
    m = jnp.array([[0.5, -0.3, 1.5], [0.7, 0.2, -0.9]], jnp.float32)
    b = jnp.array([0.2, 0.1, -1.0], jnp.float32)  # m + b ∉ [-0.01, 0.01]
    check_grads(lambda x: prolu.prolu_relu(x, b), (m,), 1, modes=("rev",))
def test_prolu_sqrt_l1_is_the_authors_penalty():
    sae, params = small("prolu", "sparsity.penalty=sqrt_l1")
    f = jnp.array([[0.0, 0.25, 4.0], [1e-3, 0.0, 1.0]])
    value, grad = jax.value_and_grad(lambda f: sae.bind(params).l1(f))(f)
    eps = 1e-6  # nqgl/scsae: sqrt(relu(f) + 1e-6), summed over latents, batch mean
    expected = np.mean(np.sum(np.sqrt(np.asarray(f) + eps) - np.sqrt(eps), axis=1))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    f = np.asarray(f)
    np.testing.assert_allclose(grad, np.where(f > 0, 0.5 / np.sqrt(f + eps) / 2, 0.0), rtol=1e-5)


def test_prolu_with_the_l1_penalty_folds_the_normalization():
    test_fold_scale_gives_raw_space_reconstruction("prolu", "sparsity.penalty=l1")

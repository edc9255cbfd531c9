"""The ProLU SAE, with its custom-VJP estimators (each beside its plain reference)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.models import activations as act
from sae_jax.models.sae import SAE, Output, squared_error

SQRT_L1_EPS = 1e-6  # sqrt(f + eps): the author's eps, bounding the gradient at f -> 0


# --------------------------------------------------------------------------- the nonlinearity and its estimators
def prolu_reference(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU f = m · H(m + b) · H(m) in plain jnp (its autodiff b-gradient is 0)."""
    return m * act.heaviside(m + b) * act.heaviside(m)


def _prolu_fwd(m, b):
    return prolu_reference(m, b), (m, b)


def _prolu_relu_bwd(res, g):
    m, b = res
    gated = act.heaviside(m + b) * act.heaviside(m) * g
    return act.sum_to(gated, m), act.sum_to(gated, b)


def _prolu_ste_bwd(res, g):
    m, b = res
    gated = act.heaviside(m + b) * act.heaviside(m) * g
    return act.sum_to(gated * (1 + m), m), act.sum_to(gated * m, b)


@jax.custom_vjp
def prolu_relu(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU with the "ReLU" estimator: ∂f/∂m = gate, ∂f/∂b = gate.

    Value f = m · H(m + b) · H(m), gate = H(m + b) · H(m); b's gradient summed over the
    batch dims to b's shape: the gradient ReLU(m + b) would give. Taggart 2024, "ProLU: A
    Nonlinearity for Sparse Autoencoders"; the author's code, nqgl/sae_components
    ``src/saeco/architectures/prolu/prolu.py`` ``ProLU_ReLU.backward``:
    ``grad_m = grad_b = where(gate, grad_output, 0)``.
    """
    return prolu_reference(m, b)


prolu_relu.defvjp(_prolu_fwd, _prolu_relu_bwd)


@jax.custom_vjp
def prolu_ste(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU with the straight-through estimator: ∂f/∂b = gate · m, ∂f/∂m = gate · (1 + m).

    Value f = m · H(m + b) · H(m), gate = H(m + b) · H(m); b's gradient summed over the
    batch dims to b's shape. Exactly the author's code (nqgl/sae_components
    ``src/saeco/architectures/prolu/prolu.py`` ``ProLU_STE.backward``:
    ``gated = where(gate, g, 0); grad_b = gated * m; grad_m = gated + grad_b``): the
    derivative of H(m + b) taken as 1 inside the gate (straight through), that of H(m)
    as 0. Taggart 2024.
    """
    return prolu_reference(m, b)


prolu_ste.defvjp(_prolu_fwd, _prolu_ste_bwd)


class ProLUSAE(SAE):
    """ProLU SAE (Taggart 2024, "ProLU: A Nonlinearity for Sparse Autoencoders").

    With m = (x − b_dec) W_enc: f = m · H(m + b_enc) · H(m), the bias gates but never shifts
    the magnitude; gradients by ``prolu_ste`` or ``prolu_relu`` (below). Penalties: ``l1``
    and ``sqrt_l1`` = Σ_i √f_i, computed as the author's √(f_i + 1e-6) (nqgl/scsae
    ``trainer/config.py`` ``sparsity_penalty`` 'l1_sqrt'), minus its value at 0. Exported as
    a SAELens JumpReLU: θ_i = max(−b_enc,i, 0) with b_enc = 0 gives the same code.
    """

    name: ClassVar[str] = "prolu"
    penalties: ClassVar[tuple[str, ...]] = ("l1", "sqrt_l1")
    saelens: ClassVar[str | None] = "jumprelu"
    saelens_import: ClassVar[bool] = False
    # Taggart 2024: ProLU with the STE estimator and the sqrt(L1) penalty.
    recipe: ClassVar[dict] = {"penalty": "sqrt_l1", "coefficient": 0.1, "lr": 1e-3, "prolu_estimator": "ste"}
    options: ClassVar[dict] = {
        "prolu_estimator": ("estimator", ["relu", "ste"], "ProLU gradient estimator: 'relu' (prolu_relu) or 'ste' "
                            "(prolu_ste)."),
    }
    hyper: ClassVar[dict] = {"estimator": "ste"}
    summary_fields: ClassVar[tuple[str, ...]] = ("penalty", "estimator")

    def prolu(self, x: jax.Array) -> jax.Array:
        fn = prolu_ste if self.estimator == "ste" else prolu_relu
        return fn(self.project(x), self.b_enc[...])

    def pre_acts(self, x):
        """min(m, m + b_enc): a latent fires exactly where this is positive."""
        m = self.project(x)
        return jnp.minimum(m, m + self.b_enc[...])

    def encode(self, x):
        return prolu_reference(self.project(x), self.b_enc[...])

    def forward(self, x):
        f = self.prolu(x)
        x_hat = self.decode(f)
        return Output(x_hat, f, squared_error(x, x_hat), self.l1(f), jnp.zeros(()), {})

    def l1(self, f):
        if self.penalty != "sqrt_l1":
            return super().l1(f)
        root = jnp.sqrt(jax.nn.relu(f) + SQRT_L1_EPS) - jnp.sqrt(SQRT_L1_EPS)
        return jnp.mean(jnp.sum(root, axis=-1))

    def to_saelens(self, params, stats):
        b = params["b_enc"]
        theta = np.where(b < 0, -b, 0.0).astype(np.float32)  # -b is exact; never -0.0
        return {**{k: params[k] for k in ("W_enc", "W_dec", "b_dec")}, "b_enc": np.zeros_like(b),
                "threshold": theta}, {}

    def from_saelens(self, tensors):
        params, stats = super().from_saelens(tensors)
        return {**params, "b_enc": (-tensors["threshold"]).astype(np.float32)}, stats

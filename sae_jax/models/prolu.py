"""The ProLU SAE."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.models import activations as act
from sae_jax.models.sae import SAE, Output, squared_error

SQRT_L1_EPS = 1e-6  # sqrt(f + eps): the author's eps, bounding the gradient at f -> 0


class ProLUSAE(SAE):
    """ProLU SAE (Taggart 2024, "ProLU: A Nonlinearity for Sparse Autoencoders").

    With m = (x − b_dec) W_enc: f = m · H(m + b_enc) · H(m), the bias gates but never shifts
    the magnitude; gradients by ``act.prolu_ste`` or ``act.prolu_relu``. Penalties: ``l1``
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
        fn = act.prolu_ste if self.estimator == "ste" else act.prolu_relu
        return fn(self.project(x), self.b_enc[...])

    def pre_acts(self, x):
        """min(m, m + b_enc): a latent fires exactly where this is positive."""
        m = self.project(x)
        return jnp.minimum(m, m + self.b_enc[...])

    def encode(self, x):
        return act.prolu_reference(self.project(x), self.b_enc[...])

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

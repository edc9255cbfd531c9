"""The Gated SAE."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from sae_jax.models import activations as act
from sae_jax.models.sae import SAE, Output, squared_error


class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014), with weight sharing.

    π_gate = (x − b_dec) W_gate + b_gate, π_mag = (x − b_dec)(W_gate ⊙ exp(r_mag)) + b_mag
    (``W_enc`` holds W_gate), f = H(π_gate) ⊙ ReLU(π_mag) with no gradient through H,
    L = ‖x − x̂‖² + λ P(ReLU(π_gate)) + ‖x − ReLU(π_gate) sg(W_dec) − sg(b_dec)‖²
    (the paper's eq. 8; dictionary_learning ``trainers/gdm.py``, which freezes the aux
    decoder with ``.detach()``). Penalty ``l1``: P = Σ_i ReLU(π_gate)_i with unit-norm
    decoder rows (the paper). ``l1_decoder_norm``: P = Σ_i ReLU(π_gate)_i sg(‖W_dec,i‖)
    with free norms; the penalty's norm is frozen like the aux decoder (the author's note
    on the forum post: freeze one or unfreeze the other). SAELens ``gated_sae.py`` takes
    the other way: norms in the penalty trained, aux decoder unfrozen.
    """

    name: ClassVar[str] = "gated"
    saelens: ClassVar[str | None] = "gated"
    # The Gated SAE paper: Adam betas (0, 0.999); aux term weight 1.
    recipe: ClassVar[dict] = {"penalty": "l1", "coefficient": 0.5, "lr": 1e-3, "beta1": 0.0, "aux_coefficient": 1.0}
    hyper: ClassVar[dict] = {"aux_coefficient": 1.0}
    axes: ClassVar[dict] = {"b_gate": ("latent",), "b_mag": ("latent",), "r_mag": ("latent",)}
    bias_names: ClassVar[tuple[str, ...]] = ("b_gate", "b_mag", "b_dec")
    saelens_tensors: ClassVar[tuple[str, ...]] = ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec")

    def init_params(self, key, sample=None):
        p = super().init_params(key, sample)
        b = p.pop("b_enc")
        return dict(p, b_gate=b, b_mag=jnp.zeros_like(b), r_mag=jnp.zeros_like(b))

    def gate_and_mag(self, x: jax.Array):
        """pi_gate = (x - b_dec) W_gate + b_gate; pi_mag = (x - b_dec)(W_gate * exp(r_mag)) + b_mag."""
        h = self.project(x)
        return h + self.b_gate[...], h * jnp.exp(self.r_mag[...]) + self.b_mag[...]

    def pre_acts(self, x):
        """The gate's pre-activations π_gate (what decides which latents fire)."""
        return self.gate_and_mag(x)[0]

    def code_and_gate(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(f, ReLU(π_gate)): f = H(π_gate) ⊙ ReLU(π_mag), with ``act.gated_code``'s VJP."""
        return act.gated_code(x, self.W_enc[...], self.b_gate[...], self.r_mag[...], self.b_mag[...],
                              self.input_bias())

    def encode(self, x):
        return self.code_and_gate(x)[0]

    def forward(self, x):
        f, gate = self.code_and_gate(x)
        x_hat = self.decode(f)
        sparsity = self.l1(gate)
        # The aux term trains the gate path to reconstruct through a frozen decoder.
        frozen = act.mm(gate, jax.lax.stop_gradient(self.W_dec[...])) + jax.lax.stop_gradient(self.b_dec[...])
        aux = self.aux_coefficient * squared_error(x, frozen)
        return Output(x_hat, f, squared_error(x, x_hat), sparsity, aux, {})

    def l1(self, f):
        if self.penalty == "l1_decoder_norm":
            f = f * jax.lax.stop_gradient(self.decoder_norms())
        return jnp.mean(jnp.sum(f, axis=-1))

    def to_saelens(self, params, stats):
        return {k: params[k] for k in self.saelens_tensors}, {}

    def from_saelens(self, tensors):
        return {k: tensors[k] for k in self.saelens_tensors}, self.host_stats()

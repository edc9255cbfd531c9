"""The TopK SAE with AuxK."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from sae_jax.models import activations as act
from sae_jax.models.sae import SAE, Output, fold_norms, normalized_mse


class TopKSAE(SAE):
    """TopK SAE with AuxK (Gao et al. 2024, arXiv 2406.04093); sparse encoder backward and decode.

    z = ReLU(TopK_k((x − b_dec) W_enc + b_enc)), L = ‖x − x̂‖² / ‖x − mean x‖² (batch) +
    α ‖e − ê‖² / ‖e − mean e‖², e = sg(x − x̂), ê the decode (no bias) of each token's top
    ``k_aux`` pre-activations among the dead latents (openai/sparse_autoencoder
    ``train.py``: ``normalized_mse`` of the AuxK reconstruction; dead = no activation for
    ``dead_tokens`` tokens). The AuxK term is skipped while no latent is dead. TopK selects,
    decodes and differentiates sparsely (``act.sparse_encode``, ``act.decode_code``), leaving
    the encoder forward as its one dense matmul.

    ``latent_groups``: slices of the latent axis for a two-stage top-k (``act.grouped_top_k``);
    the loop sets the model-axis size, so the first stage stays on each device. Every value
    gives the same result.
    """

    name: ClassVar[str] = "topk"
    penalties: ClassVar[tuple[str, ...]] = ("none",)
    uses_k: ClassVar[bool] = True
    saelens: ClassVar[str | None] = "topk"
    # Gao et al. 2024: AuxK alpha = 1/32. k = 32 suits LM sites; set model.k to the data's sparsity.
    recipe: ClassVar[dict] = {"penalty": "none", "coefficient": 0.0, "lr": 1e-3, "k": 32,
                              "aux_coefficient": 0.03125}  # 1/32
    hyper: ClassVar[dict] = {"k": 32, "k_aux": 256, "aux_coefficient": 1 / 32, "latent_groups": 1}
    summary_fields: ClassVar[tuple[str, ...]] = ("penalty", "k")
    folds_decoder_norms: ClassVar[bool] = False
    batch_select: ClassVar[bool] = False

    def check(self):
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"config key 'model.k' must be in 1..model.d_sae ({self.d_sae}), got {self.k!r}.")

    def encode(self, x):
        values, idx = act.topk_select(self.pre_acts(x), self.k, self.latent_groups)
        return act.densify(values, idx, self.d_sae)

    def sparse_codes(self, x: jax.Array) -> tuple[act.SparseCode, act.SparseCode]:
        """The kept code and AuxK's dead-latent code, from one encoder matmul."""
        k_aux = self.k_aux if self.aux_coefficient else 0
        return act.sparse_encode(x, self.W_enc[...], self.b_enc[...], self.input_bias(), self.dead(),
                                 self.k, k_aux, self.batch_select, self.latent_groups)

    def forward(self, x):
        code, aux_code = self.sparse_codes(x)
        n = x.shape[0]
        x_hat, recon = self.reconstruction(x, code)
        aux = self.auxk(x, x_hat, aux_code)
        kept = jax.lax.stop_gradient(code)
        f = act.densify_code(kept, n, self.d_sae)
        on = kept.values > 0
        fired = jnp.zeros((self.d_sae,), bool).at[kept.cols].max(on)
        extras = {"fired": fired, "l0": jnp.sum(on) / n, **self.code_extras(kept)}
        return Output(x_hat, f, recon, jnp.zeros(()), aux, extras)

    def reconstruction(self, x: jax.Array, code: act.SparseCode) -> tuple[jax.Array, jax.Array]:
        """(x̂, reconstruction loss) of the kept code: a sparse decode and the normalized MSE."""
        x_hat = act.decode_code(code, self.W_dec[...], x.shape[0], self.latent_groups) + self.b_dec[...]
        return x_hat, normalized_mse(x, x_hat)

    def code_extras(self, code: act.SparseCode) -> dict[str, jax.Array]:
        """Values ``update_stats`` needs from the kept code (none for TopK)."""
        return {}

    def auxk(self, x: jax.Array, x_hat: jax.Array, aux_code: act.SparseCode) -> jax.Array:
        """alpha * ||e - e_hat||^2 / ||e - mean e||^2, e_hat from the top-k_aux dead latents."""
        if self.aux_coefficient == 0:
            return jnp.zeros(())
        W_dec = self.W_dec[...]

        def loss(x_hat, aux_code):
            e = jax.lax.stop_gradient(x - x_hat)
            e_hat = act.decode_code(aux_code, W_dec, x.shape[0], self.latent_groups)
            return self.aux_coefficient * jnp.nan_to_num(normalized_mse(e, e_hat))

        return jax.lax.cond(jnp.any(self.dead()), loss, lambda *_: jnp.zeros((), x.dtype), x_hat, aux_code)

    @classmethod
    def import_saelens(cls, cfg, tensors, cfg_int):
        notes = []
        if cfg.get("rescale_acts_by_decoder_norm"):
            tensors = fold_norms(tensors, ("b_enc",))  # SAELens _fold_norm_topk: same selection, unit rows
            notes.append("decoder norms folded (rescale_acts_by_decoder_norm)")
        return tensors, [f"model.k={cfg_int('k')}"], notes

    def to_saelens(self, params, stats):
        tensors, _ = super().to_saelens(params, stats)
        return tensors, {"k": int(self.k), "rescale_acts_by_decoder_norm": False}

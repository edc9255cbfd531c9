"""The Matryoshka BatchTopK SAE."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from sae_jax.models import activations as act
from sae_jax.models.batchtopk import BatchTopKSAE
from sae_jax.models.sae import normalized_mse


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024).

    BatchTopK's selection, threshold and AuxK over the whole dictionary; the reconstruction
    loss is summed over nested prefixes of the latents: with widths w_1 < … < w_G = m,
    L = Σ_g ‖x − x̂_g‖² / ‖x − mean x‖² (batch) + AuxK, x̂_g = Σ_{kept i < w_g} f_i W_dec,i + b_dec
    (SAELens ``matryoshka_batchtopk_sae.py`` sums the same per-level losses, as plain MSE).
    Each level is a sparse decode of the kept latents below its width (B·k·d FLOPs); the
    model used at inference is the full width, so export and encode are BatchTopK's.
    """

    name: ClassVar[str] = "matryoshka"
    # Bussmann et al. 2025: BatchTopK's recipe, reconstruction summed over nested prefixes.
    recipe: ClassVar[dict] = {}
    options: ClassVar[dict] = {
        "matryoshka_widths": ("widths", "widths",
                              "Matryoshka: the nested prefix widths, increasing, the last = d_sae; null = d_sae/16, "
                              "/8, /4, /2, d_sae."),
    }
    hyper: ClassVar[dict] = {"widths": ()}
    summary_fields: ClassVar[tuple[str, ...]] = ("penalty", "k", "widths")

    def check(self):
        super().check()
        w = tuple(self.widths) or default_widths(self.d_sae)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in w) and w[0] > 0 \
            and all(b > a for a, b in zip(w, w[1:], strict=False)) and w[-1] == self.d_sae
        if not ok:
            raise ValueError(f"config key 'model.matryoshka_widths' must be a strictly increasing list of positive "
                             f"integers ending with model.d_sae ({self.d_sae}), e.g. [{self.d_sae // 4}, "
                             f"{self.d_sae // 2}, {self.d_sae}], got {list(w)!r}.")
        self.widths = w

    def reconstruction(self, x, code):
        """x̂ of the whole dictionary, and the normalized MSE summed over every nested prefix: x̂_g
        decodes the kept latents below w_g (plus b_dec)."""
        W_dec, b_dec = self.W_dec[...], self.b_dec[...]
        levels = [act.decode_code(code._replace(values=jnp.where(code.cols < width, code.values, 0.0)),
                                  W_dec, x.shape[0], self.latent_groups) + b_dec for width in self.widths]
        return levels[-1], sum(normalized_mse(x, level) for level in levels)


def default_widths(d_sae: int) -> tuple[int, ...]:
    """d_sae/16, /8, /4, /2 and d_sae (fewer where d_sae is small)."""
    return tuple(sorted({max(1, d_sae >> s) for s in range(4, -1, -1)}))

"""The BatchTopK SAE."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.models.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024, arXiv 2412.06410); inference by a global threshold.

    Training keeps the ⌊k·B⌋ largest of ReLU(pre) over the whole batch (so k per token on
    average), with TopK's loss and AuxK. The inference threshold θ is an EMA (momentum
    ``threshold_momentum``) of the smallest kept positive activation per batch, started at the
    first batch's value as dictionary_learning ``trainers/batch_top_k.py`` does (which waits
    1000 steps and uses β = 0.999; SAELens ``batchtopk_sae.py`` starts at 0 with rate 0.01, our
    default momentum); encode keeps ReLU(pre) > θ, and the export is a JumpReLU with θ in
    every latent.
    """

    name: ClassVar[str] = "batchtopk"
    saelens: ClassVar[str | None] = "jumprelu"
    saelens_import: ClassVar[bool] = False
    recipe: ClassVar[dict] = {"threshold_momentum": 0.99}
    options: ClassVar[dict] = {
        "threshold_momentum": ("threshold_momentum", "fraction", "BatchTopK: EMA momentum of the inference threshold."),
    }
    hyper: ClassVar[dict] = {"threshold_momentum": 0.99}
    axes: ClassVar[dict] = {"threshold": ()}
    batch_select: ClassVar[bool] = True

    def init_stats(self):
        return dict(super().init_stats(), threshold=jnp.asarray(-1.0, jnp.float32))

    def encode(self, x):
        acts = jax.nn.relu(self.pre_acts(x))
        return jnp.where(acts > self.threshold[...], acts, 0.0)

    def code_extras(self, code):
        return {"min_kept": jnp.min(jnp.where(code.values > 0, code.values, jnp.inf))}

    def update_stats(self, stats, out):
        stats = super().update_stats(stats, out)
        m, old = out.extras["min_kept"], stats["threshold"]
        new = jnp.where(old < 0, m, self.threshold_momentum * old + (1 - self.threshold_momentum) * m)
        return dict(stats, threshold=jnp.where(jnp.isfinite(m), new, old))

    def fold_scale(self, params, stats, scale):
        params, stats = super().fold_scale(params, stats, scale)
        return params, dict(stats, threshold=stats["threshold"] / scale)

    def to_saelens(self, params, stats):
        tensors, _ = super().to_saelens(params, stats)
        return {**tensors, "threshold": np.full((self.d_sae,), stats["threshold"], np.float32)}, {}

    def from_saelens(self, tensors):
        params, stats = super().from_saelens(tensors)
        return params, {**stats, "threshold": np.asarray(tensors["threshold"][0], np.float32)}

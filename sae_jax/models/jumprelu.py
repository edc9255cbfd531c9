"""The JumpReLU SAE."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.models import activations as act
from sae_jax.models.sae import BASE_TENSORS, SAE, Output, decoder_norms, squared_error


class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147).

    π = x W_enc + b_enc (the recipe does not subtract b_dec: ``apply_b_dec_to_input``),
    f = π ⊙ H(π − θ), L = ‖x − x̂‖² + λ Σ_i H(π_i − θ_i), with the rectangle-kernel
    straight-through estimators of ``act.jumprelu`` and ``act.heaviside_step`` (bandwidth ε).
    θ is trained as log θ (``theta_param='log'``, the paper) or raw (``'raw'``, SAELens PR
    #718; projected to θ ≥ 0 after each step like SAELens). Decoder rows are held at unit
    norm, as dictionary_learning ``trainers/jumprelu.py`` does (gradient projection and
    renormalization); the L0 penalty does not depend on decoder norms, so the constraint
    only fixes the scale between f and W_dec (SAELens trains free norms instead).
    """

    name: ClassVar[str] = "jumprelu"
    penalties: ClassVar[tuple[str, ...]] = ("l0",)
    saelens: ClassVar[str | None] = "jumprelu"
    # JumpReLU / Gemma Scope: L0 penalty, betas (0, .999). The papers use theta_0 = eps = 1e-3 at
    # E||x||^2 = 1 over billions of tokens; with eps = 1e-3 a run of a few million tokens sees too few
    # pre-activations inside the kernel window to move theta (measured on synthetic data: MMCS 0.59
    # against 0.87-0.91 with 1e-2), so the default is 1e-2; set model.jumprelu_eps=1e-3 for the paper's.
    recipe: ClassVar[dict] = {"penalty": "l0", "coefficient": 0.03, "lr": 1e-3, "beta1": 0.0, "jumprelu_eps": 1e-2,
                              "jumprelu_theta_init": 1e-2, "jumprelu_theta_param": "log",
                              "apply_b_dec_to_input": False}
    options: ClassVar[dict] = {
        "jumprelu_eps": ("eps", "positive float",
                         "JumpReLU STE kernel bandwidth epsilon, in units of normalized activations (E||x||^2 = 1)."),
        "jumprelu_theta_init": ("theta_init", "positive float",
                                "JumpReLU initial threshold theta_0, in units of normalized activations."),
        "jumprelu_theta_param": ("theta_param", ["log", "raw"],
                                 "How theta is trained: 'log' (the paper) or 'raw' (SAELens PR #718)."),
    }
    hyper: ClassVar[dict] = {"eps": 1e-3, "theta_init": 1e-3, "theta_param": "log"}
    axes: ClassVar[dict] = {"log_threshold": ("latent",)}
    saelens_tensors: ClassVar[tuple[str, ...]] = (*BASE_TENSORS, "threshold")
    summary_fields: ClassVar[tuple[str, ...]] = ("penalty", "eps")

    def init_params(self, key, sample=None):
        p = super().init_params(key, sample)
        theta = jnp.full((self.d_sae,), self.theta_init, jnp.float32)
        return dict(p, log_threshold=jnp.log(theta) if self.theta_param == "log" else theta)

    def threshold(self) -> jax.Array:
        """theta, from its log or raw parameterization."""
        return self.theta_of(self.log_threshold[...])

    def theta_of(self, t):
        """theta from the stored parameter ``log_threshold`` (its log, or itself when raw)."""
        return jnp.exp(t) if self.theta_param == "log" else t

    def encode(self, x):
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold())

    def forward(self, x):
        pre = self.pre_acts(x)
        theta = self.threshold()
        f = act.jumprelu(pre, theta, self.eps)
        x_hat = self.decode(f)
        l0 = jnp.mean(jnp.sum(act.heaviside_step(pre, theta, self.eps), axis=-1))
        return Output(x_hat, f, squared_error(x, x_hat), l0, jnp.zeros(()), {})

    def constrain_params(self, params):
        params = super().constrain_params(params)
        if self.theta_param == "raw":  # below 0 the gate would pass negative pre-activations
            params = dict(params, log_threshold=jnp.maximum(params["log_threshold"], 0.0))
        return params

    def fold_scale(self, params, stats, scale):
        params, stats = super().fold_scale(params, stats, scale)
        t = params["log_threshold"]
        t = t - jnp.log(scale) if self.theta_param == "log" else t / scale
        return dict(params, log_threshold=t), stats

    def fold_decoder_norms(self, params):
        out = super().fold_decoder_norms(params)
        n = decoder_norms(params["W_dec"])
        t = np.asarray(params["log_threshold"], np.float64)
        out["log_threshold"] = (t + np.log(n) if self.theta_param == "log" else t * n).astype(np.float32)
        return out

    def adopt(self, other, params):
        if other.theta_param == self.theta_param:
            return params
        t = params["log_threshold"]
        return dict(params, log_threshold=jnp.log(t) if self.theta_param == "log" else jnp.exp(t))

    @classmethod
    def import_saelens(cls, cfg, tensors, cfg_int):
        return tensors, ["model.jumprelu_theta_param=raw"], []  # raw: theta kept bit-exact

    def to_saelens(self, params, stats):
        theta = np.asarray(jax.jit(self.theta_of)(params["log_threshold"]))  # what encode compares against
        return {**{k: params[k] for k in BASE_TENSORS}, "threshold": theta}, {}

    def from_saelens(self, tensors):
        params, stats = super().from_saelens(tensors)
        theta = tensors["threshold"]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_t = np.log(theta) if self.theta_param == "log" else theta
        return {**params, "log_threshold": np.asarray(log_t, np.float32)}, stats

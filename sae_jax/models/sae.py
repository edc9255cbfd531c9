"""The SAE architectures behind one interface.

Each architecture is a frozen dataclass of static hyper-parameters with pure methods over a
parameter dict (a pytree of arrays named as in the papers: W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d], ...):

- ``init(key, sample)`` -> params, ``init_stats()`` -> latent statistics;
- ``encode(params, x, stats)`` -> f [B, m] (inference code), ``decode(params, f)`` -> x_hat;
- ``forward(params, x, stats)`` -> ``Output`` (the training pass: code, reconstruction and
  the loss terms); ``loss`` combines them with the sparsity coefficient;
- ``constrain_grads`` / ``constrain_params`` (unit-norm decoder rows where the recipe has
  them), ``update_stats`` (dead-latent counters, BatchTopK threshold), ``fold_scale``
  (fold the activation normalization into the parameters);
- ``param_axes()`` -> logical axis names per parameter, for ``sharding.py``.

The training step, the sweep and the export need no per-architecture branches: they call
these methods through ``make_sae``. No mesh or file is seen here.

Speed: the encoder input x − b_dec is never formed where gradients flow
(``act.encoder_pre``), so a dense step costs the 10·B·d·m FLOPs of its five matmuls and no
[B, d] input cotangent; TopK and BatchTopK select, decode and differentiate sparsely
(``act.sparse_encode``, ``act.decode_code``), leaving the encoder forward as their one dense
matmul. Sources and choices per architecture are in the class docstrings and in
shared/ALGORITHMS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.eval import metrics
from sae_jax.models import activations as act
from sae_jax.models import init as init_lib

Params = dict[str, jax.Array]
Stats = dict[str, jax.Array]
INT_CAP = 2**30  # tokens_since_fired saturates here (int32 counters)
SQRT_L1_EPS = 1e-6  # ProLU's sqrt(f + eps): the author's eps, bounding the gradient at f -> 0


class Output(NamedTuple):
    """What one training forward pass produces."""

    x_hat: jax.Array
    """Reconstruction [B, d]."""
    f: jax.Array
    """Latent code [B, m] (dense, for metrics and firing statistics)."""
    recon: jax.Array
    """Reconstruction loss (scalar)."""
    sparsity: jax.Array
    """Sparsity penalty before the coefficient (scalar)."""
    aux: jax.Array
    """Auxiliary loss, already weighted (gated's aux term, AuxK); 0 where none."""
    extras: dict[str, jax.Array]
    """Architecture-specific values: 'fired' ([m] bool) and 'l0' where the code is sparse, so
    that the step need not form the dense ``f``; BatchTopK's 'min_kept'."""


def squared_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """||x - x_hat||^2 summed over d and averaged over the batch."""
    return jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1))


def normalized_mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch (Gao et al. 2024)."""
    return jnp.sum(jnp.square(x - x_hat)) / jnp.maximum(jnp.sum(jnp.square(x - jnp.mean(x, 0))), 1e-12)


def unit_rows(W: jax.Array) -> jax.Array:
    """Rows rescaled to unit norm."""
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)


def remove_parallel_grad(W: jax.Array, g: jax.Array) -> jax.Array:
    """The decoder gradient without its component along each (unit-norm) row."""
    Wn = unit_rows(W)
    return g - jnp.sum(g * Wn, axis=-1, keepdims=True) * Wn


@dataclass(frozen=True)
class SAE:
    """The ReLU SAE, whose common parts the other architectures specialise.

    f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec, L = ‖x − x̂‖² + λ Σ_i f_i
    (``l1``: Towards Monosemanticity, unit-norm decoder rows by gradient projection and
    renormalization) or λ Σ_i f_i ‖W_dec,i‖ (``l1_decoder_norm``: Anthropic April 2024, free
    decoder norms). dictionary_learning ``trainers/standard.py``; SAELens ``standard_sae.py``.
    """

    d_model: int
    d_sae: int
    penalty: str = "l1"
    init_decoder_norm: float = 1.0
    init_b_dec: str = "zeros"
    apply_b_dec_to_input: bool = True
    dead_tokens: int = 10_000_000
    name: ClassVar[str] = "relu"

    # ------------------------------------------------------------------ structure
    def param_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axis names of every parameter and statistic."""
        return {
            "W_enc": ("embed", "latent"),
            "b_enc": ("latent",),
            "W_dec": ("latent", "embed"),
            "b_dec": ("embed",),
            "tokens_since_fired": ("latent",),
            "threshold": (),
            "log_threshold": ("latent",),
            "r_mag": ("latent",),
            "b_gate": ("latent",),
            "b_mag": ("latent",),
        }

    @property
    def unit_norm_decoder(self) -> bool:
        """Decoder rows held at unit norm (gradient projection + renormalization)."""
        return self.penalty != "l1_decoder_norm"

    bias_names: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")

    # ------------------------------------------------------------------ init
    def init(self, key: jax.Array, sample: jax.Array | None = None) -> Params:
        """W_dec rows random directions (norm ``init_decoder_norm``), W_enc = W_dec^T."""
        W_dec = init_lib.decoder_rows(key, self.d_sae, self.d_model, self.init_decoder_norm)
        return {
            "W_enc": init_lib.tied_encoder(W_dec),
            "b_enc": jnp.zeros((self.d_sae,), jnp.float32),
            "W_dec": W_dec,
            "b_dec": init_lib.initial_b_dec(self.init_b_dec, self.d_model, sample),
        }

    def init_stats(self) -> Stats:
        """Per-latent counters kept in the training state."""
        return {"tokens_since_fired": jnp.zeros((self.d_sae,), jnp.int32)}

    # ------------------------------------------------------------------ pieces
    def input_bias(self, params: Params) -> jax.Array:
        """What the encoder subtracts from x: b_dec, or zeros where the recipe does not."""
        return params["b_dec"] if self.apply_b_dec_to_input else jnp.zeros_like(params["b_dec"])

    def project(self, params: Params, x: jax.Array) -> jax.Array:
        """(x − b_dec) W_enc without the encoder bias (b_dec's gradient the cheap way: act.encoder_pre)."""
        return act.encoder_pre(x, params["W_enc"], jnp.zeros((), x.dtype), self.input_bias(params))

    def pre_acts(self, params: Params, x: jax.Array) -> jax.Array:
        """Encoder pre-activations (x − b_dec) W_enc + b_enc."""
        return act.encoder_pre(x, params["W_enc"], params["b_enc"], self.input_bias(params))

    def encode(self, params: Params, x: jax.Array, stats: Stats | None = None) -> jax.Array:
        """The latent code used at inference."""
        return jax.nn.relu(self.pre_acts(params, x))

    def decode(self, params: Params, f: jax.Array) -> jax.Array:
        """x_hat = f W_dec + b_dec."""
        return act.decoder_matmul(f, params["W_dec"]) + params["b_dec"]

    def decoder_norms(self, params: Params) -> jax.Array:
        """||W_dec,i|| for every latent."""
        return jnp.linalg.norm(params["W_dec"], axis=-1)

    def l1(self, params: Params, f: jax.Array) -> jax.Array:
        """sum_i f_i (l1) or sum_i f_i ||W_dec,i|| (l1_decoder_norm), batch mean."""
        if self.penalty == "l1_decoder_norm":
            f = f * self.decoder_norms(params)
        return jnp.mean(jnp.sum(f, axis=-1))

    # ------------------------------------------------------------------ training pass
    def forward(self, params: Params, x: jax.Array, stats: Stats) -> Output:
        """Training forward pass: code, reconstruction and loss terms."""
        f = self.encode(params, x, stats)
        x_hat = self.decode(params, f)
        zero = jnp.zeros((), jnp.float32)
        return Output(x_hat, f, squared_error(x, x_hat), self.l1(params, f), zero, {})

    def loss(self, params: Params, x: jax.Array, coefficient: jax.Array, stats: Stats):
        """Total loss = recon + coefficient * sparsity + aux, with the Output as aux data."""
        out = self.forward(params, x, stats)
        return out.recon + coefficient * out.sparsity + out.aux, out

    # ------------------------------------------------------------------ constraints
    def constrain_grads(self, params: Params, grads: Params) -> Params:
        """Remove the decoder gradient's component parallel to each row (unit-norm recipes)."""
        if not self.unit_norm_decoder:
            return grads
        return dict(grads, W_dec=remove_parallel_grad(params["W_dec"], grads["W_dec"]))

    def constrain_params(self, params: Params) -> Params:
        """Renormalize decoder rows after the optimizer step (unit-norm recipes)."""
        if not self.unit_norm_decoder:
            return params
        return dict(params, W_dec=unit_rows(params["W_dec"]))

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def fired(out: Output) -> jax.Array:
        """[m] bool: the latents that fired on this batch.

        Every architecture's code is non-negative, so a latent fired where its batch sum is
        positive: one matrix-vector product over f (``act.batch_sum``), about three times
        faster on CPU than a column reduction of a firing mask.
        """
        return out.extras["fired"] if "fired" in out.extras else act.batch_sum(out.f) > 0

    @staticmethod
    def l0(out: Output) -> jax.Array:
        """Mean number of nonzero latents per token (from the sparse code where there is one)."""
        return out.extras["l0"] if "l0" in out.extras else metrics.l0(out.f)

    def update_stats(self, stats: Stats, out: Output) -> Stats:
        """Advance the tokens-since-fired counters by one batch."""
        fired = self.fired(out)
        n = out.x_hat.shape[0]
        since = jnp.minimum(stats["tokens_since_fired"] + n, INT_CAP)
        return dict(stats, tokens_since_fired=jnp.where(fired, 0, since).astype(jnp.int32))

    def dead_mask(self, stats: Stats) -> jax.Array:
        """Latents that have not fired for ``dead_tokens`` tokens."""
        return stats["tokens_since_fired"] >= self.dead_tokens

    # ------------------------------------------------------------------ normalization
    def fold_scale(self, params: Params, stats: Stats, scale: float) -> tuple[Params, Stats]:
        """Parameters for raw activations, when training saw x * scale.

        Every architecture here is positively homogeneous in (x, biases, thresholds), so
        dividing biases and thresholds by ``scale`` gives x_hat(x_raw) = x_hat_n / scale.
        """
        params = {k: (v / scale if k in self.bias_names else v) for k, v in params.items()}
        return params, stats


@dataclass(frozen=True)
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

    aux_coefficient: float = 1.0
    name: ClassVar[str] = "gated"
    bias_names: ClassVar[tuple[str, ...]] = ("b_gate", "b_mag", "b_dec")

    def init(self, key, sample=None):
        p = super().init(key, sample)
        b = p.pop("b_enc")
        return dict(p, b_gate=b, b_mag=jnp.zeros_like(b), r_mag=jnp.zeros_like(b))

    def gate_and_mag(self, params: Params, x: jax.Array):
        """pi_gate = (x - b_dec) W_gate + b_gate; pi_mag = (x - b_dec)(W_gate * exp(r_mag)) + b_mag."""
        h = self.project(params, x)
        return h + params["b_gate"], h * jnp.exp(params["r_mag"]) + params["b_mag"]

    def pre_acts(self, params, x):
        """The gate's pre-activations π_gate (what decides which latents fire)."""
        return self.gate_and_mag(params, x)[0]

    def code_and_gate(self, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(f, ReLU(π_gate)): f = H(π_gate) ⊙ ReLU(π_mag), with ``act.gated_code``'s VJP."""
        return act.gated_code(x, params["W_enc"], params["b_gate"], params["r_mag"], params["b_mag"],
                              self.input_bias(params))

    def encode(self, params, x, stats=None):
        return self.code_and_gate(params, x)[0]

    def forward(self, params, x, stats):
        f, gate = self.code_and_gate(params, x)
        x_hat = self.decode(params, f)
        sparsity = self.l1(params, gate)
        # The aux term trains the gate path to reconstruct through a frozen decoder.
        frozen = gate @ jax.lax.stop_gradient(params["W_dec"]) + jax.lax.stop_gradient(params["b_dec"])
        aux = self.aux_coefficient * squared_error(x, frozen)
        return Output(x_hat, f, squared_error(x, x_hat), sparsity, aux, {})

    def l1(self, params, f):
        if self.penalty == "l1_decoder_norm":
            f = f * jax.lax.stop_gradient(self.decoder_norms(params))
        return jnp.mean(jnp.sum(f, axis=-1))


@dataclass(frozen=True)
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

    eps: float = 1e-3
    theta_init: float = 1e-3
    theta_param: str = "log"
    name: ClassVar[str] = "jumprelu"

    def init(self, key, sample=None):
        p = super().init(key, sample)
        theta = jnp.full((self.d_sae,), self.theta_init, jnp.float32)
        return dict(p, log_threshold=jnp.log(theta) if self.theta_param == "log" else theta)

    def threshold(self, params: Params) -> jax.Array:
        """theta, from its log or raw parameterization."""
        t = params["log_threshold"]
        return jnp.exp(t) if self.theta_param == "log" else t

    def encode(self, params, x, stats=None):
        pre = self.pre_acts(params, x)
        return pre * (pre > self.threshold(params))

    def forward(self, params, x, stats):
        pre = self.pre_acts(params, x)
        theta = self.threshold(params)
        f = act.jumprelu(pre, theta, self.eps)
        x_hat = self.decode(params, f)
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


@dataclass(frozen=True)
class TopKSAE(SAE):
    """TopK SAE with AuxK (Gao et al. 2024, arXiv 2406.04093); sparse encoder backward and decode.

    z = ReLU(TopK_k((x − b_dec) W_enc + b_enc)), L = ‖x − x̂‖² / ‖x − mean x‖² (batch) +
    α ‖e − ê‖² / ‖e − mean e‖², e = sg(x − x̂), ê the decode (no bias) of each token's top
    ``k_aux`` pre-activations among the dead latents (openai/sparse_autoencoder
    ``train.py``: ``normalized_mse`` of the AuxK reconstruction; dead = no activation for
    ``dead_tokens`` tokens). The AuxK term is skipped while no latent is dead.
    """

    k: int = 32
    k_aux: int = 256
    aux_coefficient: float = 1 / 32
    latent_groups: int = 1
    """Slices of the latent axis for a two-stage top-k (``act.grouped_top_k``): the loop sets the
    model-axis size, so the first stage stays on each device. Every value gives the same result."""
    name: ClassVar[str] = "topk"
    batch_select: ClassVar[bool] = False

    def encode(self, params, x, stats=None):
        values, idx = act.topk_select(self.pre_acts(params, x), self.k, self.latent_groups)
        return act.densify(values, idx, self.d_sae)

    def sparse_codes(self, params: Params, x: jax.Array, stats: Stats) -> tuple[act.SparseCode, act.SparseCode]:
        """The kept code and AuxK's dead-latent code, from one encoder matmul."""
        k_aux = self.k_aux if self.aux_coefficient else 0
        return act.sparse_encode(x, params["W_enc"], params["b_enc"], self.input_bias(params), self.dead_mask(stats),
                                 self.k, k_aux, self.batch_select, self.latent_groups)

    def forward(self, params, x, stats):
        code, aux_code = self.sparse_codes(params, x, stats)
        n = x.shape[0]
        x_hat, recon = self.reconstruction(params, x, code)
        aux = self.auxk(params, x, x_hat, aux_code, stats)
        kept = jax.lax.stop_gradient(code)
        f = act.densify_code(kept, n, self.d_sae)
        on = kept.values > 0
        fired = jnp.zeros((self.d_sae,), bool).at[kept.cols].max(on)
        extras = {"fired": fired, "l0": jnp.sum(on) / n, **self.code_extras(kept)}
        return Output(x_hat, f, recon, jnp.zeros(()), aux, extras)

    def reconstruction(self, params: Params, x: jax.Array, code: act.SparseCode) -> tuple[jax.Array, jax.Array]:
        """(x̂, reconstruction loss) of the kept code: a sparse decode and the normalized MSE."""
        x_hat = act.decode_code(code, params["W_dec"], x.shape[0]) + params["b_dec"]
        return x_hat, normalized_mse(x, x_hat)

    def code_extras(self, code: act.SparseCode) -> dict[str, jax.Array]:
        """Values ``update_stats`` needs from the kept code (none for TopK)."""
        return {}

    def auxk(self, params: Params, x: jax.Array, x_hat: jax.Array, aux_code: act.SparseCode,
             stats: Stats) -> jax.Array:
        """alpha * ||e - e_hat||^2 / ||e - mean e||^2, e_hat from the top-k_aux dead latents."""
        if self.aux_coefficient == 0:
            return jnp.zeros(())
        dead = self.dead_mask(stats)

        def loss(x_hat, aux_code):
            e = jax.lax.stop_gradient(x - x_hat)
            e_hat = act.decode_code(aux_code, params["W_dec"], x.shape[0])
            return self.aux_coefficient * jnp.nan_to_num(normalized_mse(e, e_hat))

        return jax.lax.cond(jnp.any(dead), loss, lambda *_: jnp.zeros((), x.dtype), x_hat, aux_code)


@dataclass(frozen=True)
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

    threshold_momentum: float = 0.99
    name: ClassVar[str] = "batchtopk"
    batch_select: ClassVar[bool] = True

    def init_stats(self):
        return dict(super().init_stats(), threshold=jnp.asarray(-1.0, jnp.float32))

    def encode(self, params, x, stats=None):
        acts = jax.nn.relu(self.pre_acts(params, x))
        return jnp.where(acts > stats["threshold"], acts, 0.0)

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


@dataclass(frozen=True)
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024).

    BatchTopK's selection, threshold and AuxK over the whole dictionary; the reconstruction
    loss is summed over nested prefixes of the latents: with widths w_1 < … < w_G = m,
    L = Σ_g ‖x − x̂_g‖² / ‖x − mean x‖² (batch) + AuxK, x̂_g = Σ_{kept i < w_g} f_i W_dec,i + b_dec
    (SAELens ``matryoshka_batchtopk_sae.py`` sums the same per-level losses, as plain MSE).
    Each level is a sparse decode of the kept latents below its width (B·k·d FLOPs); the
    model used at inference is the full width, so export and encode are BatchTopK's.
    """

    widths: tuple[int, ...] = ()
    name: ClassVar[str] = "matryoshka"

    def __post_init__(self):
        w = tuple(self.widths) or default_matryoshka_widths(self.d_sae)
        if any(b <= a for a, b in zip(w, w[1:], strict=False)) or w[0] <= 0 or w[-1] != self.d_sae:
            raise ValueError(f"model.matryoshka_widths={list(w)} must increase strictly from a positive width to "
                             f"model.d_sae={self.d_sae}.")
        object.__setattr__(self, "widths", w)

    def reconstruction(self, params, x, code):
        """x̂ of the whole dictionary, and the normalized MSE summed over every nested prefix: x̂_g
        decodes the kept latents below w_g (plus b_dec)."""
        levels = [act.decode_code(code._replace(values=jnp.where(code.cols < width, code.values, 0.0)),
                                  params["W_dec"], x.shape[0]) + params["b_dec"] for width in self.widths]
        return levels[-1], sum(normalized_mse(x, level) for level in levels)


def default_matryoshka_widths(d_sae: int) -> tuple[int, ...]:
    """d_sae/16, /8, /4, /2 and d_sae (fewer where d_sae is small)."""
    return tuple(sorted({max(1, d_sae >> s) for s in range(4, -1, -1)}))


@dataclass(frozen=True)
class ProLUSAE(SAE):
    """ProLU SAE (Taggart 2024, "ProLU: A Nonlinearity for Sparse Autoencoders").

    With m = (x − b_dec) W_enc: f = m · H(m + b_enc) · H(m), the bias gates but never shifts
    the magnitude; gradients by ``act.prolu_ste`` or ``act.prolu_relu``. Penalties: ``l1``
    and ``sqrt_l1`` = Σ_i √f_i, computed as the author's √(f_i + 1e-6) (nqgl/scsae
    ``trainer/config.py`` ``sparsity_penalty`` 'l1_sqrt'), minus its value at 0.
    """

    estimator: str = "ste"
    name: ClassVar[str] = "prolu"

    def prolu(self, params: Params, x: jax.Array) -> jax.Array:
        fn = act.prolu_ste if self.estimator == "ste" else act.prolu_relu
        return fn(self.project(params, x), params["b_enc"])

    def pre_acts(self, params, x):
        """min(m, m + b_enc): a latent fires exactly where this is positive."""
        m = self.project(params, x)
        return jnp.minimum(m, m + params["b_enc"])

    def encode(self, params, x, stats=None):
        return act.prolu_reference(self.project(params, x), params["b_enc"])

    def forward(self, params, x, stats):
        f = self.prolu(params, x)
        x_hat = self.decode(params, f)
        return Output(x_hat, f, squared_error(x, x_hat), self.l1(params, f), jnp.zeros(()), {})

    def l1(self, params, f):
        if self.penalty != "sqrt_l1":
            return super().l1(params, f)
        root = jnp.sqrt(jax.nn.relu(f) + SQRT_L1_EPS) - jnp.sqrt(SQRT_L1_EPS)
        return jnp.mean(jnp.sum(root, axis=-1))


REGISTRY: dict[str, type[SAE]] = {
    cls.name: cls for cls in (SAE, GatedSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, ProLUSAE)
}

_SUMMARY_FIELDS = ("d_model", "d_sae", "penalty", "k", "widths", "eps", "estimator")


def _summary(self: SAE) -> str:
    """A short summary: the class, the widths and what tells the architecture's runs apart."""
    parts = []
    for name in _SUMMARY_FIELDS:
        if not hasattr(self, name):
            continue
        value = getattr(self, name)
        if name == "widths" and len(value) > 4:
            parts.append(f"widths=({value[0]}, {value[1]}, ..., {value[-1]})")
        else:
            parts.append(f"{name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


for _cls in REGISTRY.values():  # each @dataclass wrote its own __repr__ (every field); one short one for all
    _cls.__repr__ = _summary


def make_sae(model: Any, penalty: str, dead_tokens: int = 10_000_000) -> SAE:
    """Build the architecture named by ``model.architecture`` from a resolved ModelConfig."""
    cls = REGISTRY[model.architecture]
    common = dict(
        d_model=model.d_model, d_sae=model.d_sae, penalty=penalty, init_decoder_norm=model.init_decoder_norm,
        init_b_dec=model.init_b_dec, apply_b_dec_to_input=model.apply_b_dec_to_input, dead_tokens=dead_tokens,
    )
    extra = {
        "gated": dict(aux_coefficient=model.aux_coefficient),
        "jumprelu": dict(eps=model.jumprelu_eps, theta_init=model.jumprelu_theta_init,
                         theta_param=model.jumprelu_theta_param),
        "topk": dict(k=model.k, k_aux=model.k_aux, aux_coefficient=model.aux_coefficient),
        "batchtopk": dict(k=model.k, k_aux=model.k_aux, aux_coefficient=model.aux_coefficient,
                          threshold_momentum=model.threshold_momentum),
        "matryoshka": dict(k=model.k, k_aux=model.k_aux, aux_coefficient=model.aux_coefficient,
                           threshold_momentum=model.threshold_momentum, widths=tuple(model.matryoshka_widths or ())),
        "prolu": dict(estimator=model.prolu_estimator),
    }.get(model.architecture, {})
    return cls(**common, **extra)

"""The ReLU SAE, as a Flax NNX module, and what every architecture inherits from it.

Each architecture is an ``nnx.Module`` (one module of ``models/`` each; ``models/__init__``
finds them). Its parameters are ``nnx.Param`` named as in the papers (W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d], ...) and its per-latent statistics are ``Stat`` variables, each
with logical sharding names (``embed``, ``latent``) as Flax ``out_sharding`` metadata, so
``nnx.get_partition_spec`` under ``nnx.logical_axis_rules(sharding.RULES)`` lays it out.
From any Flax code: ``sae = TopKSAE(768, 16384, k=32, rngs=nnx.Rngs(0))``, ``sae(x)``,
``sae.encode(x)``, ``sae.decode(f)``.

Training stays a pure function of plain dicts (``params``, ``stats``): ``loss`` merges them
into the module (``nnx.merge``, at trace time only) and runs ``forward``; ``init_params``,
``constrain_grads``, ``constrain_params``, ``update_stats`` and ``fold_scale`` map dicts to
dicts. The step, the sweep and the export call these and never branch on names.

The class is also the one place that declares, as plain literals that ``config.py`` reads
from this file's source without importing jax: ``name``, ``penalties`` (those it accepts),
``uses_k``, ``recipe`` (defaults of config fields left at null, merged down the
class tree), ``options`` (its own ``model.*`` config fields: hyper-parameter, type, doc) and
``saelens`` (the SAELens architecture its export is, or null).

Speed: the encoder input x − b_dec is never formed where gradients flow
(``act.encoder_pre``), so a dense step costs the 10·B·d·m FLOPs of its five matmuls and no
[B, d] input cotangent. Sources and choices per architecture are in the class docstrings
and in shared/ALGORITHMS.md.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.eval import metrics
from sae_jax.models import activations as act
from sae_jax.models import init as init_lib

Params = dict[str, jax.Array]
Stats = dict[str, jax.Array]
BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
INT_CAP = 2**30  # tokens_since_fired saturates here (int32 counters)


class Stat(nnx.Variable):
    """A per-latent statistic the training state carries but no optimizer trains."""


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


def merged(cls: type, attr: str) -> dict:
    """A dict class attribute merged down the class tree (a subclass's entries win)."""
    out: dict = {}
    for base in reversed(cls.__mro__):
        out.update(base.__dict__.get(attr, {}))
    return out


@functools.lru_cache(maxsize=256)
def _graphdef(cls: type, d_model: int, d_sae: int, hyper: tuple) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: cls(d_model, d_sae, **dict(hyper))))


class SAE(nnx.Module):
    """The ReLU SAE, whose common parts the other architectures specialise.

    f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec, L = ‖x − x̂‖² + λ Σ_i f_i
    (``l1``: Towards Monosemanticity, unit-norm decoder rows by gradient projection and
    renormalization) or λ Σ_i f_i ‖W_dec,i‖ (``l1_decoder_norm``: Anthropic April 2024, free
    decoder norms). dictionary_learning ``trainers/standard.py``; SAELens ``standard_sae.py``.
    """

    name: ClassVar[str] = "relu"
    penalties: ClassVar[tuple[str, ...]] = ("l1", "l1_decoder_norm")
    uses_k: ClassVar[bool] = False
    saelens: ClassVar[str | None] = "standard"
    # Coefficients are for activations normalized to E||x||^2 = 1 (data.normalize). Measured on synthetic
    # data (d 32, 96 true features, 4 per token, d_sae 192; tests/models/): each recovers the features
    # (MMCS 0.89-0.99) with L0 near the true 4 (relu's L1 leaves ~12) in 1.5M tokens at lr 3e-3 or 8M at 1e-3.
    # Towards Monosemanticity (l1) / Anthropic April 2024 (l1_decoder_norm).
    recipe: ClassVar[dict] = {
        "penalty": "l1", "coefficient": 0.2, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "aux_coefficient": 0.0,
        "init_decoder_norm": 1.0, "grad_clip": 0.0, "init_b_dec": "geometric_median", "apply_b_dec_to_input": True,
    }
    options: ClassVar[dict] = {}
    hyper: ClassVar[dict] = {"penalty": "l1", "init_decoder_norm": 1.0, "init_b_dec": "zeros",
                             "apply_b_dec_to_input": True, "dead_tokens": 10_000_000}
    """Static hyper-parameters (constructor keywords) and their defaults, merged down the class tree."""
    axes: ClassVar[dict] = {"W_enc": ("embed", "latent"), "b_enc": ("latent",), "W_dec": ("latent", "embed"),
                            "b_dec": ("embed",), "tokens_since_fired": ("latent",)}
    """Logical axis names of each parameter and statistic, merged down the class tree."""
    bias_names: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")
    """Per-latent biases and b_dec: divided by the normalization scale when it is folded in."""
    folds_decoder_norms: ClassVar[bool] = True
    saelens_import: ClassVar[bool] = True
    """A SAELens ``saelens`` folder that sae_jax did not write imports as this class."""
    saelens_tensors: ClassVar[tuple[str, ...]] = BASE_TENSORS
    """The weights a SAELens ``saelens`` folder holds."""
    summary_fields: ClassVar[tuple[str, ...]] = ("penalty",)

    def __init__(self, d_model: int, d_sae: int, *, rngs: nnx.Rngs | None = None, sample: jax.Array | None = None,
                 **hyper: Any):
        """The module with fresh parameters (``rngs.params()``, default key 0; ``sample`` for b_dec's init)."""
        known = merged(type(self), "hyper")
        unknown = sorted(set(hyper) - set(known))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no hyper-parameter {', '.join(unknown)}; it takes "
                            f"{', '.join(known)}.")
        self.d_model, self.d_sae = int(d_model), int(d_sae)
        for key, value in {**known, **hyper}.items():
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        self.check()
        key = rngs.params() if rngs is not None else jax.random.key(0)
        for kind, values in ((nnx.Param, self.constrain_params(self.init_params(key, sample))),
                             (Stat, self.init_stats())):
            for name, value in values.items():
                setattr(self, name, kind(value, out_sharding=self.param_axes()[name], eager_sharding=False))

    def check(self) -> None:
        """Reject inconsistent hyper-parameters (one sentence naming the config key)."""

    # ------------------------------------------------------------------ structure
    @classmethod
    def param_axes(cls) -> dict[str, tuple[str | None, ...]]:
        """Logical axis names of every parameter and statistic."""
        return merged(cls, "axes")

    @classmethod
    def hyper_names(cls) -> tuple[str, ...]:
        """The constructor's hyper-parameter keywords."""
        return tuple(merged(cls, "hyper"))

    @classmethod
    def all_options(cls) -> dict[str, tuple]:
        """This architecture's own ``model.*`` config fields -> (hyper-parameter, type, doc)."""
        return merged(cls, "options")

    def hyperparameters(self) -> dict[str, Any]:
        """The static hyper-parameters, as constructor keywords."""
        return {k: getattr(self, k) for k in merged(type(self), "hyper")}

    def spec(self) -> dict[str, Any]:
        """The architecture and its static hyper-parameters, JSON-serialisable."""
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hyperparameters().items()}
        return {"architecture": self.name, "d_model": self.d_model, "d_sae": self.d_sae, **hyper}

    def replace(self, **changes: Any) -> SAE:
        """An abstract module (shapes only) with some dimensions or hyper-parameters changed."""
        kw = {"d_model": self.d_model, "d_sae": self.d_sae, **self.hyperparameters(), **changes}
        return abstract(type(self), **kw)

    def __repr__(self) -> str:
        """A short summary: the class, the widths and what tells the architecture's runs apart."""
        parts = [f"d_model={self.d_model}", f"d_sae={self.d_sae}"]
        for name in self.summary_fields:
            value = getattr(self, name)
            text = f"({value[0]}, {value[1]}, ..., {value[-1]})" if isinstance(value, tuple) and len(value) > 4 \
                else repr(value)
            parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__

    @property
    def unit_norm_decoder(self) -> bool:
        """Decoder rows held at unit norm (gradient projection + renormalization)."""
        return self.penalty != "l1_decoder_norm"

    # ------------------------------------------------------------------ pure state (plain dicts)
    def init_params(self, key: jax.Array, sample: jax.Array | None = None) -> Params:
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

    def split(self) -> tuple[Params, Stats]:
        """This module's parameters and statistics as plain dicts."""
        _, params, stats = nnx.split(self, nnx.Param, Stat)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def bind(self, params: Params, stats: Stats | None = None) -> SAE:
        """The module holding ``params`` and ``stats`` (fresh statistics if None)."""
        key = (type(self), self.d_model, self.d_sae, tuple(self.hyperparameters().items()))
        return nnx.merge(_graphdef(*key), dict(params), dict(self.init_stats() if stats is None else stats))

    def loss(self, params: Params, x: jax.Array, coefficient: jax.Array, stats: Stats):
        """Total loss = recon + coefficient * sparsity + aux, with the Output as aux data."""
        out = self.bind(params, stats).forward(x)
        return out.recon + coefficient * out.sparsity + out.aux, out

    # ------------------------------------------------------------------ pieces (bound)
    def input_bias(self) -> jax.Array:
        """What the encoder subtracts from x: b_dec, or zeros where the recipe does not."""
        b_dec = self.b_dec[...]
        return b_dec if self.apply_b_dec_to_input else jnp.zeros_like(b_dec)

    def project(self, x: jax.Array) -> jax.Array:
        """(x − b_dec) W_enc without the encoder bias (b_dec's gradient the cheap way: act.encoder_pre)."""
        return act.encoder_pre(x, self.W_enc[...], jnp.zeros((), x.dtype), self.input_bias())

    def pre_acts(self, x: jax.Array) -> jax.Array:
        """Encoder pre-activations (x − b_dec) W_enc + b_enc."""
        return act.encoder_pre(x, self.W_enc[...], self.b_enc[...], self.input_bias())

    def encode(self, x: jax.Array) -> jax.Array:
        """The latent code used at inference."""
        return jax.nn.relu(self.pre_acts(x))

    def decode(self, f: jax.Array) -> jax.Array:
        """x_hat = f W_dec + b_dec."""
        return act.decoder_matmul(f, self.W_dec[...]) + self.b_dec[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        """The reconstruction x_hat = decode(encode(x))."""
        return self.decode(self.encode(x))

    def decoder_norms(self) -> jax.Array:
        """||W_dec,i|| for every latent."""
        return jnp.linalg.norm(self.W_dec[...], axis=-1)

    def l1(self, f: jax.Array) -> jax.Array:
        """sum_i f_i (l1) or sum_i f_i ||W_dec,i|| (l1_decoder_norm), batch mean."""
        if self.penalty == "l1_decoder_norm":
            f = f * self.decoder_norms()
        return jnp.mean(jnp.sum(f, axis=-1))

    def dead(self) -> jax.Array:
        """This module's dead latents (``dead_mask`` of its statistics)."""
        return self.dead_mask({"tokens_since_fired": self.tokens_since_fired[...]})

    # ------------------------------------------------------------------ training pass (bound)
    def forward(self, x: jax.Array) -> Output:
        """Training forward pass: code, reconstruction and loss terms."""
        f = self.encode(x)
        x_hat = self.decode(f)
        zero = jnp.zeros((), jnp.float32)
        return Output(x_hat, f, squared_error(x, x_hat), self.l1(f), zero, {})

    # ------------------------------------------------------------------ constraints (pure)
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

    # ------------------------------------------------------------------ statistics (pure)
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

    # ------------------------------------------------------------------ normalization and export (pure)
    def fold_scale(self, params: Params, stats: Stats, scale: float) -> tuple[Params, Stats]:
        """Parameters for raw activations, when training saw x * scale.

        Every architecture here is positively homogeneous in (x, biases, thresholds), so
        dividing biases and thresholds by ``scale`` gives x_hat(x_raw) = x_hat_n / scale.
        """
        params = {k: (v / scale if k in self.bias_names else v) for k, v in params.items()}
        return params, stats

    def fold_decoder_norms(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same SAE with unit-norm decoder rows (raw-space arrays, float64 arithmetic).

        The code is positively homogeneous per latent in (encoder column, bias, threshold), so
        scaling those by n_i = ‖W_dec,i‖ and W_dec,i by 1/n_i keeps every x̂. Architectures whose
        selection would change (TopK) set ``folds_decoder_norms = False`` and raise here.
        """
        if not self.folds_decoder_norms:
            raise ValueError(f"folding decoder norms changes which latents a {self.name} SAE selects; "
                             "renormalize its decoder instead.")
        return fold_norms(params, scaled=tuple(b for b in self.bias_names if b != "b_dec"))

    def adopt(self, other: SAE, params: Params) -> Params:
        """``params`` of ``other`` (same architecture, maybe other hyper-parameters) in this one's form."""
        return params

    def to_saelens(self, params: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(tensors, extra cfg.json keys) of the SAELens ``saelens`` architecture, from raw-space arrays."""
        return {k: params[k] for k in BASE_TENSORS}, {}

    @classmethod
    def import_saelens(cls, cfg: dict, tensors: dict[str, np.ndarray], cfg_int) -> tuple[dict, list[str], list[str]]:
        """For a SAELens ``saelens`` folder not written by us (``saelens_import``): its tensors as this class reads
        them, the config overrides that give SAELens's inference semantics, and notes. ``cfg_int(key)`` reads
        a positive integer of cfg.json."""
        penalty = "l1" if is_unit_norm(tensors["W_dec"]) else "l1_decoder_norm"
        return tensors, [f"sparsity.penalty={penalty}"], []

    def from_saelens(self, tensors: dict[str, np.ndarray]) -> tuple[Params, Stats]:
        """(params, stats) from the tensors ``to_saelens`` wrote (raw space)."""
        return {k: tensors[k] for k in BASE_TENSORS}, self.host_stats()

    def host_stats(self) -> dict[str, np.ndarray]:
        """Fresh statistics as numpy arrays."""
        return {k: np.asarray(v) for k, v in self.init_stats().items()}


def decoder_norms(W_dec: np.ndarray) -> np.ndarray:
    """||W_dec,i|| per latent in float64 (a zero row counts as norm 1, so it stays put)."""
    n = np.linalg.norm(np.asarray(W_dec, np.float64), axis=1)
    return np.where(n > 0, n, 1.0)


UNIT_NORM_ATOL = 1e-4
"""Decoder rows within this of norm 1 count as unit-norm (for an imported SAE's penalty)."""


def is_unit_norm(W_dec: np.ndarray, atol: float = UNIT_NORM_ATOL) -> bool:
    """Every decoder row has norm 1 within ``atol``."""
    return bool(np.all(np.abs(np.linalg.norm(np.asarray(W_dec, np.float64), axis=1) - 1.0) <= atol))


def fold_norms(tensors: dict[str, np.ndarray], scaled: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Unit-norm decoder rows with the same reconstruction (SAELens ``fold_W_dec_norm``).

    W_dec_i <- W_dec_i / n_i, W_enc[:, i] <- n_i W_enc[:, i] and every per-latent bias or
    threshold in ``scaled`` times n_i: latent i's activation becomes n_i f_i, its
    contribution f_i W_dec_i is unchanged (gated's r_mag is a log-scale and stays).
    """
    n = decoder_norms(tensors["W_dec"])
    out = {k: np.asarray(v) for k, v in tensors.items()}
    out["W_dec"] = (np.asarray(tensors["W_dec"], np.float64) / n[:, None]).astype(np.float32)
    out["W_enc"] = (np.asarray(tensors["W_enc"], np.float64) * n[None, :]).astype(np.float32)
    for k in scaled:
        if k in out:
            out[k] = (np.asarray(out[k], np.float64) * n).astype(np.float32)
    return out


def abstract(cls: type[SAE], d_model: int, d_sae: int, **hyper: Any) -> SAE:
    """The architecture as an abstract module (shapes only, no memory): what the training code holds."""
    return nnx.eval_shape(lambda: cls(d_model, d_sae, **hyper))

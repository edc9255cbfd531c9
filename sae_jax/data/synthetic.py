"""Synthetic activations with known ground-truth features in superposition.

The data model (Elhage et al. 2022, "Toy Models of Superposition"; Sharkey et al. 2022):
F > D unit-norm true directions g_i in R^D; each token activates feature i independently
with probability p_i, where p_i follows a power law (as feature frequencies do in real
models) scaled so that E[#active] = ``l0``; active magnitudes are positive; small isotropic
noise and a fixed mean offset are added. The dictionary G [F, D] is the ground truth that
MMCS is measured against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_jax.data import store as store_lib

CHUNK = 65536  # rows generated per draw; fixed so the data depends only on the seed


@dataclass(frozen=True)
class SynthSpec:
    """How a synthetic store is made (recorded in its metadata)."""

    d_model: int = 128
    n_features: int = 512
    n_tokens: int = 1_000_000
    seed: int = 0
    l0: float = 8.0
    """Expected number of active true features per token."""
    alpha: float = 0.7
    """Power-law exponent of feature frequencies: p_i proportional to (i + 1)^-alpha."""
    noise: float = 0.02
    """Standard deviation of the isotropic Gaussian noise per dimension."""
    offset: float = 0.3
    """Norm of a fixed mean vector added to every row (what b_dec learns)."""
    dtype: str = "float32"


def true_features(rng: np.random.Generator, n_features: int, d_model: int) -> np.ndarray:
    """F random unit-norm directions in R^D (rows)."""
    g = rng.standard_normal((n_features, d_model)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def feature_probs(n_features: int, l0: float, alpha: float) -> np.ndarray:
    """Per-feature firing probabilities: a power law with sum = l0 (each capped at 1)."""
    p = (np.arange(n_features) + 1.0) ** -alpha
    return np.minimum(p * (l0 / p.sum()), 1.0).astype(np.float32)


def sample_codes(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """[n, F] non-negative codes: Bernoulli(p_i) support, magnitudes ~ 0.5 + Exp(0.5)."""
    active = rng.random((n, probs.size), dtype=np.float32) < probs
    mags = 0.5 + rng.exponential(0.5, size=(n, probs.size)).astype(np.float32)
    return np.where(active, mags, 0.0).astype(np.float32)


def generate(spec: SynthSpec, start: int = 0):
    """Yield (rows [n, D] float32) chunks from row ``start`` on, the same rows whatever ``start``
    (earlier chunks are drawn, to advance the generator, but not computed); G comes from ``ground_truth``."""
    rng = np.random.default_rng(spec.seed)
    g, mean, probs = _model(rng, spec)
    for begin in range(0, spec.n_tokens, CHUNK):
        n = min(CHUNK, spec.n_tokens - begin)
        codes = sample_codes(rng, probs, n)
        noise = rng.standard_normal((n, spec.d_model), dtype=np.float32) * spec.noise
        if begin + n > start:
            yield (codes @ g + mean + noise)[max(0, start - begin):]


def ground_truth(spec: SynthSpec) -> np.ndarray:
    """The true dictionary G [F, D] of a spec."""
    return _model(np.random.default_rng(spec.seed), spec)[0]


def _model(rng: np.random.Generator, spec: SynthSpec):
    g = true_features(rng, spec.n_features, spec.d_model)
    direction = rng.standard_normal(spec.d_model).astype(np.float32)
    mean = spec.offset * direction / np.linalg.norm(direction)
    return g, mean, feature_probs(spec.n_features, spec.l0, spec.alpha)


def check_spec(spec: SynthSpec) -> None:
    """ValueError naming the flag (and SynthSpec field) of the first impossible setting."""
    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for flag, value in (("--d-model", spec.d_model), ("--n-tokens", spec.n_tokens)):
        if not positive_int(value):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}.")
    if not positive_int(spec.n_features) or spec.n_features <= spec.d_model:
        raise ValueError(f"--n-features ({spec.n_features}) must exceed --d-model ({spec.d_model}) "
                         "for features in superposition.")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or spec.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {spec.seed!r}.")
    if not isinstance(spec.l0, (int, float)) or not 0 < spec.l0 <= spec.n_features:
        raise ValueError(f"--l0 (active true features per token) must be in (0, --n-features = {spec.n_features}], "
                         f"got {spec.l0!r}.")
    for name, value, low in (("alpha", spec.alpha, None), ("noise", spec.noise, 0.0), ("offset", spec.offset, 0.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(f"SynthSpec.{name} must be a finite{' non-negative' if low is not None else ''} number, "
                             f"got {value!r}.")


def write_synthetic(out: str | Path, spec: SynthSpec, *, resume: bool = False,
                    overwrite: bool = False) -> store_lib.Store:
    """Write a finalized activation store with ``ground_truth.npy`` beside the arrays.

    ``resume=True`` continues an interrupted write of the same spec after its durable rows
    (the rows are the same as an uninterrupted write's); ``overwrite=True`` starts over.
    """
    check_spec(spec)
    source = {"model": "synthetic", "hook": "synthetic", "dataset": "sae_jax.data.synthetic",
              "context_size": 0, "synthetic": dataclasses.asdict(spec)}
    writer = store_lib.create_store(out, d_model=spec.d_model, dtype=spec.dtype, source=source, resume=resume,
                                    overwrite=overwrite)
    store_lib.check_resumed_source(writer, source)
    try:
        for rows in generate(spec, start=writer.n_written):
            writer.append(rows)
        writer.add_file(store_lib.GROUND_TRUTH_FILE, ground_truth(spec))
        return writer.finalize()
    except BaseException:
        writer.abandon()
        raise

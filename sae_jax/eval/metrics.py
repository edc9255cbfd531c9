"""Sparse-autoencoder metrics: pure, jittable batch statistics and their host-side totals.

Definitions follow ``shared/ALGORITHMS.md``: L0 (mean number of nonzero latents per token),
FVU = sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the whole evaluation set, dead and
dense fractions, the relative reconstruction bias gamma = E||x_hat||^2 / E<x, x_hat>
(Gated SAE paper eq. 10), and MMCS against a ground-truth dictionary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


def l0(f: jax.Array) -> jax.Array:
    """Mean over tokens of the number of nonzero latents (NaN if f has a NaN).

    Per-token counts are sums of sign(|f|) along the latents: exact in float32, and a row
    reduction that XLA fuses without writing a [B, m] mask.
    """
    return jnp.mean(jnp.sum(jnp.sign(jnp.abs(f)), axis=-1))


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Fraction of variance unexplained on one batch (the mean is the batch's own)."""
    err = jnp.sum(jnp.square(x - x_hat))
    var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))
    return err / var


class BatchSums(NamedTuple):
    """Additive statistics of one batch; summed over batches, they give the eval metrics."""

    n: jax.Array
    """Tokens in the batch."""
    sq_err: jax.Array
    """sum ||x - x_hat||^2."""
    sum_x: jax.Array
    """sum x, [d] (for the dataset mean in FVU)."""
    sum_sq_x: jax.Array
    """sum ||x||^2."""
    sq_x_hat: jax.Array
    """sum ||x_hat||^2 (numerator of gamma)."""
    x_dot_x_hat: jax.Array
    """sum <x, x_hat> (denominator of gamma)."""
    active: jax.Array
    """sum over tokens of the number of nonzero latents (L0 numerator)."""
    fired: jax.Array
    """[m] tokens on which each latent was nonzero."""


def batch_sums(x: jax.Array, x_hat: jax.Array, f: jax.Array) -> BatchSums:
    """The additive statistics of one batch."""
    x = x.astype(jnp.float32)
    nonzero = f != 0
    return BatchSums(
        n=jnp.asarray(x.shape[0], jnp.float32),
        sq_err=jnp.sum(jnp.square(x - x_hat)),
        sum_x=jnp.sum(x, axis=0),
        sum_sq_x=jnp.sum(jnp.square(x)),
        sq_x_hat=jnp.sum(jnp.square(x_hat)),
        x_dot_x_hat=jnp.sum(x * x_hat),
        active=jnp.sum(nonzero, dtype=jnp.float32),
        fired=jnp.sum(nonzero, axis=0, dtype=jnp.float32),
    )


def add_sums(total: BatchSums | None, batch: BatchSums) -> BatchSums:
    """Accumulate batch statistics on the host in float64 (exact enough for any eval size)."""
    batch = BatchSums(*(np.asarray(v, np.float64) for v in batch))
    if total is None:
        return batch
    return BatchSums(*(a + b for a, b in zip(total, batch, strict=True)))


def summarize(total: BatchSums) -> dict[str, float]:
    """Eval metrics from accumulated statistics."""
    n = float(total.n)
    centred = float(total.sum_sq_x) - float(np.sum(np.square(total.sum_x))) / n
    freq = total.fired / n
    return {
        "fvu": float(total.sq_err) / centred,
        "explained_variance": 1.0 - float(total.sq_err) / centred,
        "mse": float(total.sq_err) / n,
        "l0": float(total.active) / n,
        "dead_fraction": float(np.mean(freq == 0)),
        "dense_fraction": float(np.mean(freq > DENSE_THRESHOLD)),
        "gamma": float(total.sq_x_hat) / float(total.x_dot_x_hat),
        "tokens": int(n),
    }


def density_histogram(fired: np.ndarray, n_tokens: float, bins: int = 20) -> dict[str, list]:
    """Histogram of log10 firing frequency over the live latents (dead ones are counted apart)."""
    freq = np.asarray(fired, np.float64) / n_tokens
    alive = freq[freq > 0]
    counts, edges = np.histogram(np.log10(alive), bins=bins) if alive.size else (np.zeros(0), np.zeros(0))
    return {"log10_freq_edges": edges.tolist(), "counts": counts.tolist(), "dead": int(np.sum(freq == 0))}


def cosine_matrix(W_dec: np.ndarray, G: np.ndarray) -> np.ndarray:
    """[F, m] cosine similarities between true features (rows of G) and decoder rows."""
    d = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    g = G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-12)
    return g @ d.T


def mmcs(W_dec: np.ndarray, G: np.ndarray, threshold: float = 0.9) -> dict[str, float]:
    """Mean max cosine similarity of each true feature with any decoder row, and the
    fraction of true features recovered above ``threshold``."""
    best = np.max(cosine_matrix(np.asarray(W_dec, np.float64), np.asarray(G, np.float64)), axis=1)
    return {"mmcs": float(np.mean(best)), "recovered_fraction": float(np.mean(best > threshold))}


def dead_fraction(tokens_since_fired: jax.Array, dead_tokens: int) -> jax.Array:
    """Fraction of latents that have not fired for at least ``dead_tokens`` tokens."""
    return jnp.mean(tokens_since_fired >= dead_tokens)

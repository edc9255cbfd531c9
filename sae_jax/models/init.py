"""Parameter initializers shared by the architectures (recipes in shared/ALGORITHMS.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decoder_rows(key: jax.Array, d_sae: int, d_model: int, norm: float = 1.0) -> jax.Array:
    """[m, d] decoder with random directions as rows, each of norm ``norm``."""
    w = jax.random.normal(key, (d_sae, d_model), jnp.float32)
    return norm * w / jnp.linalg.norm(w, axis=1, keepdims=True)


def tied_encoder(W_dec: jax.Array) -> jax.Array:
    """W_enc = W_dec^T (Anthropic and Gao et al. initialization)."""
    return W_dec.T


def geometric_median(x: jax.Array, iters: int = 100, eps: float = 1e-8) -> jax.Array:
    """Geometric median of the rows of x by Weiszfeld's algorithm (TopK's b_dec init)."""
    x = x.astype(jnp.float32)

    def body(_, y):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=1), eps)
        return jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))


def initial_b_dec(kind: str, d_model: int, sample: jax.Array | None) -> jax.Array:
    """b_dec at init: zeros, the sample mean, or the sample's geometric median."""
    if kind == "zeros" or sample is None:
        return jnp.zeros((d_model,), jnp.float32)
    if kind == "mean":
        return jnp.mean(sample.astype(jnp.float32), axis=0)
    return geometric_median(sample)

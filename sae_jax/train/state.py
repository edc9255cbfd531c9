"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from flax import struct

from sae_jax.models.sae import SAE, Params, Stats


@struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array
    """Optimizer steps taken (int32 scalar)."""
    params: Params
    """SAE parameters (normalized-activation space)."""
    opt_state: Any
    """optax state (Adam moments)."""
    stats: Stats
    """Per-latent statistics: tokens since each latent fired, BatchTopK threshold."""
    hparams: dict[str, jax.Array]
    """Per-run hyper-parameters a sweep varies: 'lr' and 'coefficient' (float32 scalars)."""


def init_state(sae: SAE, tx: optax.GradientTransformation, key: jax.Array, sample: jax.Array | None,
               lr: float = 1e-3, coefficient: float = 0.0) -> TrainState:
    """A fresh state: parameters by the architecture's recipe, zeroed optimizer state."""
    params = sae.constrain_params(sae.init_params(jax.random.split(key)[0], sample))
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        opt_state=tx.init(params),
        stats=sae.init_stats(),
        hparams={"lr": jax.numpy.asarray(lr, jax.numpy.float32),
                 "coefficient": jax.numpy.asarray(coefficient, jax.numpy.float32)},
    )


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf; nothing non-finite was saved (the message names the last good checkpoint)."""



def _floats(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.floating)]


def _all_finite(tree: Any) -> jax.Array:
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in _floats(tree)]).all()


@functools.cache
def _jitted(fn, replicated: jax.sharding.Sharding | None):
    return jax.jit(fn, out_shardings=replicated)


def is_finite(tree: Any, replicated: jax.sharding.Sharding | None = None) -> bool:
    """Whether every float in ``tree`` (a state, metrics) is finite: one fused reduction on the devices,
    the answer replicated so that every process of a job reads it."""
    return bool(_jitted(_all_finite, replicated)(tree))

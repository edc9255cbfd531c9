"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

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
    rng: jax.Array
    """PRNG key of the run (for stochastic parts such as resampling)."""
    hparams: dict[str, jax.Array]
    """Per-run hyper-parameters a sweep varies: 'lr' and 'coefficient' (float32 scalars)."""


def init_state(sae: SAE, tx: optax.GradientTransformation, key: jax.Array, sample: jax.Array | None,
               lr: float = 1e-3, coefficient: float = 0.0) -> TrainState:
    """A fresh state: parameters by the architecture's recipe, zeroed optimizer state."""
    k_params, k_run = jax.random.split(key)
    params = sae.constrain_params(sae.init(k_params, sample))
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        opt_state=tx.init(params),
        stats=sae.init_stats(),
        rng=k_run,
        hparams={"lr": jax.numpy.asarray(lr, jax.numpy.float32),
                 "coefficient": jax.numpy.asarray(coefficient, jax.numpy.float32)},
    )

"""``model.init_from``: start training from a saved SAE instead of a fresh init."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax.config import ConfigError
from sae_jax.io import loader
from sae_jax.models.sae import SAE, Params, Stats, is_unit_norm


def initial_params(path: str | Path, sae: SAE, scale: float) -> tuple[Params, Stats]:
    """Parameters and statistics to start training ``sae`` from a saved SAE (``model.init_from``).

    The saved SAE (anything ``loader.load`` reads) must have the same architecture, d_model, d_sae
    and apply_b_dec_to_input. Its raw-activation parameters are un-folded to the training
    scale (``fold_scale`` with 1/scale); JumpReLU thresholds convert between log and raw; a
    decoder that is not unit-norm where ``sae`` keeps it so is folded to unit norm first
    (same reconstructions). Statistics the saved SAE lacks start fresh.
    """
    if not Path(path).exists():
        raise ConfigError(f"config key 'model.init_from' names '{path}', which does not exist; pass a work "
                          "directory, an sae/ folder, a SAELens folder or a params.npz.")
    saved = loader.load(path)
    for name in ("name", "d_model", "d_sae", "apply_b_dec_to_input"):
        ours, theirs = getattr(sae, name), getattr(saved.sae, name)
        if ours != theirs:
            key = "architecture" if name == "name" else name
            raise ConfigError(f"config key 'model.{key}' is {ours!r}, but model.init_from '{path}' holds an SAE with "
                              f"{key}={theirs!r}; set model.{key}={theirs!r} or init from another SAE.")
    params = sae.adopt(saved.sae, dict(saved.params))
    if sae.unit_norm_decoder and not is_unit_norm(np.asarray(params["W_dec"])):
        if not sae.folds_decoder_norms:
            warnings.warn(f"model.init_from '{path}': decoder rows are not unit-norm; the first step renormalizes "
                          "them, which changes the SAE.", stacklevel=2)
        else:
            params = sae.fold_decoder_norms({k: np.asarray(v) for k, v in params.items()})
    params, stats = sae.fold_scale(params, saved.stats, 1.0 / scale)
    fresh = sae.init_stats()
    stats = {k: (jnp.asarray(stats[k], v.dtype) if k in stats and jnp.shape(stats[k]) == v.shape else v)
             for k, v in fresh.items()}
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, stats

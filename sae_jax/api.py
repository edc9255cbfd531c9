"""Use a trained SAE from Python: load it, then encode, decode and reconstruct.

    >>> from sae_jax import api
    >>> sae = api.load("runs/demo")      # work dir, sae/ folder, sweep (member=...), SAELens folder, params.npz
    >>> f = sae.encode(x)                 # x: numpy or jax array [..., d_model] -> f [..., d_sae]
    >>> x_hat = sae.decode(f)             # == sae.reconstruct(x)

Outputs are numpy arrays for numpy (or list) inputs and jax arrays for jax inputs. Saved
parameters work on raw activations: the training normalization is folded in.

This module is the front door only: it re-exports the user-facing names of ``sae_jax.io`` and no
module of the package imports it.
"""

from sae_jax.io.gemma_scope import load_gemma_scope
from sae_jax.io.loader import import_sae, load
from sae_jax.io.sae_folder import SAEFileError, SaveError, TrainedSAE, find_saes, save
from sae_jax.io.saelens import Exported, export_saelens, export_workdir, load_saelens

__all__ = [
    "Exported",
    "SAEFileError",
    "SaveError",
    "TrainedSAE",
    "export_saelens",
    "export_workdir",
    "find_saes",
    "import_sae",
    "load",
    "load_gemma_scope",
    "load_saelens",
    "save",
]

"""Gemma Scope SAEs: a ``params.npz`` (JumpReLU, arXiv 2408.05147) as a TrainedSAE."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from sae_jax.io import saelens
from sae_jax.io.sae_folder import TrainedSAE
from sae_jax.io.saelens import Arrays

GEMMA_SCOPE_KEYS = {"W_enc": ("d_model", "d_sae"), "W_dec": ("d_sae", "d_model"), "b_enc": ("d_sae",),
                    "b_dec": ("d_model",), "threshold": ("d_sae",)}
"""The arrays of a Gemma Scope ``params.npz`` (JumpReLU, arXiv 2408.05147) and their shapes."""


def load_gemma_scope(path: str | Path) -> TrainedSAE:
    """A Gemma Scope ``params.npz`` (JumpReLU; W_enc, W_dec, b_enc, b_dec, threshold) as a TrainedSAE.

    Gemma Scope's encoder does not subtract b_dec (apply_b_dec_to_input = false; SAELens
    ``get_gemma_2_config_from_hf``); f = pre * H(pre - threshold), pre = x W_enc + b_enc.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gemma Scope file '{path}' does not exist.")
    arrays = _read_npz(path)
    missing = [k for k in GEMMA_SCOPE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"'{path}' lacks {', '.join(missing)}; a Gemma Scope params.npz holds W_enc [d_model, d_sae], "
                         "W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model] and threshold [d_sae].")
    d, m = arrays["W_enc"].shape if arrays["W_enc"].ndim == 2 else (0, 0)
    dims = {"d_model": d, "d_sae": m}
    for key, names in GEMMA_SCOPE_KEYS.items():
        want = tuple(dims[n] for n in names)
        if arrays[key].shape != want:
            raise ValueError(f"'{path}': {key} has shape {arrays[key].shape}, expected {want} ({', '.join(names)}).")
    cfg = {"architecture": "jumprelu", "d_in": d, "d_sae": m, "apply_b_dec_to_input": False}
    return saelens.from_saelens(cfg, arrays, str(path), {"imported_from": str(path), "format": "gemma_scope"})


def _read_npz(path: Path) -> Arrays:
    """The arrays of a .npz as float32 (w_* renamed W_*); ValueError naming the file if it is not such a file."""
    fix = "pass a Gemma Scope params.npz (W_enc, W_dec, b_enc, b_dec, threshold as float arrays)"
    try:
        with np.load(path) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds one array, not named arrays")
            return {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k], np.float32) for k in data.files}
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"'{path}' is not a readable .npz of float arrays ({e}); {fix}.") from None

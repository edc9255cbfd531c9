"""Use a trained SAE from Python: load it, then encode, decode and reconstruct.

    >>> from sae_jax import api
    >>> sae = api.load("runs/demo")            # a work directory or an `sae/` folder
    >>> f = sae.encode(x)                       # x: numpy or jax array [..., d_model]
    >>> x_hat = sae.decode(f)                   # == sae.reconstruct(x)

Saved parameters work on raw activations: the training normalization is folded in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from sae_jax.models.sae import REGISTRY, SAE, Params, Stats

SAE_DIR = "sae"
WEIGHTS = "params.safetensors"
SPEC = "sae.json"
FORMAT_VERSION = 1


@dataclass
class TrainedSAE:
    """A trained SAE with its parameters (raw-activation space)."""

    sae: SAE
    params: Params
    stats: Stats
    meta: dict

    def __post_init__(self):
        self._encode = jax.jit(lambda p, s, x: self.sae.encode(p, x, s))
        self._decode = jax.jit(self.sae.decode)

    def encode(self, x) -> jax.Array:
        """Latent code f [..., d_sae] of activations x [..., d_model]."""
        x = _check_input(x, self.sae.d_model)
        return self._encode(self.params, self.stats, x)

    def decode(self, f) -> jax.Array:
        """Reconstruction x_hat [..., d_model] of a latent code."""
        return self._decode(self.params, jnp.asarray(f, jnp.float32))

    def reconstruct(self, x) -> jax.Array:
        """decode(encode(x))."""
        return self.decode(self.encode(x))

    @property
    def W_dec(self) -> np.ndarray:
        """Decoder rows [d_sae, d_model] (feature directions)."""
        return np.asarray(self.params["W_dec"])


def _check_input(x, d_model: int) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape[-1] != d_model:
        raise ValueError(f"activations have last dimension {x.shape[-1]}, but this SAE expects d_model={d_model}.")
    return x.astype(jnp.float32)


def sae_spec(sae: SAE) -> dict:
    """The architecture and its static hyper-parameters, JSON-serialisable."""
    return {"architecture": sae.name, **dataclasses.asdict(sae)}


def sae_from_spec(spec: dict) -> SAE:
    """Rebuild an SAE object from ``sae_spec`` output."""
    spec = dict(spec)
    cls = REGISTRY[spec.pop("architecture")]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in spec.items() if k in names})


def save(folder: str | Path, sae: SAE, params: Params, stats: Stats, meta: dict | None = None) -> Path:
    """Write ``params.safetensors`` (params and stats, prefixed) and ``sae.json``; atomic per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"params.{k}": np.asarray(v) for k, v in params.items()}
    tensors |= {f"stats.{k}": np.asarray(v) for k, v in stats.items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / WEIGHTS)
    doc = {"format_version": FORMAT_VERSION, "sae": sae_spec(sae), "meta": meta or {}}
    (folder / (SPEC + ".tmp")).write_text(json.dumps(doc, indent=2))
    (folder / (SPEC + ".tmp")).replace(folder / SPEC)
    return folder


def load(path: str | Path) -> TrainedSAE:
    """Load a trained SAE from a work directory or a folder written by ``save``."""
    path = Path(path)
    folder = path / SAE_DIR if (path / SAE_DIR / SPEC).is_file() else path
    if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"'{path}' holds no trained SAE ({SAE_DIR}/{SPEC} and {SAE_DIR}/{WEIGHTS}); "
                                "train one with `sae-jax train` or pass its work directory.")
    doc = json.loads((folder / SPEC).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    params = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("params.")}
    stats = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("stats.")}
    return TrainedSAE(sae_from_spec(doc["sae"]), params, stats, doc.get("meta", {}))

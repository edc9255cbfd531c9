"""Use a trained SAE from Python: load it, then encode, decode and reconstruct.

    >>> from sae_jax import api
    >>> sae = api.load("runs/demo")      # work dir, sae/ folder, sweep (member=...), SAELens folder, params.npz
    >>> f = sae.encode(x)                 # x: numpy or jax array [..., d_model] -> f [..., d_sae]
    >>> x_hat = sae.decode(f)             # == sae.reconstruct(x)

Outputs are numpy arrays for numpy (or list) inputs and jax arrays for jax inputs. Saved
parameters work on raw activations: the training normalization is folded in.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from sae_jax.config import ConfigError
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

    def encode(self, x):
        """Latent code f [..., d_sae] of activations x [..., d_model]."""
        x2, lead, as_numpy = _as_rows(x, self.sae.d_model, "activations", "d_model")
        return _out(self._encode(self.params, self.stats, x2), lead, as_numpy)

    def decode(self, f):
        """Reconstruction x_hat [..., d_model] of a latent code f [..., d_sae]."""
        f2, lead, as_numpy = _as_rows(f, self.sae.d_sae, "latent codes", "d_sae")
        return _out(self._decode(self.params, f2), lead, as_numpy)

    def reconstruct(self, x):
        """decode(encode(x)), computed on device in one pass."""
        x2, lead, as_numpy = _as_rows(x, self.sae.d_model, "activations", "d_model")
        return _out(self._decode(self.params, self._encode(self.params, self.stats, x2)), lead, as_numpy)

    @property
    def W_dec(self) -> np.ndarray:
        """Decoder rows [d_sae, d_model] (feature directions)."""
        return np.asarray(self.params["W_dec"])


def _as_rows(x, width: int, what: str, name: str) -> tuple[jax.Array, tuple[int, ...], bool]:
    """x as float32 rows [n, width], its leading shape, and whether the caller gave a non-jax array."""
    as_numpy = not isinstance(x, jax.Array)
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != width:
        raise ValueError(f"{what} have shape {tuple(x.shape)}, but this SAE expects a last dimension of "
                         f"{name}={width}.")
    return x.reshape(-1, width).astype(jnp.float32), tuple(x.shape[:-1]), as_numpy


def _out(y: jax.Array, lead: tuple[int, ...], as_numpy: bool):
    y = y.reshape(*lead, y.shape[-1])
    return np.asarray(y) if as_numpy else y


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


def find_saes(root: str | Path) -> list[Path]:
    """Every ``sae/`` folder (``save`` output) at or under ``root``, sorted: a run's, or each sweep member's."""
    root = Path(root)
    if (root / SPEC).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(SPEC) if (p.parent / WEIGHTS).is_file())


def member_name(root: str | Path, folder: str | Path) -> str:
    """The name of an SAE folder under ``root``: its work directory relative to root (e.g. members/NAME)."""
    folder, root = Path(folder), Path(root)
    run = folder.parent if folder.name == SAE_DIR else folder
    rel = run.relative_to(root).as_posix() if run.is_relative_to(root) else run.name
    return rel if rel != "." else run.name


def _load_folder(folder: Path) -> TrainedSAE:
    doc = json.loads((folder / SPEC).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    params = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("params.")}
    stats = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("stats.")}
    return TrainedSAE(sae_from_spec(doc["sae"]), params, stats, doc.get("meta", {}))


def _candidates(root: Path) -> dict[str, Path]:
    """Named SAE folders under root: ours (sae/) and exported SAELens folders."""
    from sae_jax import export

    found = {member_name(root, f): f for f in find_saes(root)}
    for cfg in sorted(root.rglob(export.SAELENS_CFG)):
        if export.is_saelens_folder(cfg.parent):
            found.setdefault(member_name(root, cfg.parent), cfg.parent)
    return found


def load(path: str | Path, member: str | None = None) -> TrainedSAE:
    """Load a trained SAE from any of the places one lives.

    ``path``: a work directory (WORKDIR/sae/), an ``sae/`` folder written by ``save``, a sweep
    directory (pick the member by ``member``: its name under members/, or its relative path),
    a SAELens folder (cfg.json + sae_weights.safetensors, e.g. from ``sae-jax export``), or a
    Gemma Scope ``params.npz``.
    """
    from sae_jax import export

    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return export.load_gemma_scope(path)
    if member is None:
        if (path / SPEC).is_file() and (path / WEIGHTS).is_file():
            return _load_folder(path)
        if (path / SAE_DIR / SPEC).is_file() and (path / SAE_DIR / WEIGHTS).is_file():
            return _load_folder(path / SAE_DIR)
        if export.is_saelens_folder(path):
            return export.load_saelens(path)
    found = _candidates(path) if path.is_dir() else {}
    if member is not None:
        hits = [f for name, f in found.items() if member in (name, name.rsplit("/", 1)[-1])]
        if len(hits) != 1:
            raise FileNotFoundError(f"'{path}' has {'no' if not hits else 'several'} SAE named '{member}'; "
                                    f"members: {', '.join(found) or 'none'}.")
        return load(hits[0])
    if len(found) == 1:
        return load(next(iter(found.values())))
    if found:
        raise ValueError(f"'{path}' holds {len(found)} SAEs ({', '.join(found)}); pick one with member=NAME "
                         "(or pass its folder).")
    raise FileNotFoundError(f"'{path}' holds no trained SAE ({SAE_DIR}/{SPEC} and {SAE_DIR}/{WEIGHTS}, or a SAELens "
                            "cfg.json); train one with `sae-jax train` or pass its work directory.")


def initial_params(path: str | Path, sae: SAE, scale: float) -> tuple[Params, Stats]:
    """Parameters and statistics to start training ``sae`` from a saved SAE (``model.init_from``).

    The saved SAE (anything ``load`` reads) must have the same architecture, d_model, d_sae
    and apply_b_dec_to_input. Its raw-activation parameters are un-folded to the training
    scale (``fold_scale`` with 1/scale); JumpReLU thresholds convert between log and raw; a
    decoder that is not unit-norm where ``sae`` keeps it so is folded to unit norm first
    (same reconstructions). Statistics the saved SAE lacks start fresh.
    """
    from sae_jax import export

    if not Path(path).exists():
        raise ConfigError(f"config key 'model.init_from' names '{path}', which does not exist; pass a work "
                          "directory, an sae/ folder, a SAELens folder or a params.npz.")
    saved = load(path)
    for name in ("name", "d_model", "d_sae", "apply_b_dec_to_input"):
        ours, theirs = getattr(sae, name), getattr(saved.sae, name)
        if ours != theirs:
            key = "architecture" if name == "name" else name
            raise ConfigError(f"config key 'model.{key}' is {ours!r}, but model.init_from '{path}' holds an SAE with "
                              f"{key}={theirs!r}; set model.{key}={theirs!r} or init from another SAE.")
    params = dict(saved.params)
    if sae.name == "jumprelu" and saved.sae.theta_param != sae.theta_param:
        t = params["log_threshold"]
        params["log_threshold"] = jnp.log(t) if sae.theta_param == "log" else jnp.exp(t)
    if sae.unit_norm_decoder and not export.is_unit_norm(np.asarray(params["W_dec"])):
        if sae.name in ("topk", "batchtopk", "matryoshka"):
            warnings.warn(f"model.init_from '{path}': decoder rows are not unit-norm; the first step renormalizes "
                          "them, which changes the SAE.", stacklevel=2)
        else:
            params = export.fold_decoder_norms(sae, params)
    params, stats = sae.fold_scale(params, saved.stats, 1.0 / scale)
    fresh = sae.init_stats()
    stats = {k: (jnp.asarray(stats[k], v.dtype) if k in stats and jnp.shape(stats[k]) == v.shape else v)
             for k, v in fresh.items()}
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, stats

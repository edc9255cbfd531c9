"""Use a trained SAE from Python: load it, then encode, decode and reconstruct.

    >>> from sae_jax import api
    >>> sae = api.load("runs/demo")      # work dir, sae/ folder, sweep (member=...), SAELens folder, params.npz
    >>> f = sae.encode(x)                 # x: numpy or jax array [..., d_model] -> f [..., d_sae]
    >>> x_hat = sae.decode(f)             # == sae.reconstruct(x)

Outputs are numpy arrays for numpy (or list) inputs and jax arrays for jax inputs. Saved
parameters work on raw activations: the training normalization is folded in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sae_jax.config import ConfigError
from sae_jax.data.store import fsync
from sae_jax.models import registry
from sae_jax.models.sae import SAE, Params, Stats, abstract, is_unit_norm

SAE_DIR = "sae"
WEIGHTS = "params.safetensors"
SPEC = "sae.json"
FORMAT_VERSION = 2
"""2: sae.json records the SHA-256 of params.safetensors (``weights_sha256``), checked on load; 1 had none."""
RESAVE = ("re-save it by running `sae-jax train` again on its work directory (it resumes from the checkpoints "
          "and writes sae/ anew), or retrain")


class SAEFileError(ValueError):
    """A file of a saved SAE is missing, damaged or not what it should be; the message names it and the fix."""


class SaveError(RuntimeError):
    """A saved SAE could not be written (e.g. the disk is full); the previous folder, if any, is unchanged."""

    def __init__(self, folder: Path, reason: str, fix: str = "free space there or save elsewhere, then save again"):
        super().__init__(f"could not write the trained SAE to '{folder}': {reason}; {fix}.")
        self.folder, self.reason = folder, reason


@dataclass
class TrainedSAE:
    """A trained SAE with its parameters (raw-activation space)."""

    sae: SAE
    params: Params
    stats: Stats
    meta: dict

    def __post_init__(self):
        self._encode = jax.jit(lambda p, s, x: self.sae.bind(p, s).encode(x))
        self._decode = jax.jit(lambda p, f: self.sae.bind(p).decode(f))

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
    def module(self) -> SAE:
        """The SAE as a Flax NNX module holding these parameters (raw-activation space), for Flax code."""
        return self.sae.bind(self.params, self.stats)

    @property
    def W_dec(self) -> np.ndarray:
        """Decoder rows [d_sae, d_model] (feature directions)."""
        return np.asarray(self.params["W_dec"])

    def __repr__(self) -> str:
        """A summary (architecture, widths, parameter shapes), not every weight."""
        shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in self.params.items())
        n = sum(int(np.size(v)) for v in self.params.values())
        return f"TrainedSAE({self.sae!r}; {n:,} parameters: {shapes})"


def _as_rows(x, width: int, what: str, name: str) -> tuple[jax.Array, tuple[int, ...], bool]:
    """x as float32 rows [n, width], its leading shape, and whether the caller gave a non-jax array."""
    as_numpy = not isinstance(x, jax.Array)
    if as_numpy:
        try:
            x = np.asarray(x)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{what} must be a numeric array [..., {name}]; got a {type(x).__name__} that is not "
                             f"one ({e}).") from None
    real = jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    if not real or x.dtype == np.bool_:
        raise ValueError(f"{what} have dtype {x.dtype}, but this SAE needs real numbers (a float or integer array "
                         f"[..., {name}]); convert them first, e.g. with .astype('float32').")
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
    return sae.spec()


def sae_from_spec(spec: dict) -> SAE:
    """Rebuild an SAE object from ``sae_spec`` output."""
    spec = dict(spec)
    cls = registry()[spec.pop("architecture")]
    names = cls.hyper_names()
    return abstract(cls, spec.pop("d_model"), spec.pop("d_sae"), **{k: v for k, v in spec.items() if k in names})


def save(folder: str | Path, sae: SAE, params: Params, stats: Stats, meta: dict | None = None) -> Path:
    """Write ``params.safetensors`` (params and stats, prefixed) and ``sae.json`` to ``folder``, atomically.

    The folder is written completely to a hidden sibling, then renamed into place: a reader never
    sees a half-written folder, and a failed write (``SaveError``) leaves a previous one as it was.
    (Replacing moves the previous folder to a hidden ``.NAME.old`` for the instant between two renames.)
    """
    folder = Path(folder)
    _check_replaceable(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed save
    try:
        _write_folder(partial, sae, params, stats, meta)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise SaveError(folder, reason(e)) from e
    _replace_dir(partial, folder)
    return folder


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds more than a saved SAE (its files would be lost)."""
    ours = {WEIGHTS, SPEC, WEIGHTS + ".tmp", SPEC + ".tmp"}  # the .tmp files: an older save's leftovers
    others = sorted(p.name for p in folder.iterdir() if p.name not in ours) if folder.is_dir() else []
    if others or folder.is_file():
        raise ValueError(f"'{folder}' exists and holds {', '.join(others) or 'a file'}, not only a saved SAE; "
                         "save into a new folder (or an sae/ folder of a work directory).")


def _write_folder(folder: Path, sae: SAE, params: Params, stats: Stats, meta: dict | None) -> None:
    folder.mkdir(parents=True)
    tensors = {f"params.{k}": np.asarray(v) for k, v in params.items()}
    tensors |= {f"stats.{k}": np.asarray(v) for k, v in stats.items()}
    write_safetensors(tensors, folder / WEIGHTS)
    doc = {"format_version": FORMAT_VERSION, "sae": sae_spec(sae), "meta": meta or {},
           "weights_sha256": sha256_file(folder / WEIGHTS)}
    (folder / SPEC).write_text(json.dumps(doc, indent=2))
    for path in (folder / SPEC, folder):
        fsync(path)


def _replace_dir(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first and deleted after."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(tensors: dict, path: Path) -> None:
    """``save_file``, fsynced, with the mode ``open()`` gives (0666 & ~umask; safetensors itself makes 0600)."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_umask())
    fsync(path)


def _umask() -> int:
    old = os.umask(0o077)  # for an instant; a file another thread creates then is only the more private
    os.umask(old)
    return old


def reason(e: BaseException) -> str:
    """Why a write failed, in a few words (ENOSPC spelled out)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return "no space left on device"
    return " ".join(str(e).split())[:300]


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_saes(root: str | Path) -> list[Path]:
    """Every ``sae/`` folder (``save`` output) at or under ``root``, sorted: a run's, or each sweep member's."""
    root = Path(root)
    if (root / SPEC).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(SPEC) if not _hidden(p, root))  # a missing WEIGHTS: load says so


def _hidden(path: Path, root: Path) -> bool:
    """Below a hidden folder under root (e.g. the partial folder of a save in progress)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def member_name(root: str | Path, folder: str | Path) -> str:
    """The name of an SAE folder under ``root``: its work directory relative to root (e.g. members/NAME)."""
    folder, root = Path(folder), Path(root)
    run = folder.parent if folder.name == SAE_DIR else folder
    rel = run.relative_to(root).as_posix() if run.is_relative_to(root) else run.name
    return rel if rel != "." else run.name


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; SAEFileError naming it (and ``fix``) if it is not one."""
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFileError(f"'{path}' is damaged: it is not valid JSON ({e}); {fix}.") from None
    if not isinstance(doc, dict):
        raise SAEFileError(f"'{path}' is damaged: it holds a JSON {type(doc).__name__}, not an object; {fix}.")
    return doc


def read_safetensors(path: Path, fix: str) -> dict[str, np.ndarray]:
    """The tensors of ``path``; SAEFileError naming it (and ``fix``) if it is not a readable safetensors file."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise SAEFileError(f"'{path}' is damaged: it is not a readable safetensors file ({e}); {fix}.") from None


def _load_folder(folder: Path) -> TrainedSAE:
    for name in (SPEC, WEIGHTS):
        if not (folder / name).is_file():
            raise SAEFileError(f"'{folder / name}' is missing; {RESAVE}.")
    doc = read_json(folder / SPEC, RESAVE)
    _check_version(doc, folder / SPEC)
    sae = spec_sae(doc.get("sae"), folder / SPEC)
    _check_digest(doc, folder)
    tensors = read_safetensors(folder / WEIGHTS, RESAVE)
    params = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("params.")}
    stats = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("stats.")}
    _check_params(sae, params, folder / WEIGHTS)
    return TrainedSAE(sae, params, stats, doc.get("meta") or {})


def _check_version(doc: dict, path: Path) -> None:
    version = doc.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SAEFileError(f"'{path}' has format_version {version}, newer than this sae_jax reads "
                           f"({FORMAT_VERSION}); upgrade sae_jax.")
    if version not in (1, 2):
        raise SAEFileError(f"'{path}' is damaged: its format_version is {version!r}, not 1 or 2; {RESAVE}.")


def spec_sae(spec, path: Path, fix: str = RESAVE) -> SAE:
    """The SAE of a saved ``sae_spec`` (the "sae" object of ``path``); SAEFileError naming path if it is broken."""
    if not isinstance(spec, dict) or spec.get("architecture") not in registry():
        raise SAEFileError(f"'{path}' is damaged: its sae.architecture is not one of {', '.join(registry())}; {fix}.")
    try:
        return sae_from_spec(spec)
    except (TypeError, ValueError) as e:
        raise SAEFileError(f"'{path}' is damaged: its sae fields do not build an SAE ({e}); {fix}.") from None


def _check_digest(doc: dict, folder: Path) -> None:
    """Format 2 records the SHA-256 of params.safetensors; format 1 folders have none to check."""
    if doc["format_version"] >= 2 and doc.get("weights_sha256") != sha256_file(folder / WEIGHTS):
        raise SAEFileError(f"'{folder / WEIGHTS}' is damaged: its SHA-256 does not match the one in {SPEC}; "
                           f"{RESAVE}.")


def _check_params(sae: SAE, params: dict, path: Path) -> None:
    want = jax.eval_shape(sae.init_params, jax.random.key(0))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if shapes != {k: tuple(v.shape) for k, v in want.items()}:
        raise SAEFileError(f"'{path}' is damaged: its parameters {shapes} are not those of a {sae.name} SAE with "
                           f"d_model={sae.d_model}, d_sae={sae.d_sae}; {RESAVE}.")


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
    _check_path(path)
    if path.is_file():  # a .npz: _check_path refuses other files
        return export.load_gemma_scope(path)
    if member is None:
        if (path / SPEC).is_file() or (path / WEIGHTS).is_file():
            return _load_folder(path)
        if (path / SAE_DIR / SPEC).is_file() or (path / SAE_DIR / WEIGHTS).is_file():
            return _load_folder(path / SAE_DIR)
        if export.is_saelens_folder(path):
            return export.load_saelens(path)
    found = _candidates(path)
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


def _check_path(path: Path) -> None:
    """FileNotFoundError/ValueError for paths that cannot hold an SAE: missing, a stray file, a store."""
    where = "a work directory of `sae-jax train`, an sae/ folder, a SAELens folder or a Gemma Scope params.npz"
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; pass {where}.")
    if path.is_file() and path.suffix != ".npz":
        raise ValueError(f"'{path}' is a file, not an SAE; pass its folder '{path.parent}' or {where}.")
    store_meta = path / "metadata.json"
    if store_meta.is_file() and "sae_jax.activation_store" in store_meta.read_text(errors="replace"):
        raise ValueError(f"'{path}' is an activation store, not a trained SAE; pass {where}.")


def initial_params(path: str | Path, sae: SAE, scale: float) -> tuple[Params, Stats]:
    """Parameters and statistics to start training ``sae`` from a saved SAE (``model.init_from``).

    The saved SAE (anything ``load`` reads) must have the same architecture, d_model, d_sae
    and apply_b_dec_to_input. Its raw-activation parameters are un-folded to the training
    scale (``fold_scale`` with 1/scale); JumpReLU thresholds convert between log and raw; a
    decoder that is not unit-norm where ``sae`` keeps it so is folded to unit norm first
    (same reconstructions). Statistics the saved SAE lacks start fresh.
    """

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

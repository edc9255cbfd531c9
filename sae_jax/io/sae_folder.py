"""Our SAE folder (``WORKDIR/sae/``, written by ``save``): ``params.safetensors`` + ``sae.json``.

``params.safetensors`` holds the parameters and statistics (``params.NAME``, ``stats.NAME``) in
raw-activation space (the training normalization folded in); ``sae.json`` holds the architecture
and its hyper-parameters (``sae_spec``), the run's meta and the SHA-256 of ``params.safetensors``.
``TrainedSAE`` is a loaded SAE: encode, decode and reconstruct. Loading any other kind of SAE (a
sweep, a SAELens folder, a Gemma Scope file) is ``sae_jax.io.loader.load``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sae_jax.io import layout
from sae_jax.io.layout import SAE_DIR, SPEC, WEIGHTS, atomic_write, fsync
from sae_jax.models import registry
from sae_jax.models.sae import SAE, Params, Stats, abstract

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
        except (TypeError, ValueError) as e:
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
    partial = folder.with_name(f".{folder.name}{layout.PARTIAL_SUFFIX}")
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
    atomic_write(folder / WEIGHTS, lambda path: write_safetensors(tensors, path))
    doc = {"format_version": FORMAT_VERSION, "sae": sae_spec(sae), "meta": meta or {},
           "weights_sha256": sha256_file(folder / WEIGHTS)}
    atomic_write(folder / SPEC, json.dumps(doc, indent=2))


def _replace_dir(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first and deleted after."""
    old = folder.with_name(f".{folder.name}{layout.OLD_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(tensors: dict, path: Path) -> None:
    """``save_file`` with the mode ``open()`` gives (0666 & ~umask; safetensors itself makes 0600). Not atomic
    by itself: it is the writer ``layout.atomic_write`` is given (which fsyncs and renames)."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_umask())


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


def require_saes(root: Path, fix: str) -> list[Path]:
    """``find_saes(root)``; FileNotFoundError saying ``fix`` where there is none."""
    found = find_saes(root)
    if not found:
        raise FileNotFoundError(f"'{root}' holds no trained SAE ({SAE_DIR}/{SPEC}); {fix}.")
    return found


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


def load_folder(folder: Path) -> TrainedSAE:
    """The SAE that ``save`` wrote to ``folder``; SAEFileError naming a missing or damaged file."""
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
    except (TypeError, ValueError, KeyError) as e:
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

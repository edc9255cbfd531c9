"""SAELens folders: export ours to SAELens, import SAELens ones (Gemma Scope files: ``gemma_scope``).

SAELens (>= 6.0, ``SAE.load_from_disk``) reads a folder holding ``cfg.json`` (architecture,
d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations,
metadata; ``k`` and ``rescale_acts_by_decoder_norm`` for topk) and ``sae_weights.safetensors``
(W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; gated: b_gate, b_mag,
r_mag instead of b_enc; jumprelu: threshold [d_sae]). Sources: sae_lens 6.x ``saes/sae.py``
(SAEConfig, save_model, load_from_disk, fold_W_dec_norm) and ``saes/{standard,gated,jumprelu,
topk,batchtopk}_sae.py``.

How our architectures map (every export works on raw activations: ``train.outputs.save_trained`` has
already folded the store's normalization scalar into the saved parameters):

=====================  ==========  ==============================================================
ours                   SAELens     how
=====================  ==========  ==============================================================
relu, l1               standard    as is
relu, l1_decoder_norm  standard    decoder norms n folded (W_dec_i / n_i; W_enc[:, i], b_enc_i * n_i)
gated                  gated       as is; l1_decoder_norm: n folded into W_enc, b_gate, b_mag
jumprelu               jumprelu    threshold = exp(log_threshold) (or the raw theta)
topk                   topk        k; rescale_acts_by_decoder_norm = false
batchtopk              jumprelu    the inference threshold broadcast to every latent (SAELens
                                   ``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``)
matryoshka             jumprelu    as batchtopk (SAELens saves its Matryoshka BatchTopK the same way)
prolu                  jumprelu    exact at inference: b_enc = 0, threshold = max(-b, 0), because
                                   m H(m + b) H(m) = ReLU(m) H(m - max(-b, 0)) (Taggart 2024's gate)
=====================  ==========  ==============================================================

Beside the two SAELens files an export writes ``sae_jax.json`` (our architecture and its
hyper-parameters) and ``sae_jax.safetensors`` (the training statistics, and exactly those
parameters whose SAELens form does not give them back bit for bit: a folded decoder, log theta,
ProLU's b_enc). SAELens ignores both files. Import uses them while the SAELens weights are the
ones exported (checked by a sha256), so export -> import is bit-exact for every architecture;
any other SAELens folder imports with SAELens's own semantics.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from sae_jax import config as config_lib
from sae_jax.io import layout, sae_folder
from sae_jax.models import make_sae, registry
from sae_jax.models.sae import SAE, Params, Stats, fold_norms

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SIDECAR = "sae_jax.json"
SIDECAR_WEIGHTS = "sae_jax.safetensors"
SAELENS_FORMAT = "6.0.0"
"""The SAELens cfg.json layout written (metadata.sae_lens_version); SAELens reads it as >= 6.0."""
SIDECAR_VERSION = 1
SAELENS_SCALED = ("b_enc", "b_gate", "b_mag", "threshold")
"""SAELens per-latent tensors that scale with a folded decoder norm."""

Arrays = dict[str, np.ndarray]


@dataclass
class Exported:
    """What one export wrote."""

    path: Path
    """The SAELens folder."""
    architecture: str
    """Our architecture name."""
    saelens_architecture: str
    """The architecture name in cfg.json."""
    exact: list[str] = field(default_factory=list)
    """Parameters and statistics kept bit-exact in sae_jax.safetensors."""
    notes: list[str] = field(default_factory=list)
    """What the mapping changed (folded norms, threshold forms)."""


# --------------------------------------------------------------------------- array helpers
def _host(tree: dict) -> Arrays:
    return {k: np.asarray(jax.device_get(v)) for k, v in tree.items()}


def _f32(tensors: Arrays) -> Arrays:
    return {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- ours <-> SAELens
def saelens_form(sae: SAE, params: Params, stats: Stats) -> tuple[str, Arrays, dict, list[str]]:
    """The SAELens architecture, weights, extra cfg.json fields and notes for one of our SAEs (its
    class's ``saelens`` and ``to_saelens``)."""
    tensors, extra = sae.to_saelens(_host(params), _host(stats))
    notes = []
    if not sae.saelens_import:
        notes.append(f"{sae.name} exported as SAELens {sae.saelens} (same feature activations at inference)")
    if sae.penalty == "l1_decoder_norm":
        tensors = fold_norms(tensors, SAELENS_SCALED)
        notes.append("decoder norms folded into the encoder (unit-norm W_dec rows)")
    return sae.saelens, _f32(tensors), extra, notes


def params_from_saelens(sae: SAE, tensors: Arrays) -> tuple[Arrays, Arrays]:
    """Our parameters and statistics for ``sae`` from SAELens-named weights."""
    params, stats = sae.from_saelens(tensors)
    return _f32(params), {k: np.asarray(v) for k, v in stats.items()}


def _check_shapes(sae: SAE, params: Arrays, where: str) -> None:
    want = jax.eval_shape(sae.init_params, jax.random.key(0))
    if set(want) != set(params):
        raise ValueError(f"'{where}' holds parameters {sorted(params)}, but a {sae.name} SAE needs {sorted(want)}.")
    for k, v in want.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(f"'{where}': {k} has shape {tuple(params[k].shape)}, expected {tuple(v.shape)} "
                             f"(d_model={sae.d_model}, d_sae={sae.d_sae}).")


# --------------------------------------------------------------------------- export
def _write_atomic(path: Path, data: str | Callable[[Path], None]) -> None:
    """``layout.atomic_write`` of ``path``; SaveError (and no file) if it fails."""
    try:
        layout.atomic_write(path, data)
    except (OSError, SafetensorError) as e:
        raise sae_folder.SaveError(path.parent, sae_folder.reason(e)) from e


def _warn_negative_thresholds(tensors: Arrays, where: str) -> None:
    theta = tensors.get("threshold")
    if theta is not None and np.any(theta < 0):
        warnings.warn(f"{where}: {int(np.sum(theta < 0))} JumpReLU thresholds are negative; SAELens zeroes "
                      "negative pre-activations above them (ReLU before the jump), sae_jax passes them.", stacklevel=3)


def saelens_cfg(sae: SAE, arch: str, extra: dict, metadata: dict) -> dict:
    """The cfg.json of a SAELens >= 6 folder (field names of ``SAEConfig.to_dict``)."""
    meta = {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None, "trained_with": "sae_jax",
            "sae_jax_architecture": sae.name}
    meta |= {k: v for k, v in metadata.items() if v not in (None, "")}
    return {"architecture": arch, "d_in": int(sae.d_model), "d_sae": int(sae.d_sae), "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input), "normalize_activations": "none",
            "reshape_activations": "none", **extra, "metadata": meta}


def export_saelens(model: sae_folder.TrainedSAE, out: str | Path, metadata: dict | None = None) -> Exported:
    """Write ``model`` as a SAELens folder (plus our sidecar files) at ``out``.

    ``metadata`` goes into cfg.json's metadata (e.g. model_name, hook_name for Neuronpedia).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sae = model.sae
    arch, tensors, extra, notes = saelens_form(sae, model.params, model.stats)
    _warn_negative_thresholds(tensors, str(out))
    # The sidecar keeps what the SAELens form does not give back bit for bit, and the stats.
    back, _ = params_from_saelens(sae, tensors)
    params, stats = _host(model.params), _host(model.stats)
    exact = {f"params.{k}": v for k, v in params.items() if not _same_bits(np.asarray(v), back[k])}
    exact |= {f"stats.{k}": v for k, v in stats.items()}
    weights = out / SAELENS_WEIGHTS
    _write_atomic(weights, lambda p: sae_folder.write_safetensors(tensors, p))
    _write_atomic(out / SIDECAR_WEIGHTS, lambda p: sae_folder.write_safetensors(
        {k: np.array(v, order="C") for k, v in exact.items()}, p))
    side = {"format": "sae_jax.saelens_sidecar", "format_version": SIDECAR_VERSION, "sae": sae_folder.sae_spec(sae),
            "meta": model.meta, "saelens_architecture": arch, "saelens_weights_sha256": sae_folder.sha256_file(weights),
            "exact": sorted(exact), "notes": notes}
    _write_atomic(out / SIDECAR, json.dumps(side, indent=2))
    cfg = saelens_cfg(sae, arch, extra, metadata or {})
    _write_atomic(out / SAELENS_CFG, json.dumps(cfg, indent=2))
    return Exported(out, sae.name, arch, sorted(exact), notes)


def export_workdir(src: str | Path, out: str | Path, metadata: dict | None = None) -> list[Exported]:
    """Export every trained SAE under ``src`` (a run, a sweep with members/NAME/, or an sae/ folder).

    One SAE goes to ``out`` itself; several go to ``out/<path relative to src>``.
    """
    src = Path(src)
    found = sae_folder.require_saes(src, "pass a work directory of `sae-jax train` or `sae-jax sweep`")
    results = []
    for folder in found:
        rel = sae_folder.member_name(src, folder)
        dest = Path(out) if len(found) == 1 else Path(out) / rel
        results.append(export_saelens(sae_folder.load_folder(folder), dest, metadata))
    return results


# --------------------------------------------------------------------------- import
def is_saelens_folder(path: Path) -> bool:
    """A folder with cfg.json and sae_weights.safetensors."""
    return (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file()


REEXPORT = "export it again with `sae-jax export` (or fetch the folder again)"


def _read_sidecar(folder: Path) -> dict | None:
    """Our sidecar, if present and written for the SAELens weights now in the folder."""
    if not (folder / SIDECAR).is_file() or not (folder / SIDECAR_WEIGHTS).is_file():
        return None
    side = sae_folder.read_json(folder / SIDECAR, f"delete it and {SIDECAR_WEIGHTS} to import the folder by SAELens "
                         f"semantics, or {REEXPORT}")
    if side.get("saelens_weights_sha256") != sae_folder.sha256_file(folder / SAELENS_WEIGHTS):
        warnings.warn(f"{folder}/{SAELENS_WEIGHTS} changed since sae_jax exported it; importing it as a plain "
                      f"SAELens folder and ignoring {SIDECAR}.", stacklevel=3)
        return None
    return side


def load_saelens(folder: str | Path) -> sae_folder.TrainedSAE:
    """A SAELens folder as a TrainedSAE: bit-exact when our sidecar matches, else by SAELens semantics."""
    folder = Path(folder)
    if not is_saelens_folder(folder):
        raise FileNotFoundError(f"'{folder}' is not a SAELens folder: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}.")
    tensors = _f32(sae_folder.read_safetensors(folder / SAELENS_WEIGHTS, REEXPORT))
    side = _read_sidecar(folder)
    if side is None:
        cfg = sae_folder.read_json(folder / SAELENS_CFG, REEXPORT)
        return from_saelens(cfg, tensors, str(folder), {"imported_from": str(folder), "format": "saelens"})
    sae = sae_folder.spec_sae(side.get("sae"), folder / SIDECAR, REEXPORT)
    params, stats = params_from_saelens(sae, tensors)
    for key, value in sae_folder.read_safetensors(folder / SIDECAR_WEIGHTS, REEXPORT).items():
        kind, name = key.split(".", 1)
        (params if kind == "params" else stats)[name] = value
    _check_shapes(sae, params, str(folder))
    return _trained(sae, params, stats, side.get("meta", {}))


def _trained(sae: SAE, params: Arrays, stats: Arrays, meta: dict) -> sae_folder.TrainedSAE:
    return sae_folder.TrainedSAE(sae, {k: jnp.asarray(v) for k, v in params.items()},
                          {k: jnp.asarray(v) for k, v in stats.items()}, meta)


def _saelens_architecture(cfg: dict, where: str) -> tuple[str, dict]:
    """cfg.json -> (architecture, fields), pre-6.0 names included (SAELens ``handle_pre_6_0_config``)."""
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    arch = cfg.get("architecture") or "standard"
    if fn == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        arch, cfg = "topk", {**cfg, "k": cfg["activation_fn_kwargs"]["k"]}
    if arch not in importers():
        raise ValueError(f"'{where}': SAELens architecture '{arch}' has no sae_jax equivalent; importable: "
                         f"{', '.join(importers())}.")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):  # the latter is a no-op in a loaded SAELens SAE
        raise ValueError(f"'{where}': normalize_activations '{norm}' depends on each input, so it cannot be "
                         "folded into the weights; only 'none' and 'expected_average_only_in' import.")
    return arch, cfg


def _legacy_tensors(tensors: Arrays, where: str) -> tuple[Arrays, list[str]]:
    """Older SAELens weight names: log_threshold, and a finetuning scaling_factor folded into W_dec."""
    tensors, notes = dict(tensors), []
    if "log_threshold" in tensors:
        tensors["threshold"] = np.exp(tensors.pop("log_threshold")).astype(np.float32)
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in tensors:
            s = tensors.pop(key)
            if not np.all(s == 1):
                tensors["W_dec"] = (tensors["W_dec"] * s[:, None]).astype(np.float32)
                notes.append(f"{key} folded into W_dec")
    return tensors, notes


def importers() -> dict[str, type[SAE]]:
    """SAELens architecture -> the class its folders (not written by sae_jax) import as."""
    return {cls.saelens: cls for cls in registry().values() if cls.saelens_import}


def recipe_sae(architecture: str, overrides: list[str]) -> SAE:
    """Our SAE for an imported architecture, hyper-parameters from its recipe plus ``overrides``."""
    cfg = config_lib.load_config(None, [f"model.architecture={architecture}", *overrides])
    return make_sae(cfg.model, cfg.sparsity.penalty, cfg.train.dead_tokens)


def from_saelens(cfg: dict, tensors: Arrays, where: str, meta: dict) -> sae_folder.TrainedSAE:
    """Import SAELens weights with SAELens's inference semantics (no sidecar)."""
    arch, cfg = _saelens_architecture(cfg, where)
    tensors, notes = _legacy_tensors(tensors, where)
    d, m = _cfg_int(cfg, "d_in", where), _cfg_int(cfg, "d_sae", where)
    cls = importers()[arch]
    _check_saelens_tensors(tensors, cls, d, m, where)
    _warn_negative_thresholds(tensors, where)
    common = [f"model.d_model={d}", f"model.d_sae={m}",
              f"model.apply_b_dec_to_input={bool(cfg.get('apply_b_dec_to_input', True))}"]
    tensors, overrides, more = cls.import_saelens(cfg, tensors, lambda key: _cfg_int(cfg, key, where))
    sae = recipe_sae(cls.name, [*common, *overrides])
    notes += more
    params, stats = params_from_saelens(sae, tensors)
    _check_shapes(sae, params, where)
    theirs = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    meta = {**meta, "saelens_architecture": arch, "notes": notes,
            **{k: v for k, v in theirs.items() if k in ("model_name", "hook_name")}}
    return _trained(sae, params, stats, meta)


def _cfg_int(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"'{where}': {SAELENS_CFG} field '{key}' is {value!r}, not a positive integer; set it or "
                         f"{REEXPORT}.")
    return value


def _check_saelens_tensors(tensors: Arrays, cls: type[SAE], d: int, m: int, where: str) -> None:
    """The weights a SAELens ``cls.saelens`` SAE of d_in=d, d_sae=m needs, with their shapes."""
    arch = cls.saelens
    want = {k: {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}.get(k, (m,)) for k in cls.saelens_tensors}
    bad = [f"{k} is {tuple(tensors[k].shape) if k in tensors else 'missing'} (expected {shape})"
           for k, shape in want.items() if k not in tensors or tuple(tensors[k].shape) != shape]
    if bad:
        raise ValueError(f"'{where}': the weights are not a SAELens {arch} SAE with d_in={d}, d_sae={m}: "
                         f"{'; '.join(bad)}; {REEXPORT}.")


SPEC_TO_CONFIG = {
    "d_model": "model.d_model", "d_sae": "model.d_sae", "penalty": "sparsity.penalty",
    "init_decoder_norm": "model.init_decoder_norm", "init_b_dec": "model.init_b_dec",
    "apply_b_dec_to_input": "model.apply_b_dec_to_input", "dead_tokens": "train.dead_tokens",
    "aux_coefficient": "model.aux_coefficient", "k": "model.k", "k_aux": "model.k_aux",
    **{hyper: f"model.{key}" for key, (hyper, _, _) in config_lib.OPTIONS.items()},
}
"""Our SAE hyper-parameters -> config keys (the inverse of ``make_sae``)."""


def config_for(sae: SAE, init_from: str | Path, workdir: str | Path) -> config_lib.Config:
    """A resolved config whose ``make_sae`` gives ``sae`` back, starting from ``init_from``."""
    tree: dict = {}
    for name, value in sae_folder.sae_spec(sae).items():
        if name == "architecture":
            config_lib.set_path(tree, "model.architecture", value)
        elif name in SPEC_TO_CONFIG:
            config_lib.set_path(tree, SPEC_TO_CONFIG[name], value)
    config_lib.set_path(tree, "model.init_from", str(init_from))
    config_lib.set_path(tree, "train.workdir", str(workdir))
    return config_lib.resolve(config_lib.from_dict(tree))

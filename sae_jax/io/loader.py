"""Load a trained SAE from wherever one lives, or import one into a new work directory.

``load`` reads our ``sae/`` folders (``sae_jax.io.sae_folder``), a work directory or a sweep holding
them, SAELens folders (``sae_jax.io.saelens``) and Gemma Scope ``params.npz`` files
(``sae_jax.io.gemma_scope``); ``import_sae`` writes any of them as a work directory that
``sae-jax train`` continues.
"""

from __future__ import annotations

from pathlib import Path

from sae_jax import config as config_lib
from sae_jax.io import gemma_scope, layout, sae_folder, saelens
from sae_jax.io.sae_folder import SAE_DIR, SPEC, WEIGHTS, TrainedSAE


def _candidates(root: Path) -> dict[str, Path]:
    """Named SAE folders under root: ours (sae/) and exported SAELens folders."""
    found = {sae_folder.member_name(root, f): f for f in sae_folder.find_saes(root)}
    for cfg in sorted(root.rglob(saelens.SAELENS_CFG)):
        if saelens.is_saelens_folder(cfg.parent):
            found.setdefault(sae_folder.member_name(root, cfg.parent), cfg.parent)
    return found


def load(path: str | Path, member: str | None = None) -> TrainedSAE:
    """Load a trained SAE from any of the places one lives.

    ``path``: a work directory (WORKDIR/sae/), an ``sae/`` folder written by ``sae_folder.save``, a sweep
    directory (pick the member by ``member``: its name under members/, or its relative path),
    a SAELens folder (cfg.json + sae_weights.safetensors, e.g. from ``sae-jax export``), or a
    Gemma Scope ``params.npz``.
    """
    path = Path(path)
    _check_path(path)
    if path.is_file():  # a .npz: _check_path refuses other files
        return gemma_scope.load_gemma_scope(path)
    if member is None:
        if (path / SPEC).is_file() or (path / WEIGHTS).is_file():
            return sae_folder.load_folder(path)
        if (path / SAE_DIR / SPEC).is_file() or (path / SAE_DIR / WEIGHTS).is_file():
            return sae_folder.load_folder(path / SAE_DIR)
        if saelens.is_saelens_folder(path):
            return saelens.load_saelens(path)
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
    store_meta = path / layout.STORE_METADATA
    if store_meta.is_file() and layout.STORE_FORMAT in store_meta.read_text(errors="replace"):
        raise ValueError(f"'{path}' is an activation store, not a trained SAE; pass {where}.")


def import_sae(src: str | Path, out: str | Path, member: str | None = None) -> tuple[Path, TrainedSAE]:
    """Import a SAELens folder, a Gemma Scope params.npz (or one of our SAEs) into work directory ``out``.

    Writes ``out/sae/`` (so ``eval`` and ``api.load`` read it) and ``out/config.yaml`` with
    ``model.init_from = out/sae``, so ``sae-jax train out/config.yaml data.store=...`` continues
    training it. Returns the sae/ folder and the loaded SAE.
    """
    out = Path(out)
    if (out / SAE_DIR).exists() or (out / layout.CONFIG).exists():
        raise ValueError(f"'{out}' already holds a work directory (sae/ or config.yaml); choose a new --out "
                         "directory or remove it.")
    model = load(src, member=member)
    folder = sae_folder.save(out / SAE_DIR, model.sae, model.params, model.stats, model.meta)
    cfg = saelens.config_for(model.sae, folder.resolve(), out)
    config_lib.save_config(cfg, out / layout.CONFIG)
    return folder, model

"""Judge SAEs by what the language model loses when the SAE's reconstruction replaces the activation.

For each SAE (a run's ``sae/``, or every sweep member's), on held-out contexts:

- ``ce_clean``: next-token cross-entropy of the unchanged model;
- ``ce_sae``: with the hook's activation replaced by the SAE's reconstruction, and
  ``delta_loss = ce_sae - ce_clean``;
- ``ce_zero_abl`` / ``ce_mean_abl``: with it replaced by zeros / by the mean activation;
- ``ce_loss_score_{zero,mean}`` = (ce_abl - ce_sae) / (ce_abl - ce_clean), the fraction of the
  loss the ablation costs that the SAE recovers (Bricken et al. 2023, "Towards
  Monosemanticity"; SAELens ``ce_loss_score``);
- ``kl_sae`` = mean KL(p_clean || p_sae) over scored positions, and
  ``kl_score_{zero,mean}`` = 1 - kl_sae / kl_abl;
- the same numbers for a PCA baseline with k = round(mean L0 of the SAE) components, fitted on
  the SAE's training store (``pca_*``): a dense reconstruction of the same size.

Excluded positions (the harvest's exclusions: BOS, EOS, PAD, control tokens) are never
spliced: their activation passes through unchanged. A prediction is scored when both its
position and its target token are not excluded. Every variant, the clean one included (as an
identity splice), runs through the same spliced forward, so differences come from the splice.

Held-out contexts: with the harvest's corpus and context size, the contexts right after the
ones the store was harvested from (same packing and de-duplication); with another corpus,
its first contexts. The mean and the PCA are fitted on up to ``FIT_ROWS`` rows of the store.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from sae_jax.data import store as store_lib
from sae_jax.io import layout, sae_folder
from sae_jax.lm import harvest

FIT_ROWS = 32768
DEFAULT_CONTEXTS = 32
SpliceFn = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- baselines


@dataclasses.dataclass(frozen=True)
class PCA:
    """Mean and principal directions of a hook's activations (Pearson 1901), for baselines."""

    mean: np.ndarray
    """float32 [d]: the mean activation (the mean-ablation value)."""
    components: np.ndarray
    """float32 [d, d]: principal directions as rows, by decreasing variance."""
    fitted_on: str
    """Where the rows came from."""

    def reconstruct(self, x: jax.Array, k: int) -> jax.Array:
        """mean + projection of (x - mean) onto the top ``k`` directions."""
        v = jnp.asarray(self.components[:k])
        return self.mean + ((x - self.mean) @ v.T) @ v


def fit_pca(rows: np.ndarray, fitted_on: str = "") -> PCA:
    """PCA of rows [n, d] by SVD of the centred rows (float64)."""
    rows = np.asarray(rows, np.float64)
    mean = rows.mean(axis=0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    components = np.zeros((rows.shape[1], rows.shape[1]))
    components[:len(vt)] = vt  # fewer rows than d: the rest stay zero (no variance seen there)
    return PCA(mean.astype(np.float32), components.astype(np.float32), fitted_on)


def store_sample(store: store_lib.Store, site: str, max_rows: int = FIT_ROWS, block: int = 1024) -> np.ndarray:
    """Up to ``max_rows`` rows of a site, read as evenly spaced blocks."""
    n = store.n_tokens
    if n <= max_rows:
        return store.read(0, n, site=site)
    starts = np.linspace(0, n - block, max(1, max_rows // block)).astype(np.int64)
    return np.concatenate([store.read(int(s), int(s) + block, site=site) for s in starts])


# --------------------------------------------------------------------------- losses


def scored_mask(tokens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bool [B, T-1]: prediction t -> t+1 is scored when neither token is excluded."""
    return keep[:, :-1] & keep[:, 1:]


@jax.jit
def _log_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


@jax.jit
def _ce_kl_sums(logits: jax.Array, clean_logp: jax.Array, targets: jax.Array, mask: jax.Array):
    """(sum of CE, sum of KL(clean || this)) over the scored positions."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(clean_logp) * (clean_logp - logp), axis=-1)
    return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(jnp.where(mask, kl, 0.0))


def _masked(fn: SpliceFn, keep: np.ndarray) -> SpliceFn:
    """``fn`` applied where ``keep`` [B, T] holds; excluded positions pass through."""
    keep = jnp.asarray(keep)[..., None]
    return lambda x: jnp.where(keep, jnp.asarray(fn(x), jnp.float32), jnp.asarray(x, jnp.float32))


def splice_losses(source, hook: str, contexts: np.ndarray, keep: np.ndarray, splices: Mapping[str, SpliceFn],
                  batch_size: int = 4) -> dict[str, dict[str, float]]:
    """{name: {"ce", "kl"}} per splice, plus "clean" (the identity splice), mean over scored predictions.

    Each splice maps the hook's activation [B, T, d] to its replacement; it is applied only at
    kept positions.
    """
    sums = {name: np.zeros(2) for name in ("clean", *splices)}
    n_scored = 0
    for s in range(0, len(contexts), batch_size):
        tokens, k = contexts[s:s + batch_size], keep[s:s + batch_size]
        mask = jnp.asarray(scored_mask(tokens, k))
        targets = jnp.asarray(tokens[:, 1:], jnp.int32)
        clean = jnp.asarray(source.logits(tokens, {hook: _masked(lambda x: x, k)}))
        clean_logp = _log_probs(clean)
        sums["clean"] += np.asarray(jax.device_get(_ce_kl_sums(clean, clean_logp, targets, mask)))
        for name, fn in splices.items():
            logits = jnp.asarray(source.logits(tokens, {hook: _masked(fn, k)}))
            sums[name] += np.asarray(jax.device_get(_ce_kl_sums(logits, clean_logp, targets, mask)))
        n_scored += int(mask.sum())
    if n_scored == 0:
        raise ValueError("no prediction is scored: every context position is excluded; use longer contexts.")
    return {name: {"ce": float(v[0] / n_scored), "kl": float(v[1] / n_scored), "scored": n_scored}
            for name, v in sums.items()}


def loss_scores(clean: Mapping, variant: Mapping, zero: Mapping, mean: Mapping) -> dict[str, float]:
    """CE-loss and KL scores of ``variant`` against zero- and mean-ablation (1 = clean, 0 = ablated)."""

    def ratio(num, den):
        return float(num / den) if den != 0 else math.nan

    return {"ce_loss_score_zero": ratio(zero["ce"] - variant["ce"], zero["ce"] - clean["ce"]),
            "ce_loss_score_mean": ratio(mean["ce"] - variant["ce"], mean["ce"] - clean["ce"]),
            "kl_score_zero": 1.0 - ratio(variant["kl"], zero["kl"]),
            "kl_score_mean": 1.0 - ratio(variant["kl"], mean["kl"])}


# --------------------------------------------------------------------------- SAEs and their provenance


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """One SAE to judge, with the store it was trained on."""

    name: str
    """Its name in the work directory (the run's, or members/NAME)."""
    model: sae_folder.TrainedSAE
    """The loaded SAE (raw-activation parameters)."""
    store: store_lib.Store | None
    """Its training store, when found."""
    site: str | None
    """The store site it was trained on (data.site), None = the store's default."""


def find_targets(workdir: str | Path, data: str | None = None) -> list[Target]:
    """Every SAE under ``workdir`` (``sae/``, ``members/*/sae``) with its training store (or ``data``)."""
    workdir = Path(workdir)
    targets = []
    for folder in sae_folder.require_saes(workdir, "train one with `sae-jax train` or `sae-jax sweep`"):
        run = folder.parent if folder.name == sae_folder.SAE_DIR else folder
        cfg = _run_data_config(run, workdir)
        path = data or cfg.get("store") or ""
        store = _open_store(path, run, workdir) if path else None
        targets.append(Target(sae_folder.member_name(workdir, folder), sae_folder.load_folder(folder), store,
                              cfg.get("site") or None))
    return targets


def _run_data_config(run: Path, workdir: Path) -> dict:
    for path in (run / layout.CONFIG, workdir / layout.CONFIG):
        if path.is_file():
            return (yaml.safe_load(path.read_text()) or {}).get("data", {}) or {}
    return {}


def _open_store(path: str, run: Path, workdir: Path) -> store_lib.Store:
    for candidate in (Path(path), run / path, workdir / path):
        if (candidate / store_lib.METADATA_FILE).is_file():
            return store_lib.open_store(candidate)
    raise FileNotFoundError(f"the training store '{path}' of {run} is not found; pass --data STORE.")


def harvest_source(target: Target) -> dict:
    """The store's harvest metadata (model, corpus, hooks, exclusions), or {}."""
    meta = target.store.metadata.get("source", {}) if target.store is not None else {}
    return meta if meta.get("kind") == "harvest" else {}


# --------------------------------------------------------------------------- evaluation


def heldout_contexts(source, corpus: harvest.Corpus, context: int, n: int, harvested: Mapping) -> np.ndarray:
    """``n`` contexts not in the harvest: after its contexts when the corpus, tokenizer and size match."""
    same = (harvested.get("corpus", {}).get("sha256") == corpus.sha256
            and harvested.get("context_size") == context
            and harvested.get("model", {}).get("tokenizer_hash") == source.tokenizer_hash)
    skip = int(harvested.get("n_contexts", 0)) if same else 0
    return harvest.contexts_for(source, corpus, context, skip + n)[skip:]


def kept_activations(source, hook: str, contexts: np.ndarray, keep: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 rows [n, d] of ``hook`` at the kept positions, in (context, position) order."""
    return np.concatenate([np.asarray(source(contexts[s:s + batch_size], [hook])[hook], np.float32)[
        keep[s:s + batch_size]] for s in range(0, len(contexts), batch_size)])


def sae_stats(model: sae_folder.TrainedSAE, acts: np.ndarray) -> dict[str, float]:
    """Mean L0 and FVU of an SAE on activation rows [n, d]."""
    f = np.asarray(model.encode(acts))
    x_hat = np.asarray(model.decode(f))
    resid = ((acts - x_hat) ** 2).sum()
    total = ((acts - acts.mean(axis=0)) ** 2).sum()
    return {"l0": float((f != 0).sum(axis=-1).mean()), "fvu": float(resid / total)}


def evaluate_hook(source, hook: str, targets: Sequence[Target], contexts: np.ndarray, exclude: Sequence[int],
                  pca: PCA, batch_size: int = 4) -> dict[str, dict]:
    """Every metric of every target SAE at ``hook`` on ``contexts``."""
    keep = ~np.isin(contexts, list(exclude))
    acts = kept_activations(source, hook, contexts, keep, batch_size)
    stats = {t.name: sae_stats(t.model, acts) for t in targets}
    ks = {t.name: int(min(max(1, round(stats[t.name]["l0"])), source.d_model)) for t in targets}
    splices: dict[str, SpliceFn] = {"zero": jnp.zeros_like, "mean": lambda x: jnp.broadcast_to(pca.mean, x.shape)}
    splices |= {f"sae:{t.name}": _reconstructor(t.model) for t in targets}
    splices |= {f"pca:{k}": (lambda x, k=k: pca.reconstruct(x, k)) for k in sorted(set(ks.values()))}
    losses = splice_losses(source, hook, contexts, keep, splices, batch_size)
    return {t.name: _summary(t, hook, stats[t.name], ks[t.name], losses, pca) for t in targets}


def _reconstructor(model: sae_folder.TrainedSAE) -> SpliceFn:
    return lambda x: model.reconstruct(jnp.asarray(x, jnp.float32))


def _summary(target: Target, hook: str, stats: dict, k: int, losses: dict, pca: PCA) -> dict:
    clean, zero, mean = losses["clean"], losses["zero"], losses["mean"]
    sae, base = losses[f"sae:{target.name}"], losses[f"pca:{k}"]
    out = {"hook": hook, "architecture": target.model.sae.name, "d_sae": target.model.sae.d_sae,
           "scored_tokens": clean["scored"], **stats, "ce_clean": clean["ce"], "ce_sae": sae["ce"],
           "delta_loss": sae["ce"] - clean["ce"], "ce_zero_abl": zero["ce"], "ce_mean_abl": mean["ce"],
           "kl_sae": sae["kl"], "kl_zero_abl": zero["kl"], "kl_mean_abl": mean["kl"],
           **loss_scores(clean, sae, zero, mean)}
    out |= {"pca_k": k, "pca_ce": base["ce"], "pca_delta_loss": base["ce"] - clean["ce"], "pca_kl": base["kl"],
            **{f"pca_{key}": v for key, v in loss_scores(clean, base, zero, mean).items()},
            "pca_fitted_on": pca.fitted_on}
    return out


def evaluate_lm(workdir: str | Path, *, model: str | None = None, corpus: str | None = None,
                hook: str | None = None, data: str | None = None, contexts: int = DEFAULT_CONTEXTS,
                context: int | None = None, batch_size: int = 4) -> dict[str, dict]:
    """{SAE name: metrics} for every SAE under ``workdir``; model, corpus, hook and context size
    default to those recorded in the training store's harvest metadata."""
    targets = find_targets(workdir, data)
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        groups.setdefault(_settings(t, model, corpus, hook, context), []).append(t)
    results = {}
    for (model_spec, corpus_spec, hook_name, size, _store), members in groups.items():
        source = harvest.load_model(model_spec)
        if not source.has_logits:
            raise ValueError(f"model '{model_spec}' has no language-model head, so eval-lm cannot score it.")
        harvested = harvest_source(members[0])
        held = heldout_contexts(source, harvest.load_corpus(corpus_spec), size, contexts, harvested)
        exclude = harvested.get("exclude_ids", harvest.default_exclusions(source))
        pca = _baseline(members[0], hook_name, source, held, exclude, batch_size)
        results |= evaluate_hook(source, hook_name, members, held, exclude, pca, batch_size)
    return results


def _settings(t: Target, model, corpus, hook, context) -> tuple:
    """(model spec, corpus spec, hook, context size, store path) of one target, flags first."""
    meta = harvest_source(t)
    model = model or meta.get("model", {}).get("spec")
    corpus = corpus or meta.get("corpus", {}).get("name")
    if hook is None:
        hook = t.store.site_name(t.site) if t.store is not None else None
    missing = [flag for flag, v in (("--model", model), ("--corpus", corpus), ("--hook", hook)) if not v]
    if missing:
        raise ValueError(f"SAE '{t.name}': its training store does not record {', '.join(missing)}; pass "
                         f"{' and '.join(missing)}.")
    if t.store is not None and t.model.sae.d_model != t.store.d_model:
        raise ValueError(f"SAE '{t.name}' has d_model {t.model.sae.d_model} but its store {t.store.path} has "
                         f"{t.store.d_model}; pass --data with the right store.")
    size = context or int(meta.get("context_size", 128))
    return model, corpus, hook, size, str(t.store.path) if t.store is not None else ""


def _baseline(target: Target, hook: str, source, contexts, exclude, batch_size) -> PCA:
    """PCA (and mean) fitted on the training store's rows of ``hook``; on the eval activations without one."""
    if target.store is not None and hook in target.store.sites:
        return fit_pca(store_sample(target.store, hook), f"{target.store.path} ({hook})")
    warnings.warn(f"SAE '{target.name}': no training store with site {hook}; the mean and PCA baselines are "
                  "fitted on the evaluation contexts themselves.", stacklevel=2)
    acts = kept_activations(source, hook, contexts, ~np.isin(contexts, list(exclude)), batch_size)
    return fit_pca(acts, "the evaluation contexts")


# --------------------------------------------------------------------------- report


ROWS = (("l0", "l0", "pca_k"), ("fvu", "fvu", None), ("ce_clean", "ce_clean", None),
        ("ce_zero_abl", "ce_zero_abl", None), ("ce_mean_abl", "ce_mean_abl", None), ("ce", "ce_sae", "pca_ce"),
        ("delta_loss", "delta_loss", "pca_delta_loss"),
        ("ce_loss_score_zero", "ce_loss_score_zero", "pca_ce_loss_score_zero"),
        ("ce_loss_score_mean", "ce_loss_score_mean", "pca_ce_loss_score_mean"),
        ("kl", "kl_sae", "pca_kl"), ("kl_score_zero", "kl_score_zero", "pca_kl_score_zero"),
        ("kl_score_mean", "kl_score_mean", "pca_kl_score_mean"))
"""(row label, key of the SAE's value, key of the PCA baseline's value or None)."""


def table(results: Mapping[str, dict]) -> str:
    """One block per SAE: its metrics beside those of the PCA baseline at its L0."""
    blocks = []
    for name, r in results.items():
        lines = [f"{name}: {r['architecture']} d_sae {r['d_sae']} at {r['hook']}, {r['scored_tokens']} scored tokens",
                 f"  {'metric':<20} {'SAE':>10} {'PCA':>10}"]
        for label, sae_key, pca_key in ROWS:
            lines.append(f"  {label:<20} {_fmt(r.get(sae_key)):>10} {_fmt(r.get(pca_key) if pca_key else None):>10}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

"""Evaluate a trained SAE on activations: FVU, L0, dead/dense fractions, gamma, MMCS."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from sae_jax.eval import metrics
from sae_jax.io.sae_folder import TrainedSAE


def evaluate(model: TrainedSAE, batches: Iterable[np.ndarray], ground_truth: np.ndarray | None = None) -> dict:
    """Metrics over every batch (raw activations), plus MMCS when ground truth is given."""
    sae = model.sae

    @jax.jit
    def sums(params, stats, x):
        bound = sae.bind(params, stats)
        f = bound.encode(x)
        return metrics.batch_sums(x, bound.decode(f), f)

    total = None
    for x in batches:
        total = metrics.add_sums(total, sums(model.params, model.stats, np.asarray(x, np.float32)))
    if total is None:
        raise ValueError("no tokens to evaluate: the evaluation split is empty; lower data.holdout_fraction's "
                         "rounding by using a larger store or pass --max-tokens.")
    result = metrics.summarize(total)
    result["density_histogram"] = metrics.density_histogram(total.fired, float(total.n))
    if ground_truth is not None:
        result |= metrics.mmcs(model.W_dec, ground_truth)
    return result


def table(result: dict, title: str = "evaluation") -> str:
    """A readable two-column table of the scalar metrics."""
    keys = ["tokens", "fvu", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction", "gamma",
            "mmcs", "recovered_fraction"]
    rows = [(k, result[k]) for k in keys if k in result]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:>12}" for k, v in rows]
    return "\n".join(lines)

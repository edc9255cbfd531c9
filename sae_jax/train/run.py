"""What a job trains: ``Run`` (the store, architecture, optimizer and mesh that the loop builds before the
first step) and ``Member`` (one model: a single run, or one point of a sweep's grid)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from sae_jax.config import Config
from sae_jax.data import store as store_lib
from sae_jax.models.sae import SAE


@dataclass
class Run:
    """What the loop builds before the first step."""

    cfg: Config
    store: store_lib.Store
    sae: SAE
    mesh: jax.sharding.Mesh
    scale: float
    tx: object
    lr_schedule: object
    coef: object
    ground_truth: np.ndarray | None = None
    """The store's true dictionary (synthetic stores), checked against its digest before any work."""


@dataclass(frozen=True)
class Member:
    """One model a job trains: a single run, or one point of a sweep's grid."""

    name: str
    """Its key in logs and summaries; for a sweep the directory name under WORKDIR/members (e.g.
    'architecture-relu_coefficient-0.001')."""
    point: dict[str, Any]
    """The grid values of a sweep member (dotted key -> value); {} for a single run."""
    cfg: Config
    """The member's resolved config: exactly what a single run of it would use (its train.workdir included)."""

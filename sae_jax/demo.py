"""The main job on the embedded default: synthetic activations with known ground truth,
a ReLU SAE trained on them, and its evaluation against the true features.

`sae-jax demo` runs it; `configs/demo.yaml` holds the same settings for `sae-jax train`.
"""

from __future__ import annotations

import time
from pathlib import Path

from sae_jax import config as config_lib
from sae_jax.data import store as store_lib
from sae_jax.data.synthetic import SynthSpec, write_synthetic

SPEC = SynthSpec(d_model=64, n_features=256, n_tokens=500_000, seed=0, l0=5.0)
CONFIG = {
    "model": {"architecture": "relu", "d_sae": 512},
    "sparsity": {"coefficient": 0.07},  # the penalty is relu's recipe (l1), as in configs/demo.yaml
    "optim": {"lr": 3.0e-3, "decay": "linear"},
    "train": {"steps": 8000, "batch_size": 1024, "log_every": 200},
    "seed": 0,
}
TARGETS = {"mmcs": 0.9, "fvu": 0.1}


def ensure_store(path: Path) -> store_lib.Store:
    """Open the demo store, writing it first if it is missing (or was never finalized)."""
    if (path / store_lib.METADATA_FILE).exists():
        return store_lib.open_store(path)  # a damaged store stops with its own message
    print(f"writing synthetic activations ({SPEC.n_tokens:,} × {SPEC.d_model}, {SPEC.n_features} true "
          f"features) to {path}")
    return write_synthetic(path, SPEC, overwrite=True)  # a partial store of a stopped demo is started again


def run(root: str | Path = "runs", overrides: list[str] | tuple = ()) -> dict:
    """Synthesize (once), train, evaluate; returns the summary with a pass/fail verdict."""
    from sae_jax.train.loop import train

    root = Path(root)
    store = ensure_store(root / "synth")
    base = dict(CONFIG, data={"store": str(store.path)}, train=dict(CONFIG["train"], workdir=str(root / "demo")))
    cfg = config_lib.load_config(None, list(overrides), base=base)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["targets_met"] = summary["mmcs"] >= TARGETS["mmcs"] and summary["fvu"] <= TARGETS["fvu"]
    return summary

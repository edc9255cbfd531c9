"""The demo's own plumbing on a fresh root: store written once, reused, a half-written one replaced."""

import json

from sae_jax import demo
from sae_jax.data import store as store_lib


def test_demo_runs_on_a_fresh_root_and_reuses_its_store(tmp_path):
    partial = tmp_path / ("synth" + store_lib.PARTIAL_SUFFIX)
    partial.mkdir()
    (partial / "junk").write_text("a writer stopped here")  # what an interrupted first demo leaves
    summary = demo.run(tmp_path, ["train.steps=20", "train.log_every=10", "train.eval_tokens=4096"])
    assert not partial.exists()
    store = store_lib.open_store(tmp_path / "synth")
    assert store.n_tokens == demo.SPEC.n_tokens and (store.path / "ground_truth.npy").exists()
    assert summary["steps"] == 20 and summary["fvu"] > 0.0 and 0.0 <= summary["mmcs"] <= 1.0
    assert summary["targets_met"] == (summary["mmcs"] >= 0.9 and summary["fvu"] <= 0.1)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 20
    stamp = (store.path / store_lib.METADATA_FILE).stat().st_mtime_ns
    assert demo.ensure_store(tmp_path / "synth").identity == store.identity  # reused, not rewritten
    assert (store.path / store_lib.METADATA_FILE).stat().st_mtime_ns == stamp

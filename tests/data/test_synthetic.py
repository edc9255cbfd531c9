"""Synthetic data: determinism by seed, ground truth, power-law frequencies."""

import numpy as np
import pytest

from sae_jax.data import store as store_lib
from sae_jax.data.synthetic import SynthSpec, feature_probs, generate, write_synthetic


def _spec(seed):
    return SynthSpec(d_model=16, n_features=40, n_tokens=70_000, seed=seed, l0=3.0)


def test_same_seed_same_store_other_seed_differs(tmp_path):
    a = write_synthetic(tmp_path / "a", _spec(0))
    b = write_synthetic(tmp_path / "b", _spec(0))
    c = write_synthetic(tmp_path / "c", _spec(1))
    xa, xb, xc = (s.read(0, s.n_tokens) for s in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    ga = np.load(tmp_path / "a" / "ground_truth.npy")
    assert np.array_equal(ga, np.load(tmp_path / "b" / "ground_truth.npy"))
    assert ga.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(ga, axis=1), 1.0, rtol=1e-5)
    meta = store_lib.open_store(tmp_path / "a").metadata
    assert meta["d_model"] == 16 and meta["n_tokens"] == 70_000
    assert meta["source"]["synthetic"]["seed"] == 0


def test_feature_probs_power_law():
    p = feature_probs(100, 5.0, 0.7)
    assert abs(p.sum() - 5.0) < 1e-4 and np.all(np.diff(p) <= 0)
    assert p[0] / p[9] == np.float32(10**0.7) or abs(p[0] / p[9] - 10**0.7) < 1e-3


def test_rows_are_sparse_combinations(tmp_path):
    spec = SynthSpec(d_model=16, n_features=40, n_tokens=1000, seed=2, l0=3.0, noise=0.0, offset=0.0)
    s = write_synthetic(tmp_path / "s", spec)
    x = s.read(0, 1000)
    g = np.load(tmp_path / "s" / "ground_truth.npy")
    codes, *_ = np.linalg.lstsq(g.T, x.T, rcond=None)  # x lies in the span of G
    np.testing.assert_allclose(g.T @ codes, x.T, atol=1e-4)


def test_generate_from_a_row_gives_the_same_rows():
    spec = SynthSpec(d_model=8, n_features=20, n_tokens=150_000, seed=5, l0=2.0)
    whole = np.concatenate(list(generate(spec)))
    for start in (0, 1, 65536, 70_000, 149_999, 150_000):
        rest = list(generate(spec, start=start))
        tail = np.concatenate(rest) if rest else np.zeros((0, 8), np.float32)
        assert tail.tobytes() == whole[start:].tobytes(), start


def test_resumed_synthetic_store_equals_an_uninterrupted_one(tmp_path):
    spec = SynthSpec(d_model=16, n_features=40, n_tokens=100_000, seed=0, l0=3.0)
    clean = write_synthetic(tmp_path / "clean", spec)
    source = clean.metadata["source"]
    writer = store_lib.create_store(tmp_path / "s", d_model=16, source=source)
    for rows in generate(spec):  # a writer that stopped after one whole shard
        writer.append(rows)
        break
    assert 0 < writer.n_durable < spec.n_tokens
    other = SynthSpec(d_model=16, n_features=40, n_tokens=100_000, seed=1, l0=3.0)
    with pytest.raises(store_lib.StoreError, match=r"other settings \(synthetic.seed\)"):
        write_synthetic(tmp_path / "s", other, resume=True)
    resumed = write_synthetic(tmp_path / "s", spec, resume=True)
    assert resumed.read(0, spec.n_tokens).tobytes() == clean.read(0, spec.n_tokens).tobytes()
    drop = ("created",)
    assert {k: v for k, v in resumed.metadata.items() if k not in drop} == \
        {k: v for k, v in clean.metadata.items() if k not in drop}

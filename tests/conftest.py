"""Shared fixtures: small synthetic stores made once per session."""

import pytest

from sae_jax.data.synthetic import SynthSpec, write_synthetic

SMALL = SynthSpec(d_model=32, n_features=96, n_tokens=65536, seed=1, l0=4.0)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A finalized synthetic store (32-d, 96 true features, 65k tokens)."""
    path = tmp_path_factory.mktemp("stores") / "small"
    return write_synthetic(path, SMALL)

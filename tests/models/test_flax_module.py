"""The SAEs as Flax NNX modules, used from a user's own Flax code.

Every architecture is an ``nnx.Module`` whose parameters carry logical sharding names as Flax
metadata. Here a user's module holds one beside an ``nnx.Linear``; on 8 fake CPU devices its
shardings are read the Flax way (``nnx.get_named_sharding`` under the rules table), a forward pass
is jitted with them, and every SAE parameter and statistic is laid out as the golden file says
for the training state (tests/fixtures/partition_specs.json).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae_jax.models import registry

GOLDEN = Path(__file__).parents[1] / "fixtures" / "partition_specs.json"
MESH = (2, 4)  # data x model
D_MODEL, D_SAE = 16, 64


class Probe(nnx.Module):
    """A user's module: an SAE on a hidden layer, and a linear read-out of its code."""

    def __init__(self, architecture: str, rngs: nnx.Rngs):
        cls = registry()[architecture]
        hyper = {"k": 4} if cls.uses_k else {}
        self.embed = nnx.Linear(8, D_MODEL, rngs=rngs)
        self.sae = cls(D_MODEL, D_SAE, rngs=rngs, **hyper)
        self.readout = nnx.Linear(D_SAE, 2, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        return self.readout(self.sae.encode(h)), self.sae(h)


def spec_text(spec) -> str:
    """A PartitionSpec as the golden file writes it (trailing Nones dropped)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return str(jax.sharding.PartitionSpec(*entries))


def run_on_mesh(architecture: str) -> dict:
    """Build, shard by the Flax metadata, jit a forward pass; the SAE's specs and the forward's result."""
    from sae_jax import sharding

    mesh = sharding.make_mesh(*MESH)
    model = Probe(architecture, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 8))
    reference = model(x)
    graphdef, state = nnx.split(model)
    with nnx.logical_axis_rules(sharding.RULES):
        shardings = nnx.get_named_sharding(state, mesh)
    state = jax.device_put(state, shardings)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    out = forward(state, jax.device_put(x, sharding.batch_sharding(mesh)))
    specs = {}
    for name, variable in nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state).sae)):
        kind = "params" if issubclass(variable.type, nnx.Param) else "stats"
        specs[f".{kind}['{name[0]}']"] = spec_text(variable.get_value().sharding.spec)
    close = all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(jax.tree.leaves(out),
                                                                         jax.tree.leaves(reference), strict=True))
    return {"specs": specs, "same_as_unsharded": close, "devices": len(jax.devices())}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("flax") / "report.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("architecture", sorted(json.loads(GOLDEN.read_text())))
def test_an_sae_inside_a_users_module_shards_as_the_golden_file(report, architecture):
    run = report[architecture]
    assert run["devices"] == 8 and run["same_as_unsharded"]
    golden = json.loads(GOLDEN.read_text())[architecture]
    expected = {path: spec for path, spec in golden.items() if path.startswith((".params", ".stats"))}
    assert run["specs"] == expected
    assert run["specs"][".params['W_enc']"] == "P(None, 'model')"  # the dictionary axis on 'model'


def test_the_module_is_the_pure_functions_the_trainer_uses():
    """``sae(x)``, ``encode`` and ``decode`` on the module equal the pure path over its split dicts."""
    for architecture, cls in registry().items():
        sae = cls(D_MODEL, D_SAE, rngs=nnx.Rngs(3), **({"k": 4} if cls.uses_k else {}))
        x = jax.random.normal(jax.random.key(2), (5, D_MODEL))
        params, stats = sae.split()
        assert set(params) | set(stats) <= set(cls.param_axes()), architecture
        bound = sae.bind(params, stats)
        np.testing.assert_array_equal(bound(x), sae(x))
        np.testing.assert_array_equal(sae.decode(sae.encode(x)), sae(x))
        loss, out = jax.jit(lambda p, s, x, sae=sae: sae.loss(p, x, jnp.float32(0.1), s))(params, stats, x)
        assert np.isfinite(float(loss)) and out.x_hat.shape == x.shape, architecture


def test_the_readme_flax_example_runs_as_written():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "nnx.Rngs" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["x_hat"].shape == (8, 64) and scope["f"].shape == (8, 1024)
    np.testing.assert_array_equal(scope["sae"].decode(scope["f"]), scope["x_hat"])
    assert scope["specs"]["W_enc"].get_value() == jax.sharding.PartitionSpec(None, "model")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    Path(sys.argv[1]).write_text(json.dumps({a: run_on_mesh(a) for a in json.loads(GOLDEN.read_text())}))

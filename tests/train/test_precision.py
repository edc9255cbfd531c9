"""Mixed precision (issue 17): ``train.compute_dtype`` (bfloat16 matmul inputs, float32 accumulation)
and ``optim.moment_dtype`` (Adam's moments stored in bfloat16)."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import config as config_lib
from sae_jax import demo
from sae_jax.data.synthetic import write_synthetic
from sae_jax.models import activations as act
from sae_jax.models import make_sae, registry
from sae_jax.train import checkpoint, loop
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state

D, M, B = 16, 64, 32


def tiny(arch: str, *extra: str):
    """(sae, cfg, state, x) for ``arch`` at d 16, m 64, batch 32."""
    cfg = config_lib.load_config(None, [f"model.architecture={arch}", f"model.d_model={D}", f"model.d_sae={M}",
                                        "model.k=4", *extra])
    sae = make_sae(cfg.model, cfg.sparsity.penalty, 1000)
    x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
    state = init_state(sae, step_lib.make_optimizer(cfg.optim), jax.random.key(0), x, cfg.optim.lr,
                       cfg.sparsity.coefficient)
    return sae, cfg, state, x


def lowered(arch: str, **kw) -> str:
    sae, cfg, state, x = tiny(arch)
    fn = step_lib.make_train_step(sae, step_lib.make_optimizer(cfg.optim), step_lib.schedule(cfg.optim, 100),
                                  step_lib.coefficient_factor(5), **kw)
    return jax.jit(fn).lower(state, x).as_text()


DOT = re.compile(r"dot_general[^\n]*:\s*\(tensor<([^>]*)>, tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>")


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_float32_policy_is_the_program_without_one(arch):
    assert lowered(arch) == lowered(arch, compute_dtype="float32")


@pytest.mark.parametrize("arch", sorted(registry()))
def test_bfloat16_dense_dots_take_bf16_and_give_f32(arch):
    dots = DOT.findall(lowered(arch, compute_dtype="bfloat16"))
    # Dense [B,d]x[d,m]-like products (rank-2 results); the ones-vector batch sums stay float32.
    dense = [d for d in dots if d[2].count("x") == 2]
    assert dense, arch
    for a, b, out in dense:
        assert a.endswith("bf16") and b.endswith("bf16") and out.endswith("f32"), (arch, a, b, out)


@pytest.mark.parametrize("arch", sorted(registry()))
def test_bfloat16_gradients_match_float32(arch):
    """On bfloat16-representable parameters and inputs (so that a top-k near-tie or a pre-activation
    at 0 cannot flip between the two: the forward products are then exact in float32), the
    bfloat16 gradients are float32's up to the rounding of the backward's cotangents."""
    sae, cfg, state, x = tiny(arch)
    params, x = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype) if a.dtype == jnp.float32 else a,
                             (state.params, x))

    def grads(dtype):
        with act.compute_dtype(dtype):
            return jax.jit(jax.grad(lambda p: sae.loss(p, x, 1e-3, state.stats)[0]))(params)

    g32, g16 = grads("float32"), grads("bfloat16")
    for name in g32:
        a, b = np.asarray(g32[name]), np.asarray(g16[name])
        assert a.dtype == b.dtype == np.float32
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + 1e-6, (arch, name)


def test_bfloat16_moments_are_stored_narrow_and_track_float32_adam():
    sae, cfg, state, x = tiny("relu")
    o = cfg.optim
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tx = step_lib.make_optimizer(dataclasses.replace(o, moment_dtype=dtype))
        st = init_state(sae, tx, jax.random.key(0), x, o.lr, cfg.sparsity.coefficient)
        fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.schedule(o, 100), step_lib.coefficient_factor(5)))
        for i in range(5):
            st, _ = fn(st, x + 0.1 * i)
        runs[dtype] = st
    adam = runs["bfloat16"].opt_state[-1]
    assert {a.dtype for a in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert adam.count.dtype == jnp.int32
    assert {a.dtype for a in jax.tree.leaves(runs["bfloat16"].params)} == {jnp.dtype(jnp.float32)}
    for name, p32 in runs["float32"].params.items():
        p16, p0 = runs["bfloat16"].params[name], state.params[name]
        moved = np.linalg.norm(np.asarray(p32) - np.asarray(p0))
        assert np.linalg.norm(np.asarray(p16) - np.asarray(p32)) <= 0.05 * moved + 1e-7, name


@pytest.mark.parametrize("key", ["train.compute_dtype", "optim.moment_dtype"])
def test_bad_dtype_names_the_key(key):
    with pytest.raises(config_lib.ConfigError, match=f"config key '{key}' must be one of float32, bfloat16"):
        config_lib.load_config(None, [f"{key}=float16"])


@pytest.mark.parametrize("key", ["train.compute_dtype", "optim.moment_dtype"])
def test_resume_changing_a_precision_key_is_refused_and_an_old_checkpoint_resumes(key):
    cfg = config_lib.load_config(None, ["model.d_model=8", "train.workdir=/tmp/precision_run"])
    meta = {"version": checkpoint.FORMAT_VERSION, "store": "s", "config": config_lib.to_dict(cfg)}
    changed = config_lib.load_config(None, ["model.d_model=8", "train.workdir=/tmp/precision_run", f"{key}=bfloat16"])
    with pytest.raises(config_lib.ConfigError, match=f"config key '{key}' changed from 'float32' to 'bfloat16'"):
        checkpoint.reconcile(meta, changed, "s", 10)
    section, name = key.split(".")
    del meta["config"][section][name]  # a checkpoint written before the key existed trained in float32
    assert checkpoint.reconcile(meta, cfg, "s", 10)[1] == []
    with pytest.raises(config_lib.ConfigError, match=f"config key '{key}'"):
        checkpoint.reconcile(meta, changed, "s", 10)


# --------------------------------------------------------------------------- acceptance
SPEC = dataclasses.replace(demo.SPEC, n_tokens=131_072)  # the demo's generator, a quarter of its tokens
SHORT = ["train.steps=4000", "train.log_every=1000", "train.progress=false", "train.eval_tokens=16384"]


def demo_config(store, workdir, *extra: str) -> config_lib.Config:
    """The demo's config (sae_jax/demo.py, as configs/demo.yaml) on ``store``, shortened by SHORT."""
    base = dict(demo.CONFIG, data={"store": str(store.path)}, train=dict(demo.CONFIG["train"], workdir=str(workdir)))
    return config_lib.load_config(None, [*SHORT, *extra], base=base)


def test_bfloat16_compute_trains_the_demo_as_well_as_float32(tmp_path):
    """The demo's recipe (configs/demo.yaml), shortened: bfloat16 compute within 0.02 MMCS and 10% FVU."""
    store = write_synthetic(tmp_path / "synth", SPEC)
    out = {}
    for dtype in ("float32", "bfloat16"):
        workdir = tmp_path / dtype
        loop.train(demo_config(store, workdir, f"train.compute_dtype={dtype}"))
        out[dtype] = json.loads((workdir / "summary.json").read_text())
    f32, bf16 = out["float32"], out["bfloat16"]
    print({d: {k: s[k] for k in ("mmcs", "fvu", "l0")} for d, s in out.items()})
    assert f32["mmcs"] > 0.8
    assert abs(bf16["mmcs"] - f32["mmcs"]) <= 0.02
    assert abs(bf16["fvu"] - f32["fvu"]) <= 0.1 * f32["fvu"]
    # The finished float32 run cannot be resumed in bfloat16.
    with pytest.raises(config_lib.ConfigError, match="config key 'train.compute_dtype'"):
        loop.train(demo_config(store, tmp_path / "float32", "train.steps=4100", "train.compute_dtype=bfloat16"))

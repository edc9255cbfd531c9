"""Groups of stacked members: the sweep's states and step, for the driver in ``sae_jax.train.loop``.

Members that differ only in what ``TrainState.hparams`` holds (``optim.lr``, ``sparsity.coefficient``)
have their states stacked along a leading ``sweep`` axis and are trained by one vmapped, jitted step
(``jax.vmap(step, in_axes=(0, None))``: each member its own lr and coefficient, one shared batch). The
``sweep`` logical axis is laid out by the rules table (``sharding.sweep_rules``): replicated, or split
over the data devices with ``sweep.shard=true``. On CPU the vmapped step is slower than separate steps
(the batched layout costs transposes), so there the same jitted step loops over the members with
``jax.lax.map`` instead (``sweep.vmap_size``: members vmapped at once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sae_jax import config as config_lib
from sae_jax import sharding
from sae_jax.config import ConfigError
from sae_jax.train import loop
from sae_jax.train import step as step_lib
from sae_jax.train.init_from import initial_params
from sae_jax.train.state import TrainState, init_state

SWEEP_AXIS = "sweep"


def build_group(index: int, members: list[loop.Member], settings: config_lib.SweepConfig,
                init: bool = True) -> loop.Group:
    """Prepare the shared run, jit the stacked step and (if ``init``) init the stacked state, born sharded.

    ``settings`` is the sweep's own section (the members' configs carry none)."""
    run = loop.prepare(members[0].cfg)
    members = [dataclasses.replace(m, cfg=config_lib.with_d_model(m.cfg, run.store.d_model)) for m in members]
    rules = sharding.sweep_rules(settings.shard)
    _check_divisible(run, rules, len(members))
    init_fn, abstract, shardings = init_stacked(run, members, rules)
    chunk = len(members) if settings.shard else vmap_size(settings.vmap_size, len(members))
    return loop.Group(index, members, run, shardings, init_fn() if init else None,
                      compile_stacked_step(run, shardings, chunk), init_fn, abstract, stacked=True)


def vmap_size(requested: int, n_members: int) -> int:
    """Members vmapped at once: ``sweep.vmap_size``, or for 0 the whole group on accelerators and 1 on CPU."""
    if requested == 0:
        return 1 if jax.default_backend() == "cpu" else n_members
    return min(requested, n_members)


def _check_divisible(run: loop.Run, rules, n_members: int) -> None:
    axis = sharding.logical_to_spec((SWEEP_AXIS,), rules)[0]
    devices = run.mesh.shape[axis] if axis else 1
    if n_members % devices:
        raise ConfigError(f"config key 'sweep.shard' is true but a group of {n_members} members cannot be split "
                          f"over {devices} devices; make each group's size a multiple of {devices} or set "
                          "sweep.shard=false.")


def stacked_shardings(run: loop.Run, abstract: TrainState, rules) -> Any:
    """NamedShardings of a stacked state: the parameters' logical axes behind a leading ``sweep``."""
    specs = sharding.tree_specs(abstract, run.sae.param_axes(), rules, lead=(SWEEP_AXIS,))
    return sharding.named(run.mesh, specs)


def init_stacked(run: loop.Run, members: list[loop.Member], rules
                 ) -> tuple[Callable[[], TrainState], TrainState, Any]:
    """(init, abstract state, shardings): ``init()`` gives the members' fresh states stacked, each one what
    ``loop.init_train_state`` gives its config (``model.init_from`` included: the group shares it)."""
    sample = loop.init_sample(run)
    key = jax.random.key(run.cfg.seed)
    lr = np.asarray([m.cfg.optim.lr for m in members], np.float32)
    coefficient = np.asarray([m.cfg.sparsity.coefficient for m in members], np.float32)
    start = None
    if run.cfg.model.init_from:
        start = jax.device_get(initial_params(run.cfg.model.init_from, run.sae, run.scale))

    def init(key, sample, lr, coefficient, start):
        def one(lr, coefficient):
            state = init_state(run.sae, run.tx, key, sample, lr, coefficient)
            if start is None:
                return state
            return state.replace(params=start[0], stats=start[1], opt_state=run.tx.init(start[0]))

        return jax.vmap(one)(lr, coefficient)

    abstract = jax.eval_shape(init, key, sample, lr, coefficient, start)
    shardings = stacked_shardings(run, abstract, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return (lambda: jax.jit(init, out_shardings=shardings)(key, sample, lr, coefficient, start)), abstract, shardings


def compile_stacked_step(run: loop.Run, shardings: Any, chunk: int) -> Callable:
    """The single-run step over the sweep axis (batch shared), jitted once with donation: vmapped
    over ``chunk`` members at a time, chunks in a jax.lax.map loop (no loop when chunk >= the group)."""
    sae = sharding.for_mesh(run.sae, run.mesh)  # as loop.compile_step: top-k split like the latents
    one = step_lib.make_train_step(sae, run.tx, run.lr_schedule, run.coef, run.scale, run.cfg.train.compute_dtype)

    def step(state: TrainState, x: jax.Array):
        if chunk >= state.step.shape[0]:
            return jax.vmap(one, in_axes=(0, None))(state, x)
        return jax.lax.map(lambda s: one(s, x), state, batch_size=chunk if chunk > 1 else None)

    return jax.jit(sharding.with_step_layout(step, run.mesh),
                   in_shardings=(shardings, sharding.input_sharding(run.mesh)),
                   out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=0)

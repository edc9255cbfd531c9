"""Flax NNX adapter: any ``nnx.Module`` plus a function naming its intermediates.

The module is split once into a graph definition and state; activations run under one
``jax.jit`` that returns only the requested hooks, so XLA prunes what they do not need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.lm.source import Source, SpliceFn

IntermediatesFn = Callable[[nnx.Module, jax.Array], Mapping[str, jax.Array]]
ModuleLogitsFn = Callable[[nnx.Module, jax.Array, Mapping[str, SpliceFn]], jax.Array]


def sown_intermediates(
    call: Callable[[nnx.Module, jax.Array], Any] = lambda module, tokens: module(tokens),
) -> IntermediatesFn:
    """An intermediates function from ``Module.sow(nnx.Intermediate, name, value)`` calls.

    Names are the dotted module paths of the sown values, e.g. a block at
    ``self.blocks[3]`` sowing ``"hook_resid_post"`` gives ``blocks.3.hook_resid_post``.
    The last value sown under a name wins.
    """

    def intermediates(module: nnx.Module, tokens: jax.Array) -> dict[str, jax.Array]:
        _, sown = nnx.capture(call, nnx.Intermediate)(module, tokens)
        out = {}
        for path, var in nnx.to_flat_state(sown):
            value = var.get_value() if isinstance(var, nnx.Variable) else var
            out[".".join(map(str, path))] = value[-1] if isinstance(value, tuple) else value
        return out

    return intermediates


def nnx_source(
    module: nnx.Module,
    intermediates_fn: IntermediatesFn,
    *,
    hooks: Sequence[str],
    name: str,
    d_model: int,
    logits_fn: ModuleLogitsFn | None = None,
    **fields: Any,
) -> Source:
    """A :class:`~sae_jax.lm.source.Source` over an NNX module.

    ``intermediates_fn(module, tokens)`` returns at least ``hooks``; ``logits_fn(module,
    tokens, splice)``, if given, returns logits with each spliced hook replaced. ``fields``
    fill the remaining Source fields (tokenizer, special ids, hashes). Activations use a
    snapshot of the module's state taken here; build a new source after changing it.
    """
    graphdef, state = nnx.split(module)

    @partial(jax.jit, static_argnames="wanted")
    def run(state: nnx.State, tokens: jax.Array, wanted: tuple[str, ...]):
        out = intermediates_fn(nnx.merge(graphdef, state), tokens)
        return {h: out[h] for h in wanted}

    def activations(tokens: Any, wanted: Sequence[str]) -> dict[str, jax.Array]:
        return run(state, jnp.asarray(tokens, jnp.int32), tuple(wanted))

    def logits(tokens: Any, splice: Mapping[str, SpliceFn]) -> jax.Array:
        # Under capture, values the module sows are collected and dropped, not kept on it.
        out, _ = nnx.capture(logits_fn, nnx.Intermediate)(module, jnp.asarray(tokens, jnp.int32), splice)
        return out

    return Source(
        name=name,
        d_model=d_model,
        hooks=tuple(hooks),
        activations_fn=activations,
        logits_fn=logits if logits_fn is not None else None,
        **fields,
    )

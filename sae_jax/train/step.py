"""The training step: a pure function of (state, batch), jitted once by the loop.

It knows no files and no meshes; the architecture supplies the loss and constraints.
Hyper-parameters that a sweep varies (learning rate, sparsity coefficient) live in
``state.hparams``, so that stacking states along a sweep axis and vmapping the step gives
each member its own values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from sae_jax.eval import metrics
from sae_jax.models import activations as act
from sae_jax.models.sae import SAE
from sae_jax.train.state import TrainState


def lr_factor(warmup_steps: int, total_steps: int, decay: str = "constant",
              decay_fraction: float = 0.2) -> Callable[[jax.Array], jax.Array]:
    """Learning-rate multiplier in [0, 1]: linear warmup, then constant, linear-to-zero or cosine."""
    warm = optax.linear_schedule(0.0, 1.0, max(warmup_steps, 1))
    rest = max(total_steps - warmup_steps, 1)
    if decay == "linear":
        hold = max(rest - int(decay_fraction * total_steps), 0)
        after = optax.join_schedules([optax.constant_schedule(1.0), optax.linear_schedule(1.0, 0.0, rest - hold)],
                                     [hold])
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(1.0, rest)
    else:
        after = optax.constant_schedule(1.0)
    return optax.join_schedules([warm, after], [warmup_steps])


def schedule(optim, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The run's learning-rate multiplier from its ``optim`` config (an ``OptimConfig``).

    With ``optim.rewarm_step`` s > 0 (an extended resume) it re-warms: from step s the factor
    moves linearly from ``optim.rewarm_from`` to the new schedule over ``warmup_steps``, so the
    learning rate stays continuous at s.
    """
    base = lr_factor(optim.warmup_steps, total_steps, optim.decay, optim.decay_fraction)
    if not optim.rewarm_step:
        return base
    s, f0, w = optim.rewarm_step, optim.rewarm_from, max(optim.warmup_steps, 1)

    def factor(step):
        t = jnp.clip((step - s) / w, 0.0, 1.0)
        return jnp.where(step < s, base(step), f0 + (base(step) - f0) * t)

    return factor


def optimizer(beta1: float, beta2: float, grad_clip: float = 0.0,
              moment_dtype: str = "float32") -> optax.GradientTransformation:
    """Adam's update direction (with optional global-norm clipping); the step scales it by -lr.

    ``moment_dtype`` (``optim.moment_dtype``): the dtype Adam's moments are stored in between
    steps; other than float32 the chain is wrapped in ``stored_in`` (computed in float32).
    """
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    tx = optax.chain(*parts, optax.scale_by_adam(b1=beta1, b2=beta2))
    return tx if moment_dtype == "float32" else stored_in(tx, moment_dtype)


def make_optimizer(optim) -> optax.GradientTransformation:
    """The run's optimizer from its ``optim`` config (an ``OptimConfig``): what the loop and compile-check use."""
    return optimizer(optim.beta1, optim.beta2, optim.grad_clip, optim.moment_dtype)


def _cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (integer leaves, e.g. Adam's count, kept)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``inner`` with its state's float leaves stored in ``dtype`` and computed in float32.

    Each update casts the state up to float32, runs ``inner.update`` and casts the new state
    down, so only the stored copy is narrow (for Adam both moments, mu and nu: optax's
    ``scale_by_adam(mu_dtype=...)`` covers only mu). The step count stays an integer. Rounding
    to nearest: in bfloat16 (8 significant bits) a moment's per-step decay by beta2 = 0.999 is
    below half an ulp, so nu decays only when a larger g² lifts it.
    """

    def init(params):
        return _cast_floats(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, _cast_floats(state, jnp.float32), params)
        return updates, _cast_floats(state, dtype)

    return optax.GradientTransformation(init, update)


def coefficient_factor(warmup_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Sparsity-coefficient multiplier, warmed up linearly from 0 over ``warmup_steps``."""

    def factor(step):
        return jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))

    return factor


def make_train_step(sae: SAE, tx: optax.GradientTransformation, lr_schedule: Callable, coef_schedule: Callable,
                    scale: float = 1.0, compute_dtype: str = "float32") -> Callable:
    """(state, x) -> (state, metrics): one Adam step on a batch of raw activations x.

    The learning rate is ``state.hparams['lr'] * lr_schedule(step)`` and the sparsity
    coefficient ``state.hparams['coefficient'] * coef_schedule(step)``. ``scale`` is the
    activation normalization (x is multiplied by it before the SAE). ``compute_dtype``
    (``train.compute_dtype``): the dtype of the dense matmuls' inputs in the forward and
    backward passes (``act.compute_dtype``), accumulated into float32; parameters, gradients
    and the update stay float32.
    """

    def train_step(state: TrainState, x: jax.Array):
        x = x.astype(jnp.float32) * scale
        lam = state.hparams["coefficient"] * coef_schedule(state.step)
        lr = state.hparams["lr"] * lr_schedule(state.step)
        grad_fn = jax.value_and_grad(sae.loss, has_aux=True)
        with act.compute_dtype(compute_dtype):  # traced inside: the custom backward rules see it too
            (loss, out), grads = grad_fn(state.params, x, lam, state.stats)
        grads = sae.constrain_grads(state.params, grads)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, direction)
        params = sae.constrain_params(params)
        stats = sae.update_stats(state.stats, out)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
        return new, step_metrics(sae, x, out, loss, lam, lr, stats)

    return train_step


def step_metrics(sae: SAE, x, out, loss, lam, lr, stats) -> dict[str, jax.Array]:
    """Scalars logged per step (batch estimates)."""
    return {
        "loss": loss,
        "mse": jnp.mean(jnp.sum(jnp.square(x - out.x_hat), axis=-1)),
        "fvu": metrics.fvu(x, out.x_hat),
        "l0": sae.l0(out),
        "sparsity": out.sparsity,
        "aux": out.aux,
        "coefficient": lam,
        "lr": lr,
        "dead_fraction": metrics.dead_fraction(stats["tokens_since_fired"], sae.dead_tokens),
    }

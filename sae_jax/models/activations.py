"""Sparsity nonlinearities of the architecture zoo.

Every custom gradient is a ``jax.custom_vjp`` with a plain ``*_reference`` beside it: the
same forward value in ordinary jnp ops, whose autodiff gives the true (almost everywhere)
derivative. Tests compare values with the reference and gradients with the source's
formula (tests/test_activations.py).

Heaviside convention: H(z) = 1 if z > 0 else 0, strictly, so H(0) = 0. This is what the
JumpReLU paper's pseudo-code (arXiv 2407.14435, appendix: ``x > threshold``), SAELens
``sae_lens/saes/jumprelu_sae.py`` (``Step``/``JumpReLU``: ``x > threshold``),
dictionary_learning ``trainers/jumprelu.py`` and the ProLU author's code (``m + b > 0``,
``m > 0``) all do: a pre-activation exactly at its threshold is off.

Shapes: ``pi``/``m``/``pre`` are ``[..., d_sae]`` with any leading batch dims; parameters
(``theta``, ``b``) broadcast against them, and their custom gradients are summed over the
broadcast dims back to the parameter's own shape, as autodiff does for any parameter.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def rectangle(u: jax.Array) -> jax.Array:
    """The rectangle kernel K(u) = 1[|u| < 1/2], open at both ends.

    The JumpReLU paper's pseudo-derivative kernel (arXiv 2407.14435, main text and
    appendix pseudo-code; SAELens ``rectangle``: ``(x > -0.5) & (x < 0.5)``).
    """
    u = jnp.asarray(u)
    return ((u > -0.5) & (u < 0.5)).astype(jnp.result_type(float, u))


def _heaviside(z: jax.Array) -> jax.Array:
    """H(z) with H(0) = 0 (see the module docstring), in z's float dtype."""
    return (z > 0).astype(jnp.result_type(float, z))


def _sum_to(x: jax.Array, like: jax.Array) -> jax.Array:
    """Sum ``x`` over the dims that broadcasting added to ``like``; cast to its dtype."""
    shape = jnp.shape(like)
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).astype(jnp.result_type(like))


# --------------------------------------------------------------------------- JumpReLU
def jumprelu_reference(pi: jax.Array, theta: jax.Array) -> jax.Array:
    """JumpReLU_θ(π) = π · H(π − θ) in plain jnp (its autodiff θ-gradient is 0)."""
    return pi * _heaviside(pi - theta)


def _jumprelu_fwd(pi, theta, eps):
    return jumprelu_reference(pi, theta), (pi, theta, eps)


def _jumprelu_bwd(res, g):
    pi, theta, eps = res
    d_pi = _heaviside(pi - theta) * g
    d_theta = -(theta / eps) * rectangle((pi - theta) / eps) * g
    return _sum_to(d_pi, pi), _sum_to(d_theta, theta), None


@jax.custom_vjp
def jumprelu(pi: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """JumpReLU with the paper's straight-through threshold gradient.

    Value π · H(π − θ). VJP (Rajamanoharan et al. 2024, arXiv 2407.14435, pseudo-derivatives;
    SAELens ``sae_lens/saes/jumprelu_sae.py`` ``JumpReLU``; dictionary_learning
    ``trainers/jumprelu.py`` ``JumpReLUFunction``):
      ∂/∂π = H(π − θ),   ∂/∂θ = −(θ/ε) · K((π − θ)/ε),   K = ``rectangle``,
    θ's gradient summed over the batch dims to θ's shape. ``eps`` (bandwidth ε) is not
    differentiated (it may be a traced scalar, e.g. under a sweep vmap).
    """
    return jumprelu_reference(pi, theta)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


# --------------------------------------------------------------------------- L0 step
def heaviside_step_reference(pi: jax.Array, theta: jax.Array) -> jax.Array:
    """H(π − θ) as a float in plain jnp (its autodiff gradient is 0 everywhere)."""
    return _heaviside(pi - theta)


def _heaviside_step_fwd(pi, theta, eps):
    return heaviside_step_reference(pi, theta), (pi, theta, eps)


def _heaviside_step_bwd(res, g):
    pi, theta, eps = res
    d_theta = -(1.0 / eps) * rectangle((pi - theta) / eps) * g
    return jnp.zeros_like(pi), _sum_to(d_theta, theta), None


@jax.custom_vjp
def heaviside_step(pi: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """The step H(π − θ) of the JumpReLU L0 penalty, with a threshold gradient.

    Value H(π − θ) (float, H(0) = 0). VJP (arXiv 2407.14435, pseudo-derivatives; SAELens ``Step``;
    dictionary_learning ``StepFunction``): ∂/∂π = 0, ∂/∂θ = −(1/ε) · K((π − θ)/ε), θ's
    gradient summed over the batch dims to θ's shape. ``eps`` is not differentiated.
    """
    return heaviside_step_reference(pi, theta)


heaviside_step.defvjp(_heaviside_step_fwd, _heaviside_step_bwd)


# --------------------------------------------------------------------------- ProLU
def prolu_reference(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU f = m · H(m + b) · H(m) in plain jnp (its autodiff b-gradient is 0)."""
    return m * _heaviside(m + b) * _heaviside(m)


def _prolu_fwd(m, b):
    return prolu_reference(m, b), (m, b)


def _prolu_relu_bwd(res, g):
    m, b = res
    gated = _heaviside(m + b) * _heaviside(m) * g
    return _sum_to(gated, m), _sum_to(gated, b)


def _prolu_ste_bwd(res, g):
    m, b = res
    gated = _heaviside(m + b) * _heaviside(m) * g
    return _sum_to(gated * (1 + m), m), _sum_to(gated * m, b)


@jax.custom_vjp
def prolu_relu(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU with the "ReLU" estimator: ∂f/∂m = gate, ∂f/∂b = gate.

    Value f = m · H(m + b) · H(m), gate = H(m + b) · H(m); b's gradient summed over the
    batch dims to b's shape: the gradient ReLU(m + b) would give. Taggart 2024, "ProLU: A
    Nonlinearity for Sparse Autoencoders"; the author's code, nqgl/sae_components
    ``src/saeco/architectures/prolu/prolu.py`` ``ProLU_ReLU.backward``:
    ``grad_m = grad_b = where(gate, grad_output, 0)``.
    """
    return prolu_reference(m, b)


prolu_relu.defvjp(_prolu_fwd, _prolu_relu_bwd)


@jax.custom_vjp
def prolu_ste(m: jax.Array, b: jax.Array) -> jax.Array:
    """ProLU with the straight-through estimator: ∂f/∂b = gate · m, ∂f/∂m = gate · (1 + m).

    Value f = m · H(m + b) · H(m), gate = H(m + b) · H(m); b's gradient summed over the
    batch dims to b's shape. Exactly the author's code (nqgl/sae_components
    ``src/saeco/architectures/prolu/prolu.py`` ``ProLU_STE.backward``:
    ``gated = where(gate, g, 0); grad_b = gated * m; grad_m = gated + grad_b``): the
    derivative of H(m + b) taken as 1 inside the gate (straight through), that of H(m)
    as 0. Taggart 2024.
    """
    return prolu_reference(m, b)


prolu_ste.defvjp(_prolu_fwd, _prolu_ste_bwd)


# --------------------------------------------------------------------------- TopK
def exact_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` over the last axis (same values, indices and tie order), partitionable.

    ``lax.top_k`` lowers to a custom call that the SPMD partitioner leaves whole, so on a mesh
    it gathers its full operand onto every device, the batch dims included. ``approx_max_k``
    with ``recall_target=1.0`` is exact on every backend (off TPU it lowers to the exact
    sort-based fallback; on TPU recall 1.0 disables the windowed reduction, XLA
    ``approx_topk_shape.cc``) and is partitioned along all other dims. For k = the axis size
    it is a full, stable descending sort (``approx_max_k`` needs k below the size).
    """
    if k < x.shape[-1]:
        return lax.approx_max_k(x, k, recall_target=1.0)
    axis = x.ndim - 1
    iota = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    # 0 - x, not -x: +0.0 and -0.0 must tie, as they do in top_k (sort orders them).
    _, indices = lax.sort((0.0 - x, iota), dimension=axis, num_keys=1, is_stable=True)
    return jnp.take_along_axis(x, indices, axis=axis), indices


def grouped_top_k(x: jax.Array, k: int, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` in two stages: top k of each of ``groups`` equal slices of the last
    axis, then the top k of those ``groups · k`` candidates.

    Equal to one top-k in values, indices and tie order (ties go to the lower index: the
    candidates are group-major and each group's are sorted with ties to the lower index).
    With the last axis split over ``groups`` devices the first stage is local and only the
    ``[..., groups · k]`` candidates cross devices. ``groups`` is static and must divide
    the axis; 1 is a plain top-k.
    """
    *lead, m = x.shape
    if groups == 1:
        return exact_top_k(x, k)
    if m % groups:
        raise ValueError(f"latent groups={groups} must divide the latent dimension {m}.")
    size = m // groups
    kk = min(k, size)
    values, local = exact_top_k(x.reshape(*lead, groups, size), kk)
    indices = (local + jnp.arange(groups, dtype=local.dtype)[:, None] * size).reshape(*lead, groups * kk)
    top, pick = exact_top_k(values.reshape(*lead, groups * kk), k)
    return top, jnp.take_along_axis(indices, pick, axis=-1)


def topk_select(pre: jax.Array, k: int, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """The k kept latents of each row: ``(values, indices)``, both ``[..., k]``.

    values = ReLU(TopK_k(pre)) (Gao et al. 2024, arXiv 2406.04093; openai/sparse_autoencoder
    ``model.py`` ``TopK``: ``topk(x)`` then ReLU of the values). Equal in value to the top k
    of ReLU(pre); taking top_k before the ReLU breaks ties among non-positive entries by
    pre-activation instead of by index (they carry value 0 either way). Ties among equal
    pre-activations go to the lower latent index (``lax.top_k``). Sorted descending.
    ``groups`` > 1 selects in two stages (``grouped_top_k``), with the same result.
    """
    top, indices = grouped_top_k(pre, k, groups)
    return jax.nn.relu(top), indices


def _flat_top(acts: jax.Array, n_keep: int, groups: int) -> jax.Array:
    """Flat indices (row-major over ``acts`` [N, m]) of its ``n_keep`` largest entries, ties to
    the lower flat index; with ``groups`` > 1, first the top ``n_keep`` of each latent slice."""
    n, m = acts.shape
    if groups == 1:
        return exact_top_k(acts.reshape(-1), n_keep)[1]
    if m % groups:
        raise ValueError(f"latent groups={groups} must divide the latent dimension {m}.")
    size = m // groups
    per_group = acts.reshape(n, groups, size).transpose(1, 0, 2).reshape(groups, n * size)
    values, local = exact_top_k(per_group, min(n_keep, n * size))
    row, col = local // size, local % size
    flat = row * m + jnp.arange(groups, dtype=local.dtype)[:, None] * size + col
    # The candidates are group-major, not in flat order: sort by (value desc, flat index).
    _, flat = lax.sort((0.0 - values.reshape(-1), flat.reshape(-1)), num_keys=2)
    return flat[:n_keep]


def batch_topk_select(pre: jax.Array, k: float, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """BatchTopK: keep the ⌊k · N⌋ largest of ReLU(pre) over the whole batch.

    N is the number of rows (all leading dims of ``pre``); returns dense ``(acts, mask)``,
    both of ``pre``'s shape, acts = where(mask, ReLU(pre), 0) (Bussmann et al. 2024,
    arXiv 2412.06410; dictionary_learning ``trainers/batch_top_k.py``; SAELens
    ``sae_lens/saes/batchtopk_sae.py``, whose ``int(k * num_samples)`` this follows, so
    k may be a float). Ties go to the lower flat index (earlier row, then lower latent),
    from ``lax.top_k``. If fewer than ⌊k · N⌋ entries are positive, the mask also holds
    zeros (value 0): use ``acts > 0`` for the firing pattern. Under a vmap, N is the
    per-instance batch. ``groups`` > 1 selects in two stages (the top ⌊k · N⌋ of each of
    ``groups`` latent slices, then among those), with the same result.
    """
    acts = jax.nn.relu(pre)
    n_keep = int(k * math.prod(pre.shape[:-1]))
    flat_idx = _flat_top(acts.reshape(-1, acts.shape[-1]), n_keep, groups)
    mask = jnp.zeros(acts.size, bool).at[flat_idx].set(True).reshape(acts.shape)
    return jnp.where(mask, acts, 0), mask


def densify(values: jax.Array, indices: jax.Array, d_sae: int) -> jax.Array:
    """The dense ``[..., d_sae]`` code holding ``values`` at ``indices``, zeros elsewhere."""
    lead = values.shape[:-1]
    rows = jnp.arange(math.prod(lead))[:, None]
    dense = jnp.zeros((math.prod(lead), d_sae), values.dtype)
    dense = dense.at[rows, indices.reshape(-1, indices.shape[-1])].set(values.reshape(-1, values.shape[-1]))
    return dense.reshape(*lead, d_sae)


def dense_decode_reference(values: jax.Array, indices: jax.Array, W_dec: jax.Array) -> jax.Array:
    """The dense decode ``densify(values, indices) @ W_dec`` (B·m·d FLOPs), no bias."""
    return densify(values, indices, W_dec.shape[0]) @ W_dec


def _scatter_rows(indices: jax.Array, rows: jax.Array, m: int) -> jax.Array:
    """``[m, d]`` zeros with each ``rows[..., j, :]`` added into row ``indices[..., j]``."""
    d = rows.shape[-1]
    out = jnp.zeros((m, d), rows.dtype)
    return out.at[indices.reshape(-1)].add(rows.reshape(-1, d))


@jax.custom_vjp
def sparse_decode(values: jax.Array, indices: jax.Array, W_dec: jax.Array) -> jax.Array:
    """Decode the kept latents: Σ_j values[..., j] · W_dec[indices[..., j]], no bias.

    ``values``, ``indices``: ``[..., k]``; ``W_dec``: ``[m, d]``; result ``[..., d]``. Equal
    to ``dense_decode_reference`` in value and gradients, but forward and backward cost
    B·k·d FLOPs, never a dense B·m·d matmul: d values = ⟨g, W_dec[indices]⟩ (a gather),
    d W_dec = scatter-add of values ⊗ g into the kept rows. The layout of
    openai/sparse_autoencoder ``kernels.py`` ``TritonDecoderAutograd`` (sparse-dense
    matmul forward; sparse-transpose-dense and dense-dense-sparse-out backward).
    ``indices`` gets no gradient.
    """
    return jnp.einsum("...k,...kd->...d", values, W_dec[indices])


def _sparse_decode_fwd(values, indices, W_dec):
    return sparse_decode(values, indices, W_dec), (values, indices, W_dec)


def _sparse_decode_bwd(res, g):
    values, indices, W_dec = res
    # Gather again instead of saving the [..., k, d] rows: it is cheap and saves memory.
    d_values = jnp.einsum("...d,...kd->...k", g, W_dec[indices])
    d_W_dec = _scatter_rows(indices, values[..., None] * g[..., None, :], W_dec.shape[0])
    return d_values.astype(values.dtype), None, d_W_dec.astype(W_dec.dtype)


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def topk_encoder_reference(
    x_centered: jax.Array, W_enc: jax.Array, b_enc: jax.Array, k: int, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """``topk_select(x_centered @ W_enc + b_enc, k)``, differentiated densely by autodiff."""
    return topk_select(x_centered @ W_enc + b_enc, k, groups)


def _sparse_encoder_topk_fwd(x_centered, W_enc, b_enc, k, groups=1):
    top, indices = grouped_top_k(x_centered @ W_enc + b_enc, k, groups)
    return (jax.nn.relu(top), indices), (x_centered, W_enc, b_enc, top > 0, indices)


def _sparse_encoder_topk_bwd(k, groups, res, g):
    x, W_enc, b_enc, alive, indices = res
    delta = jnp.where(alive, g[0], 0)  # ReLU'(top); the indices' cotangent is float0
    m = W_enc.shape[1]
    d_b_enc = jnp.zeros(m, delta.dtype).at[indices.reshape(-1)].add(delta.reshape(-1))
    outer = delta[..., None] * x[..., None, :]  # [..., k, d]: x[b] ⊗ δ[b, j]
    d_W_enc = _scatter_rows(indices, outer, m).T
    d_x = jnp.einsum("...k,d...k->...d", delta, jnp.take(W_enc, indices, axis=1))
    return (
        d_x.astype(x.dtype),
        d_W_enc.astype(W_enc.dtype),
        _sum_to(d_b_enc, b_enc),
    )


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sparse_encoder_topk(
    x_centered: jax.Array, W_enc: jax.Array, b_enc: jax.Array, k: int, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """TopK encoder ``(values, indices)`` = ReLU(TopK_k(x_centered W_enc + b_enc)).

    ``x_centered``: ``[..., d]`` (x − b_dec); ``W_enc``: ``[d, m]``; ``b_enc``: ``[m]``;
    results ``[..., k]``. The forward is the dense encoder matmul then ``lax.top_k``
    (Gao et al. 2024; openai/sparse_autoencoder ``model.py``). The backward uses only the
    k kept columns per row, from the ``[..., k]`` cotangent δ of the values
    (ReLU'-masked): d W_enc[:, idx[b, j]] += x[b] · δ[b, j] and d b_enc[idx[b, j]] +=
    δ[b, j] by scatter-add, d x[b] = Σ_j δ[b, j] · W_enc[:, idx[b, j]] by gather —
    B·k·d FLOPs instead of the dense B·m·d. Gradients equal autodiff of
    ``topk_encoder_reference``. ``k`` and ``groups`` (two-stage selection, see
    ``grouped_top_k``) are static; ``indices`` carry no gradient.
    """
    return topk_encoder_reference(x_centered, W_enc, b_enc, k, groups)


sparse_encoder_topk.defvjp(_sparse_encoder_topk_fwd, _sparse_encoder_topk_bwd)

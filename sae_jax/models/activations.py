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

import contextlib
import contextvars
import math
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# --------------------------------------------------------------------------- precision policy
_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("sae_jax_compute_dtype", default=None)


@contextlib.contextmanager
def compute_dtype(dtype) -> Iterator[None]:
    """Trace the dense matmuls inside with ``dtype`` inputs (``train.compute_dtype``).

    ``"float32"`` or None: no policy, every matmul is the plain ``a @ b`` (the float32 program is
    unchanged). ``"bfloat16"``: ``mm``/``tdot`` cast both inputs to bfloat16 and accumulate into
    float32 results (``preferred_element_type``); parameters, biases, reductions and the sparse
    B·k·d gathers (``sparse_decode``, ``decode_code``, the sparse backward of the TopK encoders)
    stay float32. The policy is read when a function is traced, so a ``jax.value_and_grad``
    traced inside it applies it to the custom-VJP backward rules as well.
    """
    token = _COMPUTE_DTYPE.set(None if dtype in (None, "float32", jnp.float32) else jnp.dtype(dtype))
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` under the precision policy (``compute_dtype``): exactly ``a @ b`` without one."""
    dt = _COMPUTE_DTYPE.get()
    if dt is None:
        return a @ b
    if b.ndim == 2:
        return _cast_matmul(a, b, dt)
    return jnp.matmul(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cast_matmul(a: jax.Array, b: jax.Array, dt) -> jax.Array:
    """``a [..., k] @ b [k, n]`` with ``dt`` inputs and float32 results, its backward products too.

    Autodiff of the cast matmul would transpose it into float32 x ``dt`` products that XLA
    widens to float32; this VJP casts the cotangent as well (for autodiff through ``mm``, e.g.
    the Gated SAE's aux decoder)."""
    return jnp.matmul(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def _cast_matmul_fwd(a, b, dt):
    return _cast_matmul(a, b, dt), (a, b)


def _cast_matmul_bwd(dt, res, g):
    a, b = res
    lead = tuple(range(a.ndim - 1))
    da = jnp.matmul(g.astype(dt), b.T.astype(dt), preferred_element_type=jnp.float32)
    db = jnp.tensordot(a.astype(dt), g.astype(dt), axes=(lead, lead), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_cast_matmul.defvjp(_cast_matmul_fwd, _cast_matmul_bwd)


def tdot(a: jax.Array, b: jax.Array, axes) -> jax.Array:
    """``jnp.tensordot(a, b, axes)`` under the precision policy, as ``mm``."""
    dt = _COMPUTE_DTYPE.get()
    if dt is None:
        return jnp.tensordot(a, b, axes=axes)
    return jnp.tensordot(a.astype(dt), b.astype(dt), axes=axes, preferred_element_type=jnp.float32)


def rectangle(u: jax.Array) -> jax.Array:
    """The rectangle kernel K(u) = 1[|u| < 1/2], open at both ends.

    The JumpReLU paper's pseudo-derivative kernel (arXiv 2407.14435, main text and
    appendix pseudo-code; SAELens ``rectangle``: ``(x > -0.5) & (x < 0.5)``).
    """
    u = jnp.asarray(u)
    return ((u > -0.5) & (u < 0.5)).astype(jnp.result_type(float, u))


def heaviside(z: jax.Array) -> jax.Array:
    """H(z) with H(0) = 0 (see the module docstring), in z's float dtype."""
    return (z > 0).astype(jnp.result_type(float, z))


def batch_sum(a: jax.Array, n: int | None = None) -> jax.Array:
    """Sum of ``a`` over its ``n`` leading (batch) dims (all but the last by default), as a
    ones-vector product.

    XLA:CPU's matrix-vector product reads a [4096, 16384] float32 array three times faster
    than its column reduction (7.5 against 22 ms, jax 0.10), fast enough to pay for writing
    an elementwise summand first (35 against 51 ms for a masked sum); on GPU the two are
    alike. Every parameter gradient that sums over the batch goes through here.
    """
    n = a.ndim - 1 if n is None else n
    if n == 0:
        return a
    return jnp.tensordot(jnp.ones(a.shape[:n], a.dtype), a, axes=n)


def sum_to(x: jax.Array, like: jax.Array) -> jax.Array:
    """Sum ``x`` over the dims that broadcasting added to ``like``; cast to its dtype."""
    shape = jnp.shape(like)
    x = batch_sum(x, x.ndim - len(shape))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).astype(jnp.result_type(like))


# --------------------------------------------------------------------------- JumpReLU
def jumprelu_reference(pi: jax.Array, theta: jax.Array) -> jax.Array:
    """JumpReLU_θ(π) = π · H(π − θ) in plain jnp (its autodiff θ-gradient is 0)."""
    return pi * heaviside(pi - theta)


def _jumprelu_fwd(pi, theta, eps):
    return jumprelu_reference(pi, theta), (pi, theta, eps)


def _jumprelu_bwd(res, g):
    pi, theta, eps = res
    d_pi = heaviside(pi - theta) * g
    d_theta = -(theta / eps) * rectangle((pi - theta) / eps) * g
    return sum_to(d_pi, pi), sum_to(d_theta, theta), None


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
    return heaviside(pi - theta)


def _heaviside_step_fwd(pi, theta, eps):
    return heaviside_step_reference(pi, theta), (pi, theta, eps)


def _heaviside_step_bwd(res, g):
    pi, theta, eps = res
    d_theta = -(1.0 / eps) * rectangle((pi - theta) / eps) * g
    return jnp.zeros_like(pi), sum_to(d_theta, theta), None


@jax.custom_vjp
def heaviside_step(pi: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """The step H(π − θ) of the JumpReLU L0 penalty, with a threshold gradient.

    Value H(π − θ) (float, H(0) = 0). VJP (arXiv 2407.14435, pseudo-derivatives; SAELens ``Step``;
    dictionary_learning ``StepFunction``): ∂/∂π = 0, ∂/∂θ = −(1/ε) · K((π − θ)/ε), θ's
    gradient summed over the batch dims to θ's shape. ``eps`` is not differentiated.
    """
    return heaviside_step_reference(pi, theta)


heaviside_step.defvjp(_heaviside_step_fwd, _heaviside_step_bwd)


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
    return mm(densify(values, indices, W_dec.shape[0]), W_dec)


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
    return topk_select(mm(x_centered, W_enc) + b_enc, k, groups)


def _sparse_encoder_topk_fwd(x_centered, W_enc, b_enc, k, groups=1):
    top, indices = grouped_top_k(mm(x_centered, W_enc) + b_enc, k, groups)
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
        sum_to(d_b_enc, b_enc),
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


# --------------------------------------------------------------------------- sparse codes
class SparseCode(NamedTuple):
    """The kept latents of a batch as coordinates, in chunks of the batch's size.

    Entry ``[c, s]`` is latent ``cols[c, s]`` of token ``rows[c, s]`` with value
    ``values[c, s]`` (ReLU'd, so ≥ 0; padding entries hold value 0). ``rows`` is None in the
    TopK layout, where chunk c holds every token's c-th kept latent (token s at position s).
    The sparse ops below loop over the chunks (``lax.scan``), so no ``[B, k, d]`` gather is
    ever materialized: on CPU that is 3-6x faster than a gather-then-einsum.
    """

    values: jax.Array
    """[chunks, size] kept values (float)."""
    cols: jax.Array
    """[chunks, size] latent index of each entry (int32)."""
    rows: jax.Array | None
    """[chunks, size] token index of each entry, or None for the TopK layout."""


def topk_code(pre: jax.Array, k: int, groups: int = 1) -> SparseCode:
    """TopK of each row of ``pre`` [B, m] as a ``SparseCode`` in the TopK layout ([k, B] chunks).

    Values ReLU(TopK_k(pre)) as ``topk_select`` (Gao et al. 2024; ties to the lower index).
    """
    top, indices = grouped_top_k(pre, k, groups)
    return SparseCode(jax.nn.relu(top).T, indices.T, None)


ROW_CANDIDATES = 4  # BatchTopK: per-row candidates, in multiples of the average k per row


def _flat_top_by_rows(acts: jax.Array, n_keep: int, cap: int) -> jax.Array:
    """``_flat_top(acts, n_keep, 1)`` from each row's top ``cap`` candidates, exactly.

    The top ``n_keep`` of the candidates (flattened row-major, so ties still go to the lower
    flat index) is the top of the whole batch unless some row has all ``cap`` of its
    candidates selected; then that row may hold more, and the full flat selection runs
    instead (``lax.cond``). A top-``cap`` per row plus one over ``n · cap`` candidates costs
    a fraction of one top-k over all ``n · m`` entries.
    """
    n, m = acts.shape
    values, cols = exact_top_k(acts, cap)
    _, pick = exact_top_k(values.reshape(-1), n_keep)
    rows = pick // cap
    saturated = jnp.any(jnp.zeros(n, jnp.int32).at[rows].add(1) >= cap)
    flat = rows * m + cols.reshape(-1)[pick]
    return lax.cond(saturated, lambda: exact_top_k(acts.reshape(-1), n_keep)[1].astype(flat.dtype), lambda: flat)


def batch_topk_code(pre: jax.Array, k: float, groups: int = 1) -> SparseCode:
    """BatchTopK of ``pre`` [B, m]: the ⌊k · B⌋ largest of ReLU(pre) over the whole batch.

    The same entries as ``batch_topk_select`` (ties to the lower flat index), as coordinates
    in row-major order (so each chunk touches few rows) in chunks of B entries, the last one
    padded with zeros. On one latent group, selected through per-row candidates
    (``_flat_top_by_rows``).
    """
    n, m = pre.shape
    n_keep = int(k * n)
    acts = jax.nn.relu(pre)
    cap = ROW_CANDIDATES * -(-n_keep // n)
    by_rows = groups == 1 and cap < m
    flat = _flat_top_by_rows(acts, n_keep, cap) if by_rows else _flat_top(acts, n_keep, groups)
    flat = lax.sort(flat.astype(jnp.int32))
    values = acts.reshape(-1)[flat]
    chunks = max(1, -(-n_keep // n))
    pad = chunks * n - n_keep
    values, flat = jnp.pad(values, (0, pad)), jnp.pad(flat, (0, pad))
    return SparseCode(values.reshape(chunks, n), (flat % m).reshape(chunks, n), (flat // m).reshape(chunks, n))


def dead_topk_code(pre: jax.Array, dead: jax.Array, k_aux: int, groups: int = 1) -> SparseCode:
    """AuxK's code: the top ``k_aux`` pre-activations of each row among the dead latents.

    (Gao et al. 2024, appendix A.2; openai/sparse_autoencoder ``train.py`` ``auxk_mask_fn``):
    live latents are masked to -inf, values ReLU'd. Skipped (all zeros) while no latent is
    dead, the usual case, so that its top-k costs nothing then.
    """
    k_aux = min(k_aux, pre.shape[-1])

    def select(pre):
        if k_aux == 0:
            return skip(pre)
        return topk_code(jnp.where(dead, pre, -jnp.inf), k_aux, groups)

    def skip(pre):
        zeros = jnp.zeros((k_aux, pre.shape[0]), pre.dtype)
        return SparseCode(zeros, zeros.astype(jnp.int32), None)

    return lax.cond(jnp.any(dead), select, skip, pre)


def densify_code(code: SparseCode, n_rows: int, d_sae: int) -> jax.Array:
    """The dense ``[n_rows, d_sae]`` code (zeros off the kept entries)."""
    rows = jnp.broadcast_to(jnp.arange(n_rows), code.values.shape) if code.rows is None else code.rows
    # add, not set: BatchTopK's padding entries (value 0) may share a coordinate with a kept one.
    return jnp.zeros((n_rows, d_sae), code.values.dtype).at[rows, code.cols].add(code.values)


def _gather_rows_sum(values, cols, rows, table, n_rows, groups=1):
    """Σ over entries of values · table[cols], added into row ``rows`` (or s) of [n_rows, d].

    With ``groups`` > 1 the table's rows are taken as ``groups`` contiguous slices (the latent axis's
    shards, ``sharding.for_mesh``): each slice sums its own entries into its own [n_rows, d] and the
    slices are summed once at the end, so a latent-sharded table is never gathered across devices (one
    all-reduce of [n_rows, d] per call instead of one per chunk)."""
    if groups > 1:
        return _grouped_gather_rows_sum(values, cols, rows, table, n_rows, groups)

    def body(acc, chunk):
        v, c, r = chunk
        contrib = v[:, None] * table[c]
        return (acc + contrib if r is None else acc.at[r].add(contrib)), None

    init = jnp.zeros((n_rows, table.shape[-1]), jnp.result_type(values, table))
    return lax.scan(body, init, (values, cols, rows))[0]


def _slices(table, groups):
    """(table as [groups, m/groups, d], a function giving a chunk's (mask [groups, size], local index))."""
    per = table.shape[0] // groups
    ids = jnp.arange(groups)[:, None]
    return table.reshape(groups, per, table.shape[-1]), lambda c: (c[None] // per == ids, c % per)


def _grouped_gather_rows_sum(values, cols, rows, table, n_rows, groups):
    sliced, locate = _slices(table, groups)

    def body(acc, chunk):
        v, c, r = chunk
        mask, local = locate(c)
        contrib = jnp.where(mask, v[None], 0)[..., None] * sliced[:, local]  # [groups, size, d]
        return (acc + contrib if r is None else acc.at[:, r].add(contrib)), None

    init = jnp.zeros((groups, n_rows, table.shape[-1]), jnp.result_type(values, table))
    return lax.scan(body, init, (values, cols, rows))[0].sum(0)


def _scatter_outer(values, cols, rows, src, m, groups=1):
    """[m, d]: Σ over entries of values · src[rows] added into row ``cols`` (a sparse Sᵀ·src); with
    ``groups`` > 1 each slice of the m rows (a latent shard) takes only its own entries."""
    if groups > 1:
        zeros = jnp.zeros((m, src.shape[-1]), jnp.result_type(values, src))
        acc, locate = _slices(zeros, groups)

        def grouped(acc, chunk):
            v, c, r = chunk
            mask, local = locate(c)
            s = src if r is None else src[r]
            return acc.at[:, local].add(jnp.where(mask, v[None], 0)[..., None] * s[None]), None

        return lax.scan(grouped, acc, (values, cols, rows))[0].reshape(m, src.shape[-1])

    def body(acc, chunk):
        v, c, r = chunk
        s = src if r is None else src[r]
        return acc.at[c].add(v[:, None] * s), None

    return lax.scan(body, jnp.zeros((m, src.shape[-1]), jnp.result_type(values, src)), (values, cols, rows))[0]


def _dot_rows(g, cols, rows, table, groups=1):
    """[chunks, size]: ⟨g[rows], table[cols]⟩ per entry; with ``groups`` > 1 each slice of the table (a
    latent shard) gives its own entries' products, summed over the slices after the loop."""
    if groups > 1:
        sliced, locate = _slices(table, groups)

        def grouped(_, chunk):
            c, r = chunk
            mask, local = locate(c)
            gr = g if r is None else g[r]
            return None, jnp.where(mask, jnp.sum(gr[None] * sliced[:, local], axis=-1), 0)

        return lax.scan(grouped, None, (cols, rows))[1].sum(1)

    def body(_, chunk):
        c, r = chunk
        gr = g if r is None else g[r]
        return None, jnp.sum(gr * table[c], axis=-1)

    return lax.scan(body, None, (cols, rows))[1]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def decode_code(code: SparseCode, W_dec: jax.Array, n_rows: int, groups: int = 1) -> jax.Array:
    """x̂ without bias: row b = Σ over b's kept entries of value · W_dec[col]; [n_rows, d].

    Equal to ``densify_code(code) @ W_dec`` in value and gradients at B·k·d FLOPs instead of
    B·m·d (openai/sparse_autoencoder ``kernels.py`` ``TritonDecoderAutograd``): d values =
    ⟨g[row], W_dec[col]⟩, d W_dec[col] += value · g[row]. Coordinates get no gradient.
    ``groups``: the latent axis's shards (``sharding.for_mesh``), each decoding its own entries.
    """
    return _gather_rows_sum(code.values, code.cols, code.rows, W_dec, n_rows, groups)


def _decode_code_fwd(code, W_dec, n_rows, groups):
    return decode_code(code, W_dec, n_rows, groups), (code, W_dec)


def _decode_code_bwd(n_rows, groups, res, g):
    code, W_dec = res
    d_values = _dot_rows(g, code.cols, code.rows, W_dec, groups).astype(code.values.dtype)
    d_W_dec = _scatter_outer(code.values, code.cols, code.rows, g, W_dec.shape[0], groups).astype(W_dec.dtype)
    return SparseCode(d_values, None, None), d_W_dec


decode_code.defvjp(_decode_code_fwd, _decode_code_bwd)


@jax.custom_vjp
def encoder_pre(x: jax.Array, W_enc: jax.Array, b_enc: jax.Array, b_dec: jax.Array) -> jax.Array:
    """Encoder pre-activations (x − b_dec) W_enc + b_enc, with b_dec's gradient the cheap way.

    Autodiff of x − b_dec would form the [B, d] input cotangent δ W_encᵀ (2·B·d·m FLOPs)
    only to sum it over the batch for b_dec. This VJP gives b_dec's gradient as
    −W_enc Σ_b δ_b (d·m FLOPs), as openai/sparse_autoencoder ``train.py`` ``EncWrapper``
    does for its ``pre_bias``; W_enc's is (x − b_dec)ᵀ δ, b_enc's Σ_b δ_b, and x's δ W_encᵀ
    (XLA drops it where x is not differentiated, as in the training step). Gradients equal
    autodiff of the plain expression. Pass zeros for b_dec where the recipe does not
    subtract it.
    """
    return mm(x - b_dec, W_enc) + b_enc


def _encoder_pre_fwd(x, W_enc, b_enc, b_dec):
    xc = x - b_dec
    return mm(xc, W_enc) + b_enc, (xc, W_enc, b_enc)


def _encoder_pre_bwd(res, g):
    xc, W_enc, b_enc = res
    lead = tuple(range(g.ndim - 1))
    d_b_enc = batch_sum(g)
    d_W_enc = tdot(xc, g, (lead, lead)).astype(W_enc.dtype)
    d_b_dec = -mm(W_enc, d_b_enc).astype(W_enc.dtype)
    return mm(g, W_enc.T).astype(xc.dtype), d_W_enc, sum_to(d_b_enc, b_enc), d_b_dec


encoder_pre.defvjp(_encoder_pre_fwd, _encoder_pre_bwd)


@jax.custom_vjp
def decoder_matmul(f: jax.Array, W_dec: jax.Array) -> jax.Array:
    """f W_dec, with W_dec's gradient computed as (δᵀ f)ᵀ rather than fᵀ δ.

    Both are the same B·d·m contraction over the batch. XLA:CPU runs the [d, m]-shaped one
    about 15% faster than the [m, d]-shaped one (200 against 170 GFLOP/s at B 4096, d 768,
    m 16384, jax 0.10); the barrier keeps it from folding the transpose back into the dot.
    On GPU the two cost the same and the transpose is a copy of W_dec's size.
    """
    return mm(f, W_dec)


def _decoder_matmul_fwd(f, W_dec):
    return mm(f, W_dec), (f, W_dec)


def _decoder_matmul_bwd(res, g):
    f, W_dec = res
    lead = tuple(range(g.ndim - 1))
    d_W = jax.lax.optimization_barrier(tdot(g, f, (lead, lead))).T
    return mm(g, W_dec.T).astype(f.dtype), d_W.astype(W_dec.dtype)


decoder_matmul.defvjp(_decoder_matmul_fwd, _decoder_matmul_bwd)


def _sparse_encode_fwd(x, W_enc, b_enc, b_dec, dead, k, k_aux, batch, groups):
    xc = x - b_dec
    pre = mm(xc, W_enc) + b_enc
    code = batch_topk_code(pre, k, groups) if batch else topk_code(pre, k, groups)
    aux = dead_topk_code(pre, dead, k_aux, groups)
    return (code, aux), (xc, W_enc, code, aux, jnp.any(dead))


def _sparse_encode_bwd(k, k_aux, batch, groups, res, g):
    xc, W_enc, code, aux, any_dead = res
    g_code, g_aux = g
    delta = jnp.where(code.values > 0, g_code.values, 0)  # ReLU' of the kept values
    delta_aux = jnp.where(aux.values > 0, g_aux.values, 0)
    m = W_enc.shape[1]
    d_W_enc_t = _scatter_outer(delta, code.cols, code.rows, xc, m, groups)
    d_b_enc = jnp.zeros(m, delta.dtype).at[code.cols.reshape(-1)].add(delta.reshape(-1))
    W_enc_t = W_enc.T
    d_x = _gather_rows_sum(delta, code.cols, code.rows, W_enc_t, xc.shape[0], groups)

    def with_aux(acc):
        d_w, d_b, d_x = acc
        d_w = d_w + _scatter_outer(delta_aux, aux.cols, aux.rows, xc, m, groups)
        d_b = d_b.at[aux.cols.reshape(-1)].add(delta_aux.reshape(-1))
        return d_w, d_b, d_x + _gather_rows_sum(delta_aux, aux.cols, aux.rows, W_enc_t, xc.shape[0], groups)

    d_W_enc_t, d_b_enc, d_x = lax.cond(any_dead, with_aux, lambda acc: acc, (d_W_enc_t, d_b_enc, d_x))
    # XLA drops d_x where x is not differentiated (the training step), keeping only d·m work for b_dec.
    d_b_dec = -mm(W_enc, d_b_enc)
    return (d_x.astype(xc.dtype), d_W_enc_t.T.astype(W_enc.dtype), d_b_enc.astype(W_enc.dtype),
            d_b_dec.astype(W_enc.dtype), None)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def sparse_encode(x: jax.Array, W_enc: jax.Array, b_enc: jax.Array, b_dec: jax.Array, dead: jax.Array,
                  k: float, k_aux: int, batch: bool, groups: int = 1) -> tuple[SparseCode, SparseCode]:
    """The TopK / BatchTopK encoder with AuxK's selection, differentiated sparsely.

    Forward: pre = (x − b_dec) W_enc + b_enc (one dense matmul), then ``topk_code`` (or
    ``batch_topk_code`` if ``batch``) and ``dead_topk_code`` on the same pre-activations,
    so AuxK never recomputes the encoder. Backward (openai/sparse_autoencoder ``train.py``
    ``EncWrapper``): with δ the ReLU'-masked cotangent of the kept values (main and AuxK
    codes together), d W_enc[:, col] += (x − b_dec)[row] · δ, d b_enc[col] += δ (scatter-adds,
    B·(k + k_aux)·d FLOPs, the AuxK part only while a latent is dead), d b_dec =
    −W_enc · d b_enc (d·m), d x[row] += δ · W_enc[:, col]. Gradients equal autodiff of the
    dense reference ``topk_select(encoder_pre(...))`` (tests/test_activations.py,
    tests/test_models.py). ``dead`` (bool [m]) gets no gradient; k, k_aux, batch and groups
    are static.
    """
    return _sparse_encode_fwd(x, W_enc, b_enc, b_dec, dead, k, k_aux, batch, groups)[0]


sparse_encode.defvjp(_sparse_encode_fwd, _sparse_encode_bwd)


# --------------------------------------------------------------------------- Gated encoder
@jax.custom_vjp
def gated_code(x: jax.Array, W_gate: jax.Array, b_gate: jax.Array, r_mag: jax.Array, b_mag: jax.Array,
               b_dec: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Gated SAE's code and gate: (f, ReLU(π_gate)), one encoder matmul shared by both paths.

    h = (x − b_dec) W_gate, π_gate = h + b_gate, π_mag = h ⊙ exp(r_mag) + b_mag,
    f = sg(H(π_gate)) ⊙ ReLU(π_mag) (Rajamanoharan et al. 2024, arXiv 2404.16014, eq. 6–7 with
    weight sharing). The VJP is autodiff's, written out so that each [B, m] array is read as few
    times as possible: ∂π_mag = ∂f ⊙ H(π_gate) H(π_mag), ∂π_gate = ∂gate ⊙ H(π_gate),
    ∂h = ∂π_gate + exp(r_mag) ⊙ ∂π_mag. ∂π_gate is never stored: b_gate's gradient is
    Σ_b ∂h − exp(r_mag) ⊙ Σ_b ∂π_mag, and b_dec's is −W_gate Σ_b ∂h (the cheap way, as in
    ``encoder_pre``).
    """
    return _gated_code_fwd(x, W_gate, b_gate, r_mag, b_mag, b_dec)[0]


def _gated_code_fwd(x, W_gate, b_gate, r_mag, b_mag, b_dec):
    xc = x - b_dec
    h = mm(xc, W_gate)
    pi_gate, pi_mag = h + b_gate, h * jnp.exp(r_mag) + b_mag
    f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
    return (f, jax.nn.relu(pi_gate)), (xc, W_gate, h, b_gate, r_mag, b_mag, b_dec)


def _gated_code_bwd(res, cotangents):
    xc, W_gate, h, b_gate, r_mag, b_mag, b_dec = res
    df, dgate = cotangents
    scale = jnp.exp(r_mag)
    on = h + b_gate > 0
    d_mag = jnp.where(on & (h * scale + b_mag > 0), df, 0.0)
    dh = jnp.where(on, dgate, 0.0) + scale * d_mag  # ∂π_gate is not stored: only dh needs it
    lead = tuple(range(h.ndim - 1))
    sum_dh, db_mag = batch_sum(dh), batch_sum(d_mag)
    db_gate = sum_dh - scale * db_mag
    dr_mag = scale * batch_sum(d_mag * h)
    dW = tdot(xc, dh, (lead, lead)).astype(W_gate.dtype)
    db_dec = -mm(W_gate, sum_dh)
    return (mm(dh, W_gate.T).astype(xc.dtype), dW, sum_to(db_gate, b_gate), sum_to(dr_mag, r_mag),
            sum_to(db_mag, b_mag), sum_to(db_dec, b_dec))


gated_code.defvjp(_gated_code_fwd, _gated_code_bwd)

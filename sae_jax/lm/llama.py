"""A Llama decoder in plain JAX, as an activation source.

Weights are one pytree with the layers stacked on a leading axis, so runs of layers
between hooks are one ``lax.scan``. The forward is written once as Python over jitted
pieces: under the activations jit it traces into a single program that stops after the
last requested layer; for spliced logits it runs eagerly piece by piece, so each splice
function runs as its own (possibly jitted) call and never bakes its parameters into the
model's program. Rotary embeddings use the Hugging Face half-split layout; GGUF loaders
un-permute q/k into it. Computation is float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial, wraps
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.lm.source import (
    HOOK_KINDS,
    Source,
    SpliceFn,
    block_hooks,
    hook_name,
    parse_hook,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and constants of a Llama-architecture decoder."""

    vocab_size: int
    """Rows of the embedding matrix."""
    d_model: int
    """Residual-stream width."""
    n_layers: int
    """Number of decoder blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``n_heads``)."""
    d_mlp: int
    """Hidden width of the gated MLP."""
    head_dim: int
    """Width of one attention head."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rms_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Whether the unembedding is the transposed embedding."""
    matmul_precision: str = "highest"
    """``jax.default_matmul_precision`` for every piece: "highest" keeps float32 matmuls
    on GPUs/TPUs that would otherwise use TF32/bf16 passes; "default" trades that for speed."""

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not a multiple of {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


def params_from_hf(state: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Params:
    """JAX parameters from a Hugging Face Llama state dict (torch layout, numpy arrays).

    Linear weights keep the torch ``[out, in]`` layout (no transpose copies at load; XLA
    folds the transpose into the matmul) and the layers are stacked on axis 0.
    """

    def layer(name: str) -> np.ndarray:
        return np.stack([np.asarray(state[f"model.layers.{i}.{name}"], np.float32) for i in range(cfg.n_layers)])

    names = {
        "attn_norm": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "mlp_norm": "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    params: Params = {
        "embed": np.asarray(state["model.embed_tokens.weight"], np.float32),
        "layers": {k: layer(v) for k, v in names.items()},
        "final_norm": np.asarray(state["model.norm.weight"], np.float32),
    }
    if not cfg.tie_embeddings:
        params["unembed"] = np.asarray(state["lm_head.weight"], np.float32)
    return jax.tree.map(jnp.asarray, params)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` for a torch-layout ``w[out, in]``."""
    return jnp.einsum("...i,oi->...o", x, w)


# ---------------------------------------------------------------- pure pieces


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x[B, T, heads, hd]`` at positions 0..T-1 (half-split pairs)."""
    t, hd = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = np.arange(t, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = jnp.asarray(np.cos(np.concatenate([angles, angles], -1)))[None, :, None, :]
    sin = jnp.asarray(np.sin(np.concatenate([angles, angles], -1)))[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _attn(p: Params, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Attention output (after o_proj) of one block on the residual ``x``."""
    b, t, _ = x.shape
    h = _rms_norm(x, p["attn_norm"], cfg.rms_eps)
    q = _linear(h, p["wq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = _linear(h, p["wk"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = _linear(h, p["wv"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return _linear(out.reshape(b, t, cfg.n_heads * cfg.head_dim), p["wo"])


def _mlp(p: Params, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Gated-SiLU MLP output of one block on the residual ``x``."""
    h = _rms_norm(x, p["mlp_norm"], cfg.rms_eps)
    return _linear(jax.nn.silu(_linear(h, p["w_gate"])) * _linear(h, p["w_up"]), p["w_down"])


def _block(p: Params, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    x = x + _attn(p, x, cfg)
    return x + _mlp(p, x, cfg)


def _layer(layers: Params, i: int) -> Params:
    return jax.tree.map(lambda a: a[i], layers)


def _precise(fn):
    """Trace ``fn(..., cfg, ...)`` under ``cfg.matmul_precision``."""

    def wrapped(*args, cfg: LlamaConfig, **kwargs):
        with jax.default_matmul_precision(cfg.matmul_precision):
            return fn(*args, cfg=cfg, **kwargs)

    return wraps(fn)(wrapped)


@partial(jax.jit, static_argnames=("cfg",))
def _embed(params: Params, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


@partial(jax.jit, static_argnames=("cfg", "start", "stop"))
@_precise
def _scan_layers(layers: Params, x: jax.Array, cfg: LlamaConfig, start: int, stop: int):
    """Blocks ``start .. stop-1`` applied to the residual ``x``."""
    seg = jax.tree.map(lambda a: a[start:stop], layers)
    x, _ = jax.lax.scan(lambda h, p: (_block(p, h, cfg), None), x, seg)
    return x


@partial(jax.jit, static_argnames=("cfg", "i"))
@_precise
def _attn_at(layers: Params, x: jax.Array, cfg: LlamaConfig, i: int) -> jax.Array:
    return _attn(_layer(layers, i), x, cfg)


@partial(jax.jit, static_argnames=("cfg", "i"))
@_precise
def _mlp_at(layers: Params, x: jax.Array, cfg: LlamaConfig, i: int) -> jax.Array:
    return _mlp(_layer(layers, i), x, cfg)


@partial(jax.jit, static_argnames=("cfg",))
@_precise
def _head(params: Params, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    h = _rms_norm(x, params["final_norm"], cfg.rms_eps)
    return _linear(h, params["embed"] if cfg.tie_embeddings else params["unembed"])


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    hooks: Sequence[str] = (),
    splice: Mapping[str, SpliceFn] | None = None,
    logits: bool = True,
) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """``(logits or None, {hook: activation})`` for ``tokens[B, T]``.

    Hooks record the model's own activation, before any splice at the same hook. With
    ``logits=False`` the forward stops after the last layer any hook or splice touches.
    """
    splice = dict(splice or {})
    taps = sorted({parse_hook(h)[0] for h in (*hooks, *splice)})
    acts: dict[str, jax.Array] = {}

    def tap(layer: int, kind: str, value: jax.Array) -> jax.Array:
        name = hook_name(layer, kind)
        if name in hooks:
            acts[name] = value
        return splice[name](value) if name in splice else value

    x, done, layers = _embed(params, tokens, cfg), 0, params["layers"]
    for i in taps:
        if i > done:
            x = _scan_layers(layers, x, cfg=cfg, start=done, stop=i)
        x = tap(i, "hook_resid_pre", x)
        x = x + tap(i, "hook_attn_out", _attn_at(layers, x, cfg=cfg, i=i))
        x = tap(i, "hook_resid_post", x + tap(i, "hook_mlp_out", _mlp_at(layers, x, cfg=cfg, i=i)))
        done = i + 1
    if not logits:
        return None, acts
    if done < cfg.n_layers:
        x = _scan_layers(layers, x, cfg=cfg, start=done, stop=cfg.n_layers)
    return _head(params, x, cfg=cfg), acts


@partial(jax.jit, static_argnames=("cfg", "hooks"))
def _activations(params: Params, tokens: jax.Array, cfg: LlamaConfig, hooks: tuple[str, ...]):
    return forward(params, cfg, tokens, hooks, logits=False)[1]


@partial(jax.jit, static_argnames=("cfg",))
def _logits(params: Params, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    return forward(params, cfg, tokens)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Llama:
    """A loaded Llama: configuration plus device parameters, with jitted entry points."""

    cfg: LlamaConfig
    """Architecture constants."""
    params: Params = dataclasses.field(repr=False)
    """Parameter pytree (see :func:`params_from_hf`)."""

    @property
    def hooks(self) -> tuple[str, ...]:
        """Every hook name: ``blocks.{l}.hook_{resid_pre,attn_out,mlp_out,resid_post}``."""
        return block_hooks(self.cfg.n_layers, HOOK_KINDS)

    def activations(self, tokens: Any, hooks: Sequence[str]) -> dict[str, jax.Array]:
        """``{hook: [B, T, d_model]}``, running only up to the last hooked layer (one jit)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return _activations(self.params, tokens, self.cfg, tuple(sorted(set(hooks))))

    def logits(self, tokens: Any, splice: Mapping[str, SpliceFn] | None = None) -> jax.Array:
        """Logits ``[B, T, vocab]``; each spliced hook's activation replaced by ``fn(act)``."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if not splice:
            return _logits(self.params, tokens, self.cfg)
        return forward(self.params, self.cfg, tokens, splice=splice)[0]

    def run_with_hooks(
        self, tokens: Any, hooks: Sequence[str], splice: Mapping[str, SpliceFn] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits and the (pre-splice) activations at ``hooks`` in one forward."""
        tokens = jnp.asarray(tokens, jnp.int32)
        logits, acts = forward(self.params, self.cfg, tokens, tuple(hooks), splice)
        return logits, acts


def llama_source(model: Llama, name: str, **fields: Any) -> Source:
    """A :class:`~sae_jax.lm.source.Source` over ``model``; ``fields`` fill the rest."""
    return Source(
        name=name,
        d_model=model.cfg.d_model,
        hooks=model.hooks,
        activations_fn=model.activations,
        logits_fn=model.logits,
        **fields,
    )

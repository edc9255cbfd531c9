"""The activation-source protocol: tokens in, named activations out.

An activation source maps ``tokens[B, T] int32`` to ``{hook: array[B, T, d]}``; a source
with a language-model head may also give ``logits(tokens, splice={hook: fn})`` with each
``fn`` replacing that hook's activation. Hook names follow TransformerLens
(``blocks.{l}.hook_resid_post`` and friends). Every adapter in this package returns a
:class:`Source`, so callers see one type whatever the model underneath.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Array = Any  # a jax.Array, numpy array or torch tensor: sources return their own kind
SpliceFn = Callable[[Array], Array]
ActivationsFn = Callable[[Array, Sequence[str]], dict[str, Array]]
LogitsFn = Callable[[Array, Mapping[str, SpliceFn]], Array]

HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


@runtime_checkable
class Tokenizer(Protocol):
    """Text to token ids and back; the minimum a harvest needs."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        ...


def hook_name(layer: int, kind: str) -> str:
    """The TransformerLens hook name, e.g. ``hook_name(15, "resid_post")``."""
    kind = kind if kind.startswith("hook_") else f"hook_{kind}"
    return f"blocks.{layer}.{kind}"


def parse_hook(name: str) -> tuple[int, str]:
    """``(layer, kind)`` of a block hook name; ValueError for anything else."""
    match = _HOOK_RE.match(name)
    if match is None:
        raise ValueError(f"not a block hook name: {name!r} (expected blocks.{{l}}.hook_*)")
    return int(match.group(1)), match.group(2)


def block_hooks(n_layers: int, kinds: Sequence[str] = HOOK_KINDS) -> tuple[str, ...]:
    """Every ``blocks.{l}.{kind}`` name of an ``n_layers`` model, layer-major."""
    return tuple(hook_name(layer, kind) for layer in range(n_layers) for kind in kinds)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, for provenance metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Sequence[str | Path]) -> str:
    """One hex sha256 over several files: the digest of their sorted digests."""
    digests = sorted(sha256_file(p) for p in paths)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A language model seen as an activation source, with what a harvest must record.

    Call it as ``source(tokens, hooks=None)`` for ``{hook: [B, T, d]}`` (``None`` means
    every hook in ``hooks``; ask only for what you need, since a source may stop early).
    """

    name: str
    """Human-readable model name, recorded in store metadata."""
    d_model: int
    """Width of the residual stream (every hook here has this last dimension)."""
    hooks: tuple[str, ...] = dataclasses.field(repr=False)
    """Every hook name this source can return or splice."""
    activations_fn: ActivationsFn = dataclasses.field(repr=False)
    """``(tokens, hooks) -> {hook: activation}``; returns exactly the hooks asked for."""
    tokenizer: Tokenizer | None = dataclasses.field(default=None, repr=False)
    """Text to ids; ``None`` for a source fed pre-tokenized ids only."""
    bos_id: int | None = None
    """Beginning-of-sequence id (prepended by a harvest), or None if the model has none."""
    eos_id: int | None = None
    """End-of-sequence id (document separator when packing)."""
    pad_id: int | None = None
    """Padding id."""
    special_ids: frozenset[int] = frozenset()
    """Every control token id; positions holding them are excluded from harvests and scores."""
    weights_hash: str = ""
    """sha256 of the weight file(s)."""
    tokenizer_hash: str = ""
    """sha256 of the tokenizer definition."""
    logits_fn: LogitsFn | None = dataclasses.field(default=None, repr=False)
    """``(tokens, splice) -> logits[B, T, vocab]``; None if the model has no LM head."""

    def __call__(self, tokens: Array, hooks: Sequence[str] | None = None) -> dict[str, Array]:
        """Activations ``{hook: [B, T, d]}`` for ``tokens[B, T]``."""
        hooks = self.hooks if hooks is None else tuple(hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise KeyError(f"{self.name} has no hooks {unknown}")
        return self.activations_fn(tokens, hooks)

    @property
    def has_logits(self) -> bool:
        """Whether :meth:`logits` is available."""
        return self.logits_fn is not None

    def logits(self, tokens: Array, splice: Mapping[str, SpliceFn] | None = None) -> Array:
        """Next-token logits ``[B, T, vocab]``, each spliced hook replaced by ``fn(act)``."""
        if self.logits_fn is None:
            raise NotImplementedError(f"{self.name} has no language-model head")
        splice = dict(splice or {})
        unknown = [h for h in splice if h not in self.hooks]
        if unknown:
            raise KeyError(f"{self.name} cannot splice {unknown}")
        return self.logits_fn(tokens, splice)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready provenance: name, width, special ids and file hashes."""
        return {
            "name": self.name,
            "d_model": self.d_model,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "special_ids": sorted(self.special_ids),
            "weights_hash": self.weights_hash,
            "tokenizer_hash": self.tokenizer_hash,
        }


def function_source(fn: Callable[[Array], Mapping[str, Array]], *, hooks: Sequence[str], **fields: Any) -> Source:
    """Wrap a plain callable ``tokens -> {hook: act}`` (all its hooks at once) as a Source.

    ``fields`` are the remaining :class:`Source` fields (``name``, ``d_model``, ...).
    """

    def activations(tokens: Array, wanted: Sequence[str]) -> dict[str, Array]:
        out = fn(tokens)
        return {h: out[h] for h in wanted}

    return Source(hooks=tuple(hooks), activations_fn=activations, **fields)

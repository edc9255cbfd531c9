"""Tokenizers for the built-in models, on the ``tokenizers`` library.

A GGUF file carries its tokenizer as a token list, a merge list and token types; this
module rebuilds the byte-level BPE from them, so no tokenizer file is fetched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sae_jax.lm.source import sha256_file

if TYPE_CHECKING:  # the lm extra; imported where used so sae_jax.lm imports without it
    import tokenizers

# llama.cpp pre-tokenizer names whose regex is GPT-2's after splitting digits one by one.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "deepseek-coder"})
CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


@dataclasses.dataclass(frozen=True, eq=False)
class BPETokenizer:
    """A ``tokenizers.Tokenizer`` behind the :class:`~sae_jax.lm.source.Tokenizer` protocol."""

    backend: tokenizers.Tokenizer
    """The underlying fast tokenizer."""
    special_ids: frozenset[int]
    """Control-token ids, encoded as one token each and skipped by decode."""
    sha256: str
    """Digest of the tokenizer definition, for metadata."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing is prepended or appended."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel in Rust)."""
        out = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in out]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens kept."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int],
    pre: str = "gpt2",
) -> BPETokenizer:
    """Rebuild a GPT-2-style byte-level BPE from GGUF ``tokenizer.ggml.*`` fields."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(token_types) if t == CONTROL_TOKEN_TYPE]
    backend.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True) for i in special])
    definition = json.dumps([list(tokens), list(merges), [int(t) for t in token_types], pre])
    digest = hashlib.sha256(definition.encode()).hexdigest()
    return BPETokenizer(backend, frozenset(special), digest)


def from_tokenizer_json(path: str | Path) -> BPETokenizer:
    """Load a Hugging Face ``tokenizer.json``; its added special tokens count as special."""
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(path))
    added = backend.get_added_tokens_decoder()
    special = frozenset(i for i, tok in added.items() if tok.special)
    return BPETokenizer(backend, special, sha256_file(path))

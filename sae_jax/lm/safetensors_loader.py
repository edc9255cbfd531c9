"""Load a Hugging Face-style Llama folder (config.json + *.safetensors) into the JAX Llama.

The folder is read from local disk only: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.lm.llama import Llama, LlamaConfig, llama_source, params_from_hf
from sae_jax.lm.source import Source, sha256_files
from sae_jax.lm.tokenizer import from_tokenizer_json


def config_from_hf(config: dict[str, Any]) -> LlamaConfig:
    """A :class:`LlamaConfig` from a parsed Hugging Face ``config.json`` of a Llama."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"only model_type 'llama' is supported, got {config['model_type']!r}")
    rope = config.get("rope_parameters") or {}
    if (config.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise ValueError("rope scaling is not supported")
    n_heads = int(config["num_attention_heads"])
    d = int(config["hidden_size"])
    return LlamaConfig(
        vocab_size=int(config["vocab_size"]),
        d_model=d,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        d_mlp=int(config["intermediate_size"]),
        head_dim=int(config.get("head_dim") or d // n_heads),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of ``folder``: the shards of an index, or every ``*.safetensors``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files


def read_state(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor of ``files`` as float32 numpy (bfloat16 included, via the flax reader)."""
    from safetensors import safe_open

    state = {}
    for path in files:
        with safe_open(str(path), framework="flax") as f:
            names = f.keys()
            for key in names:
                state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return state


def safetensors_source(folder: str | Path, name: str | None = None) -> Source:
    """An activation source over a local Hugging Face Llama folder.

    ``tokenizer.json`` is used when present; special ids come from ``config.json``.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(config)
    files = safetensors_files(folder)
    tok_path = folder / "tokenizer.json"
    tokenizer = from_tokenizer_json(tok_path) if tok_path.is_file() else None

    def special(key: str) -> int | None:
        value = config.get(key)
        return int(value[0] if isinstance(value, list) else value) if value is not None else None

    return llama_source(
        Llama(cfg, params_from_hf(read_state(files), cfg)),
        name=name or folder.name,
        tokenizer=tokenizer,
        bos_id=special("bos_token_id"),
        eos_id=special("eos_token_id"),
        pad_id=special("pad_token_id"),
        special_ids=tokenizer.special_ids if tokenizer else frozenset(),
        weights_hash=sha256_files(files),
        tokenizer_hash=tokenizer.sha256 if tokenizer else "",
    )

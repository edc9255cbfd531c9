"""Language models as activation sources: ``tokens[B, T] -> {hook: [B, T, d]}``.

Knows nothing of SAEs or stores, but for ``sae_jax.lm.harvest``, which writes a source's
activations into a store (and is not imported here). The torch adapter lives in
``sae_jax.lm.hf_adapter`` and is imported only on demand (torch is an optional extra).
"""

from sae_jax.lm.gguf_loader import find_smollm2_gguf, gguf_source, read_gguf
from sae_jax.lm.llama import Llama, LlamaConfig, llama_source, params_from_hf
from sae_jax.lm.nnx_adapter import nnx_source, sown_intermediates
from sae_jax.lm.safetensors_loader import safetensors_source
from sae_jax.lm.source import (
    HOOK_KINDS,
    Source,
    Tokenizer,
    block_hooks,
    function_source,
    hook_name,
    parse_hook,
)

__all__ = [
    "HOOK_KINDS",
    "Llama",
    "LlamaConfig",
    "Source",
    "Tokenizer",
    "block_hooks",
    "find_smollm2_gguf",
    "function_source",
    "gguf_source",
    "hook_name",
    "llama_source",
    "nnx_source",
    "params_from_hf",
    "parse_hook",
    "read_gguf",
    "safetensors_source",
    "sown_intermediates",
]

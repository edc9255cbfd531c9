"""The activation store: round trips, atomic finalize, resume after SIGKILL, damage detection, import."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sae_jax.data import store as store_lib
from sae_jax.data.store import StoreError, create_store, open_store

REPO = Path(__file__).resolve().parents[2]


def rows_of(start: int, stop: int, d: int = 8) -> np.ndarray:
    """Deterministic rows: a function of the row index only (so a resumed writer can regenerate them)."""
    i = np.arange(start, stop, dtype=np.float64)[:, None]
    return (np.sin(i * 0.37 + np.arange(d)) * (1 + i % 5)).astype(np.float32)


def small_store(path, n=1000, d=8, dtype="float32", rows_per_chunk=64, rows_per_shard=256, **kw):
    writer = create_store(path, d_model=d, dtype=dtype, rows_per_chunk=rows_per_chunk,
                          rows_per_shard=rows_per_shard, **kw)
    for start in range(0, n, 97):  # odd-sized appends cross chunk and shard boundaries
        writer.append(rows_of(start, min(start + 97, n), d))
    return writer.finalize()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    store = small_store(tmp_path / "s", dtype=dtype, source={"model": "m", "hook": "h", "dataset": "d",
                                                             "context_size": 128})
    expected = rows_of(0, 1000).astype(store_lib.DTYPES[dtype]).astype(np.float32)
    assert store.n_tokens == 1000 and store.d_model == 8 and store.dtype == dtype
    assert store.read(0, 1000).tobytes() == expected.tobytes()
    assert store.read(250, 270).tobytes() == expected[250:270].tobytes()  # across a shard boundary
    raw = store.array()[0:1000].read().result()
    assert raw.dtype == store_lib.DTYPES[dtype]
    assert store.verify() == []
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["format_version"] == store_lib.FORMAT_VERSION
    assert meta["source"]["context_size"] == 128
    assert len(meta["sites"]["activations"]["checksums"]) == 4  # ceil(1000 / 256)
    np.testing.assert_allclose(store.norm_scalar, (expected.astype(np.float64) ** 2).sum(1).mean(), rtol=1e-5)
    again = open_store(tmp_path / "s")
    assert again.identity == store.identity and repr(again) == repr(store)
    assert not (tmp_path / "s.partial").exists()


def test_several_sites_and_extra_files(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8, sites=("layer3", "layer7"), rows_per_chunk=64,
                          rows_per_shard=128)
    writer.append({"layer3": rows_of(0, 300), "layer7": -rows_of(0, 300)})
    writer.add_file("ground_truth.npy", np.eye(4, dtype=np.float32))
    store = writer.finalize(norm_scalar={"layer3": 1.5, "layer7": 2.5}, extra_metadata={"note": "x"})
    assert store.sites == ("layer3", "layer7")
    np.testing.assert_array_equal(store.read(0, 300, site="layer7"), -rows_of(0, 300))
    assert store.norm_scalars == {"layer3": 1.5, "layer7": 2.5} and store.norm_scalar == 1.5
    np.testing.assert_array_equal(store.load_file("ground_truth.npy"), np.eye(4))
    assert store.metadata["extra"] == {"note": "x"}
    assert store.verify() == []
    with pytest.raises(StoreError, match="no site 'layer9'"):
        store.read(0, 1, site="layer9")
    text = store_lib.info(store)
    assert "layer7" in text and "300 tokens × 8" in text and "ground_truth.npy" in text


def test_writer_rejects_bad_appends(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8)
    with pytest.raises(StoreError, match="d_model is 8"):
        writer.append(np.zeros((3, 9), np.float32))
    with pytest.raises(StoreError, match="unsupported dtype"):
        writer.append(np.zeros((3, 8), np.int32))
    with pytest.raises(StoreError, match="sites"):
        writer.append({"other": np.zeros((3, 8), np.float32)})
    with pytest.raises(StoreError, match="no rows"):
        writer.finalize()


def test_unsupported_store_dtype_and_existing_paths(tmp_path):
    with pytest.raises(StoreError, match="unsupported dtype 'int8'"):
        create_store(tmp_path / "s", d_model=8, dtype="int8")
    small_store(tmp_path / "s")
    with pytest.raises(StoreError, match="already exists"):
        create_store(tmp_path / "s", d_model=8)


# --------------------------------------------------------------------------- unfinalized and crashed writers


def test_unfinalized_store_never_opens(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8, rows_per_chunk=64, rows_per_shard=128)
    writer.append(rows_of(0, 300))
    for path in (tmp_path / "s", tmp_path / "s.partial"):
        with pytest.raises(StoreError, match="unfinalized"):
            open_store(path)
    with pytest.raises(StoreError, match="resume=True"):
        create_store(tmp_path / "s", d_model=8)
    with pytest.raises(StoreError, match="resume asked for"):
        create_store(tmp_path / "s", d_model=16, resume=True)
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nothing")


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.data.test_store import rows_of
    from sae_jax.data.store import create_store
    writer = create_store({path!r}, d_model=8, rows_per_chunk=64, rows_per_shard=256)
    start = 0
    while True:  # append forever; the parent kills us with SIGKILL
        writer.append(rows_of(start, start + 50))
        start += 50
        print(writer.n_durable, flush=True)
""")


def test_sigkilled_writer_leaves_no_store_and_resumes(tmp_path):
    path = str(tmp_path / "s")
    script = CHILD.format(repo=str(REPO), path=path)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= 3 * 256:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(StoreError, match="unfinalized"):
        open_store(path)

    writer = create_store(path, d_model=8, resume=True)
    assert writer.n_written >= 3 * 256 and writer.n_written % 256 == 0
    n = writer.n_written + 123
    writer.append(rows_of(writer.n_written, n))
    store = writer.finalize()
    assert store.n_tokens == n
    assert store.read(0, n).tobytes() == rows_of(0, n).tobytes()
    assert store.verify() == []


# --------------------------------------------------------------------------- damage


def shard(store, k=1):
    return store.path / store_lib.shard_file("activations", k)


def test_deleted_shard_is_an_error_never_zeros(tmp_path):
    store = small_store(tmp_path / "s")
    shard(store).unlink()
    store = open_store(store.path)
    with pytest.raises(StoreError, match=r"c/1/0.*store verify"):
        store.read(256, 300)
    np.testing.assert_array_equal(store.read(0, 256), rows_of(0, 256))  # the other shards still read
    problems = store.verify()
    assert len(problems) == 1 and "c/1/0" in problems[0] and "missing" in problems[0]


def test_truncated_shard_is_an_error(tmp_path):
    store = small_store(tmp_path / "s")
    with open(shard(store), "r+b") as f:
        f.truncate(os.path.getsize(shard(store)) // 2)
    store = open_store(store.path)
    with pytest.raises(StoreError, match="c/1/0"):
        store.read(256, 512)
    assert any("c/1/0" in p for p in store.verify())


def test_flipped_byte_in_a_chunk_is_caught_on_read_and_by_verify(tmp_path):
    store = small_store(tmp_path / "s")
    with open(shard(store), "r+b") as f:
        f.seek(100)  # inside the first chunk's data (the index is at the end)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    store = open_store(store.path)
    with pytest.raises(StoreError, match="c/1/0"):
        store.read(256, 300)
    problems = store.verify()
    assert len(problems) == 1 and "c/1/0" in problems[0]


def test_changed_extra_file_and_bad_metadata(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8)
    writer.append(rows_of(0, 10))
    writer.add_file("ground_truth.npy", np.ones(3))
    store = writer.finalize()
    np.save(store.path / "ground_truth.npy", np.zeros(3))
    assert "checksum mismatch" in store.verify()[0]
    (store.path / "metadata.json").write_text("{not json")
    with pytest.raises(StoreError, match="metadata.json: cannot read it as JSON"):
        open_store(store.path)
    (store.path / "metadata.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(StoreError, match="missing field"):
        open_store(store.path)


def test_check_d_model_names_file_and_field(tmp_path):
    store = small_store(tmp_path / "s")
    store.check_d_model(8)
    with pytest.raises(StoreError, match=r"metadata.json: the store's d_model is 8 but model.d_model is 16"):
        store.check_d_model(16)


def test_unsupported_dtype_in_metadata(tmp_path):
    store = small_store(tmp_path / "s")
    meta = json.loads((store.path / "metadata.json").read_text())
    meta["dtype"] = "int4"
    (store.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="unsupported dtype 'int4'"):
        open_store(store.path)


# --------------------------------------------------------------------------- import


def test_import_npy_files(tmp_path):
    a, b = rows_of(0, 300), rows_of(300, 500)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b.reshape(4, 50, 8))  # [batch, context, d] is flattened
    store = store_lib.import_files(tmp_path / "s", [tmp_path / "a.npy", tmp_path / "b.npy"])
    assert store.dtype == "float32"
    assert store.read(0, 500).tobytes() == rows_of(0, 500).tobytes()


def test_import_safetensors_bf16_with_several_sites(tmp_path):
    from safetensors.numpy import save_file

    x = rows_of(0, 200).astype(ml_dtypes.bfloat16)
    save_file({"resid_3": x, "resid_7": -x}, str(tmp_path / "a.safetensors"))
    store = store_lib.import_files(tmp_path / "s", [tmp_path / "a.safetensors"])
    assert store.dtype == "bfloat16" and store.sites == ("resid_3", "resid_7")
    np.testing.assert_array_equal(store.read(0, 200, site="resid_7"), -x.astype(np.float32))


def test_import_bad_files_name_the_file(tmp_path):
    np.save(tmp_path / "ints.npy", np.zeros((4, 8), np.int64))
    with pytest.raises(StoreError, match=r"ints.npy: tensor .* unsupported dtype int64"):
        store_lib.import_files(tmp_path / "s1", [tmp_path / "ints.npy"])
    np.save(tmp_path / "good.npy", rows_of(0, 1000))
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"cut.npy: cannot read it"):
        store_lib.import_files(tmp_path / "s2", [tmp_path / "cut.npy"])
    np.save(tmp_path / "wide.npy", rows_of(0, 10, d=9))
    with pytest.raises(StoreError, match=r"wide.npy: rows have shape"):
        store_lib.import_files(tmp_path / "s3", [tmp_path / "good.npy", tmp_path / "wide.npy"])
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(StoreError, match=r"x.safetensors"):
        store_lib.import_files(tmp_path / "s4", [tmp_path / "x.safetensors"])


# --------------------------------------------------------------------------- resume, overwrite, ground truth


def test_overwrite_replaces_a_store_only_when_the_new_one_is_finalized(tmp_path):
    old = small_store(tmp_path / "s", n=300)
    writer = create_store(tmp_path / "s", d_model=8, rows_per_chunk=64, rows_per_shard=128, overwrite=True)
    writer.append(-rows_of(0, 500))
    assert open_store(tmp_path / "s").identity == old.identity  # still there while the new one is written
    new = writer.finalize()
    assert new.n_tokens == 500 and new.read(0, 500).tobytes() == (-rows_of(0, 500)).tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial, no replaced store left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="other: already exists and is not an activation store"):
        create_store(tmp_path / "other", d_model=8, overwrite=True)
    with pytest.raises(StoreError, match="not both"):
        create_store(tmp_path / "t", d_model=8, resume=True, overwrite=True)


def test_overwrite_deletes_a_partial_store_and_resume_checks_the_source(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8, rows_per_chunk=64, rows_per_shard=128, source={"run": 1})
    writer.append(rows_of(0, 300))
    resumed = create_store(tmp_path / "s", d_model=8, resume=True)
    assert resumed.n_written == 256
    store_lib.check_resumed_source(resumed, {"run": 1})
    with pytest.raises(StoreError, match=r"s.partial: .*other settings \(run\).*--overwrite"):
        store_lib.check_resumed_source(resumed, {"run": 2})
    fresh = create_store(tmp_path / "s", d_model=8, rows_per_chunk=64, rows_per_shard=128, overwrite=True)
    assert fresh.n_written == 0
    fresh.append(rows_of(0, 10))
    assert fresh.finalize().read(0, 10).tobytes() == rows_of(0, 10).tobytes()


def test_a_writer_with_nothing_durable_leaves_no_partial(tmp_path):
    writer = create_store(tmp_path / "s", d_model=8)
    with pytest.raises(StoreError, match="no rows"):
        writer.finalize()
    assert not (tmp_path / "s.partial").exists()
    with pytest.raises(StoreError, match=r"rows have shape \(8,\); pass arrays of 2 or more dimensions"):
        create_store(tmp_path / "s", d_model=8).append(np.zeros(8, np.float32))


def test_import_resumes_after_the_durable_rows_of_the_same_files(tmp_path):
    a, b = rows_of(0, 700), rows_of(700, 1000)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    source = {"imported_from": [str(f.resolve()) for f in files], "input_bytes": [f.stat().st_size for f in files]}
    writer = create_store(tmp_path / "s", d_model=8, source=source, rows_per_chunk=64, rows_per_shard=256)
    writer.append(rows_of(0, 600))  # two whole shards durable, then a crash
    store = store_lib.import_files(tmp_path / "s", files, rows_per_chunk=64, resume=True)
    assert store.read(0, 1000).tobytes() == rows_of(0, 1000).tobytes()
    assert store.metadata["source"] == source and store.verify() == []


def test_import_checks_every_input_before_creating_anything(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5000, np.float32))
    with pytest.raises(StoreError, match=r"flat.npy: the array has shape \(5000,\); .*\[rows, d_model\]"):
        store_lib.import_files(tmp_path / "s", [tmp_path / "flat.npy"])
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    with pytest.raises(StoreError, match=r"empty.npy: no rows to import"):
        store_lib.import_files(tmp_path / "s", [tmp_path / "empty.npy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy", "flat.npy"]


def test_ground_truth_is_checked_against_its_digest(tmp_path):
    from sae_jax import config as config_lib
    from sae_jax.train import loop

    prepare = lambda: loop.prepare(config_lib.load_config(None, [f"data.store={store.path}", "model.d_sae=16"]))  # noqa
    assert small_store(tmp_path / "plain").ground_truth() is None
    writer = create_store(tmp_path / "s", d_model=8)
    writer.append(rows_of(0, 10))
    writer.add_file("ground_truth.npy", np.eye(4, 8, dtype=np.float32))
    store = writer.finalize()
    np.testing.assert_array_equal(store.ground_truth(), np.eye(4, 8))
    np.testing.assert_array_equal(prepare().ground_truth, np.eye(4, 8))
    changed = np.eye(4, 8, dtype=np.float32)
    changed[3, 7] = 0.5
    np.save(store.path / "ground_truth.npy", changed)
    for read in (store.ground_truth, prepare, lambda: store.load_file("ground_truth.npy")):  # training refuses it first
        with pytest.raises(StoreError, match=r"ground_truth.npy: checksum mismatch .*re-create the store"):
            read()
    (store.path / "ground_truth.npy").unlink()
    with pytest.raises(StoreError, match=r"ground_truth.npy: missing, though metadata.json lists it"):
        store.ground_truth()
    np.save(tmp_path / "plain" / "ground_truth.npy", np.eye(4, 8))  # put there by hand: not checkable
    with pytest.raises(StoreError, match=r"ground_truth.npy: not listed in metadata.json.*--ground-truth"):
        open_store(tmp_path / "plain").ground_truth()

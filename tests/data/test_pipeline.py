"""The loader: a seeded permutation per epoch split across hosts, exact resume, bad rows, evaluation batches."""

import json

import grain
import ml_dtypes
import numpy as np
import pytest

from sae_jax.data import pipeline
from sae_jax.data.pipeline import ActivationLoader, iter_eval, split_bounds
from sae_jax.data.store import StoreError, create_store, shard_file

N = 3000  # not a multiple of the block size: the last block is partial
D = 4
SMALL = {"block_rows": 64, "shuffle_blocks": 4}  # windows of 256 rows: batches span windows
DIRECT = {"block_rows": 64, "shuffle_blocks": 0}  # no row shuffle: a window is one batch, cut across blocks
MODES = {"rowshuffle": SMALL, "direct": DIRECT}


def indexed_store(path, n=N, dtype="float32", bad_rows=()):
    """Column 0 of row i is i (exact in float32 and, up to 256, in bfloat16): batches reveal their rows."""
    x = np.zeros((n, D), np.float32)
    x[:, 0] = np.arange(n)
    x[:, 1:] = np.random.default_rng(0).standard_normal((n, D - 1))
    x[list(bad_rows), 2] = np.nan
    writer = create_store(path, d_model=D, dtype=dtype, rows_per_chunk=64, rows_per_shard=512)
    writer.append(x)
    return writer.finalize(), x


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return MODES[request.param]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return indexed_store(tmp_path_factory.mktemp("data") / "s")[0]


def ids(batches) -> np.ndarray:
    return np.concatenate(batches)[:, 0].astype(np.int64)


def loader(store, **kw):
    args = {"batch_size": 40, "seed": 3, "split": "all", **SMALL} | kw
    return ActivationLoader(store, **args)


# --------------------------------------------------------------------------- splits


def test_split_bounds():
    b = split_bounds(100_000, 0.05)
    assert b["train"] == (0, 94_208) and b["holdout"] == (94_208, 100_000) and b["all"] == (0, 100_000)
    assert b["train"][1] % 1024 == 0 and b["holdout"][1] - b["holdout"][0] >= 5000
    assert split_bounds(1000, 0.1)["train"] == (0, 900)  # too small to align: unaligned rather than empty
    assert split_bounds(1000, 0.0)["holdout"] == (1000, 1000)
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_bounds(1000, 1.0)


# --------------------------------------------------------------------------- permutations across hosts


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_every_token_once_per_epoch_across_hosts(store, hosts, mode):
    per_host = []
    for p in range(hosts):
        it = loader(store, process_index=p, process_count=hosts, num_epochs=2, **mode)
        batches = list(it)
        assert all(b.shape == (40 // hosts, D) and b.dtype == np.float32 for b in batches)
        per_host.append(np.stack(batches))
    assert len({len(b) for b in per_host}) == 1  # every host delivers the same number of batches
    global_batches = np.concatenate(per_host, axis=1)  # global batch i = concat over hosts in host order
    rows = global_batches.reshape(-1, D)[:, 0].astype(np.int64)
    epoch0, epoch1 = rows[:N], rows[N:]
    assert len(rows) == 2 * N
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(N))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(N))
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch
    host_sets = [set(ids(list(h[: N // 40])).tolist()) for h in per_host]  # epoch 0 of each host
    assert sum(len(s) for s in host_sets) == N and len(set().union(*host_sets)) == N  # disjoint


def test_shuffle_is_deterministic_by_seed_and_mixes_blocks(store):
    a, b, c = ids(list(loader(store, num_epochs=1))), ids(list(loader(store, num_epochs=1))), \
        ids(list(loader(store, seed=4, num_epochs=1)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    first = a[:40]
    assert len(np.unique(first // 64)) >= 3  # one batch draws from several blocks
    assert not np.all(np.diff(first) == 1)


def test_epoch_and_counters(store):
    it = loader(store, batch_size=100, num_epochs=2)
    assert it.epoch == 0 and it.tokens_seen == 0
    for _ in range(N // 100):
        next(it)
    assert it.epoch == 1 and it.tokens_seen == N  # an epoch is exactly N rows here
    assert it.skipped_rows == 0


def test_direct_batches_mix_random_blocks(store):
    a = ids(list(loader(store, batch_size=400, num_epochs=1, **DIRECT)))
    first = a[:400]
    assert len(np.unique(first // 64)) >= 6  # a batch is ~6 whole random blocks
    assert not np.array_equal(np.sort(np.unique(first // 64)), np.arange(len(np.unique(first // 64))))


def test_defaults_follow_the_store_chunks(store):
    assert pipeline.default_shuffle_blocks(4096, 128) == 0  # 32 blocks per batch: read batches directly
    assert pipeline.default_shuffle_blocks(4096, 1024) == pipeline.DEFAULT_SHUFFLE_BLOCKS  # 4 blocks: shuffle rows
    direct = ActivationLoader(store, batch_size=1024, seed=0, split="all")
    assert (direct.block_rows, direct.shuffle_blocks) == (64, 0)
    assert direct.plan.window_rows == 1024 and not direct.plan.shuffle_rows
    small = ActivationLoader(store, batch_size=40, seed=0, split="all")
    assert (small.block_rows, small.shuffle_blocks) == (64, pipeline.DEFAULT_SHUFFLE_BLOCKS)
    assert small.plan.window_rows == 64 * pipeline.DEFAULT_SHUFFLE_BLOCKS and small.plan.shuffle_rows


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16"])
def test_storage_dtype_batches_equal_the_float32_batches(tmp_path, store_dtype, mode):
    store, _ = indexed_store(tmp_path / "s", n=256, dtype=store_dtype)
    wide = list(loader(store, num_epochs=2, **mode))
    narrow = list(loader(store, num_epochs=2, dtype="storage", **mode))
    assert all(b.dtype == np.dtype(store_dtype if store_dtype == "float32" else ml_dtypes.bfloat16) for b in narrow)
    np.testing.assert_array_equal(np.stack(narrow).astype(np.float32), np.stack(wide))
    with pytest.raises(ValueError, match="'float32' or 'storage'"):
        loader(store, dtype="float16")


def test_bfloat16_nonfinite_rows_in_storage_dtype(tmp_path, mode):
    bad = [5, 100, 255]
    store, _ = indexed_store(tmp_path / "s", n=256, dtype="bfloat16", bad_rows=bad)
    with pytest.raises(StoreError, match=r"row (5|100|255) of site 'activations' holds NaN or Inf"):
        list(loader(store, num_epochs=1, dtype="storage", **mode))
    it = loader(store, batch_size=23, num_epochs=1, nonfinite="skip", dtype="storage", **mode)  # 253 = 11 x 23
    rows = ids([b.astype(np.float32) for b in it])
    assert it.skipped_rows == 3
    np.testing.assert_array_equal(np.sort(rows), np.setdiff1d(np.arange(256), bad))


def test_nonfinite_rows_finds_exactly_the_bad_rows():
    x = np.ones((6, 5), np.float32)
    x[1] = 3e38  # finite, but its sum overflows: not a bad row
    assert pipeline.nonfinite_rows(x) is None
    x[2, 3], x[4, 0] = np.inf, np.nan
    np.testing.assert_array_equal(pipeline.nonfinite_rows(x), [2, 4])
    b = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(pipeline.nonfinite_rows(b), [2, 4])
    b[2, 3], b[4, 0] = -3e38, 1.0
    assert pipeline.nonfinite_rows(b) is None  # the largest finite bfloat16 values are not NaN/Inf


def test_bfloat16_batches_widen_exactly(tmp_path):
    store, x = indexed_store(tmp_path / "s", n=256, dtype="bfloat16")
    batch = next(loader(store, batch_size=256, num_epochs=1))
    order = batch[:, 0].astype(np.int64)
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)[order]
    assert batch.tobytes() == expected.tobytes()


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("taken", [0, 1, 7, 75, 81])  # window starts, mid-window, an epoch boundary, epoch 2
def test_restore_continues_with_identical_batches(store, taken, mode):
    first = loader(store, num_epochs=3, **mode)
    for _ in range(taken):
        next(first)
    state, epoch = json.loads(json.dumps(first.get_state())), first.epoch
    expected = [next(first) for _ in range(20)]
    second = loader(store, num_epochs=3, **mode)
    second.set_state(state)
    assert second.epoch == epoch == taken * 40 // N
    got = [next(second) for _ in range(20)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    assert second.tokens_seen == first.tokens_seen


def test_restore_on_a_running_iterator(store, mode):
    it = loader(store, num_epochs=None, **mode)
    state = None
    for i in range(30):
        if i == 10:
            state = it.get_state()
        next(it)
    later = [next(it) for _ in range(3)]
    it.set_state(state)
    replay = [next(it) for _ in range(23)]
    np.testing.assert_array_equal(np.stack(replay[20:]), np.stack(later))


def test_grain_checkpoint_check(store, mode):
    ds = loader(store, batch_size=400, num_epochs=1, prefetch=2, **mode).dataset  # 7 batches
    grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_state_from_other_settings_is_refused(store):
    state = loader(store).get_state()
    with pytest.raises(ValueError, match="other data settings"):
        loader(store, seed=99).set_state(state)
    with pytest.raises(ValueError, match="store"):
        loader(store).set_state(state | {"store": "0000"})


# --------------------------------------------------------------------------- bad rows and bad stores


def test_nonfinite_rows_error_by_default_and_skip_on_request(tmp_path, mode):
    bad = [5, 700, 2999]
    store, _ = indexed_store(tmp_path / "s", bad_rows=bad)
    with pytest.raises(StoreError, match=r"c/\d+/0: row (5|700|2999) of site 'activations' holds NaN or Inf"):
        list(loader(store, num_epochs=1, **mode))
    it = loader(store, num_epochs=1, nonfinite="skip", **mode)
    rows = ids(list(it))
    assert it.skipped_rows == 3
    assert len(rows) == (N - 3) // 40 * 40 and not set(bad) & set(rows.tolist())
    assert len(np.unique(rows)) == len(rows)
    it = loader(store, num_epochs=1, nonfinite="skip", **mode)  # a restore mid-way counts and skips the same
    head = [next(it) for _ in range(30)]
    state = json.loads(json.dumps(it.get_state()))
    again = loader(store, num_epochs=1, nonfinite="skip", **mode)
    again.set_state(state)
    np.testing.assert_array_equal(ids(head + list(again)), rows)
    assert again.skipped_rows == 3
    with pytest.raises(StoreError, match="row 5 "):
        list(iter_eval(store, batch_size=100, split="all"))
    assert sum(len(b) for b in iter_eval(store, batch_size=100, split="all", nonfinite="skip")) == N - 3


def test_deleted_shard_stops_the_loader_with_the_file_named(tmp_path):
    store, _ = indexed_store(tmp_path / "s")
    (store.path / shard_file("activations", 2)).unlink()
    with pytest.raises(StoreError, match=r"c/2/0.*store verify"):
        list(loader(store, num_epochs=1))


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        loader(store, process_count=3)
    with pytest.raises(ValueError, match="nonfinite"):
        loader(store, nonfinite="ignore")
    with pytest.raises(StoreError, match="no site"):
        loader(store, site="nope")


# --------------------------------------------------------------------------- evaluation and devices


def test_iter_eval_covers_the_split_in_order(store):
    lo, hi = split_bounds(N, 0.1)["holdout"]
    batches = list(iter_eval(store, batch_size=128, holdout_fraction=0.1))
    np.testing.assert_array_equal(ids(batches), np.arange(lo, hi))
    assert all(len(b) == 128 for b in batches[:-1]) and 0 < len(batches[-1]) <= 128
    capped = list(iter_eval(store, batch_size=128, split="all", max_tokens=300))
    np.testing.assert_array_equal(ids(capped), np.arange(300))


def test_train_and_holdout_do_not_overlap(store):
    train = ids(list(loader(store, split="train", holdout_fraction=0.1, num_epochs=1)))
    lo, _ = split_bounds(N, 0.1)["holdout"]
    assert train.max() < lo


def test_to_global_single_process():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    g = pipeline.to_global(x, NamedSharding(mesh, PartitionSpec("data")))
    assert g.shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(g), x)

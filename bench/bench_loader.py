"""Loader throughput against raw sequential tensorstore reads of the same store, in one run.

    python bench/bench_loader.py --rows 1048576 --d-model 768 --dtype bfloat16

Makes a store of random activations with the store's default layout (or uses --store), then
alternates, --repeats times:
  raw:            the site read front to back in slices of --raw-slice rows, in the storage
                  dtype, one read at a time (tensorstore parallelises within a read);
  to-device:      what training runs: ActivationLoader with its defaults (random blocks of one
                  store chunk, batches of --batch-size rows read straight from them, NaN/Inf
                  check) delivering the store's dtype, each batch made a global jax.Array on
                  the batch sharding. The train step widens bfloat16 to float32 on the device,
                  fused with the normalization multiply it does anyway, so the widening costs
                  the step nothing;
  float32-host:   the same loader widening bfloat16 -> float32 on the host;
  rowshuffle-host: float32-host plus an in-memory row shuffle buffer of --shuffle-blocks
                  blocks (the loader's default for stores whose chunks are large).
Prints rows/s and GB/s (in storage bytes) of each, the ratios to raw of the medians, and
the machine. Both read the same files, so with a store that fits in memory both are served by
the page cache after the first pass (--drop-note reminds of that in the output).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_jax import hostmem  # noqa: E402
from sae_jax.data import pipeline  # noqa: E402
from sae_jax.data import store as store_lib  # noqa: E402


def make_store(path: Path, rows: int, d_model: int, dtype: str) -> store_lib.Store:
    """A store of Gaussian rows (written in 64k-row appends)."""
    rng = np.random.default_rng(0)
    writer = store_lib.create_store(path, d_model=d_model, dtype=dtype, source={"model": "bench", "hook": "random"})
    for start in range(0, rows, 65536):
        writer.append(rng.standard_normal((min(65536, rows - start), d_model), dtype=np.float32))
    return writer.finalize(norm_scalar=float(d_model))


class Timer:
    """Wall and CPU (all threads of this process) seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def raw_read(store: store_lib.Store, slice_rows: int) -> tuple[Timer, int]:
    """Read the default site front to back in its storage dtype; (timer, rows)."""
    array = store_lib.open_store(store.path).array()
    with Timer() as t:
        for start in range(0, store.n_tokens, slice_rows):
            array[start:min(start + slice_rows, store.n_tokens)].read().result()
    return t, store.n_tokens


def pipeline_read(store: store_lib.Store, args, shuffle_blocks: int | None, dtype: str,
                  sharding=None) -> tuple[Timer, int]:
    """One shuffled epoch over every token (to global jax.Arrays when a sharding is given); (timer, rows)."""
    loader = pipeline.ActivationLoader(store, batch_size=args.batch_size, seed=0, split="all",
                                       block_rows=args.block_rows, shuffle_blocks=shuffle_blocks, num_epochs=1,
                                       prefetch=args.prefetch, dtype=dtype)
    rows = 0
    with Timer() as t:
        for batch in loader:
            if sharding is not None:
                batch = pipeline.to_global(batch, sharding).block_until_ready()
            assert batch.dtype == loader.dtype
            rows += batch.shape[0]
    loader.close()
    return t, rows


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, cpu_count={os.cpu_count()}, "
            f"python {platform.python_version()}, load average {load[0]:.2f}, {hostmem.describe()}")


def main(argv=None) -> int:
    if argv is None:  # run as a program, not called with arguments
        hostmem.reexec_with_hugepages()  # as the sae-jax command runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="an existing store to read (default: make one in --workdir)")
    p.add_argument("--workdir", help="where to make the store (default: a temporary directory, removed after)")
    p.add_argument("--rows", type=int, default=262144, help="rows of the made store (the goal: 1048576)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--block-rows", type=int, default=0, help="0: the store's rows per chunk (the loader's default)")
    p.add_argument("--shuffle-blocks", type=int, default=16, help="row shuffle buffer of the second pipeline row")
    p.add_argument("--raw-slice", type=int, default=16384, help="rows per raw read")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.store:
            store = store_lib.open_store(args.store)
        else:
            t = time.perf_counter()
            store = make_store(Path(tmp) / "store", args.rows, args.d_model, args.dtype)
            print(f"made {store.n_tokens:,} x {store.d_model} {store.dtype} in {time.perf_counter() - t:.1f} s")
        report(store, args)
    return 0


def report(store: store_lib.Store, args) -> None:
    gb = store.n_tokens * store.d_model * store_lib.DTYPES[store.dtype].itemsize / 1e9
    print(f"store: {store.path} ({store.n_tokens:,} x {store.d_model} {store.dtype}, {gb:.2f} GB)")
    block_rows = args.block_rows or store.rows_per_chunk
    default_shuffle = pipeline.default_shuffle_blocks(args.batch_size, block_rows)
    print(f"loader defaults for this store: blocks of {block_rows} rows, shuffle_blocks={default_shuffle} "
          f"({args.batch_size // block_rows} blocks per batch)")
    raw_read(store, args.raw_slice)  # warm the page cache once
    import jax

    batch_sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                                jax.sharding.PartitionSpec("data"))
    runs = {"raw": lambda: raw_read(store, args.raw_slice),
            "to-device": lambda: pipeline_read(store, args, None, "storage", batch_sharding),
            "float32-host": lambda: pipeline_read(store, args, None, "float32"),
            "rowshuffle-host": lambda: pipeline_read(store, args, args.shuffle_blocks, "float32")}
    results = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, run in runs.items():
            t, rows = run()
            results[name].append((rows / t.wall, t.cpu / rows))
            print(f"  repeat {r} {name:15s}: {rows / t.wall:12,.0f} rows/s, {t.cpu / t.wall:.2f} cores busy")
    per_row = gb / store.n_tokens
    rate = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print(f"raw sequential tensorstore read: {rate['raw']:,.0f} rows/s = {rate['raw'] * per_row:.2f} GB/s, "
          f"{cpu['raw'] / per_row:.2f} CPU s/GB")
    device = f"{len(jax.devices())} {jax.devices()[0].platform} device(s)"
    for name, what in (("to-device", f"shuffle_blocks={default_shuffle}, {store.dtype} to {device}"),
                       ("float32-host", f"shuffle_blocks={default_shuffle}, {store.dtype}->float32 on the host"),
                       ("rowshuffle-host",
                        f"shuffle_blocks={args.shuffle_blocks}, {store.dtype}->float32 on the host")):
        print(f"{name} (random blocks of {block_rows}, {what}, batches of {args.batch_size}, "
              f"prefetch {args.prefetch}): {rate[name]:,.0f} rows/s = "
              f"{rate[name] * per_row:.2f} GB/s of stored bytes, {cpu[name] / per_row:.2f} CPU s/GB; "
              f"ratio to raw {rate[name] / rate['raw']:.2f} (medians of {args.repeats}; best of each "
              f"{max(r for r, _ in results[name]) / max(r for r, _ in results['raw']):.2f})")
    print("goal: pipeline / raw >= 0.8")


if __name__ == "__main__":
    sys.exit(main())

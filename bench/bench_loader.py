"""Loader throughput against raw sequential tensorstore reads of the same store, in one run.

    python bench/bench_loader.py --rows 1048576 --d-model 768 --dtype bfloat16

Makes a store of random activations (or uses --store), then alternates, --repeats times:
  raw:      the site read front to back in slices of block_rows * shuffle_blocks rows, in the
            storage dtype, one read at a time (tensorstore parallelises within a read);
  pipeline: ActivationLoader over every token for one epoch: shuffled blocks, shuffle buffer,
            batches of --batch-size rows, bfloat16 -> float32.
Prints rows/s and GB/s (in storage bytes) of each, the ratio pipeline / raw of the medians, and
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


def pipeline_read(store: store_lib.Store, args) -> tuple[Timer, int]:
    """One shuffled epoch of float32 batches over every token; (timer, rows)."""
    loader = pipeline.ActivationLoader(store, batch_size=args.batch_size, seed=0, split="all",
                                       block_rows=args.block_rows, shuffle_blocks=args.shuffle_blocks, num_epochs=1,
                                       prefetch=args.prefetch)
    rows = 0
    with Timer() as t:
        for batch in loader:
            assert batch.dtype == np.float32
            rows += batch.shape[0]
    loader.close()
    return t, rows


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, cpu_count={os.cpu_count()}, "
            f"python {platform.python_version()}, load average {load[0]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="an existing store to read (default: make one in --workdir)")
    p.add_argument("--workdir", help="where to make the store (default: a temporary directory, removed after)")
    p.add_argument("--rows", type=int, default=262144, help="rows of the made store (the goal: 1048576)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--shuffle-blocks", type=int, default=16)
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
    raw_read(store, args.block_rows * args.shuffle_blocks)  # warm the page cache once
    results = {"raw": [], "pipeline": []}
    for r in range(args.repeats):
        for name, (t, rows) in (("raw", raw_read(store, args.block_rows * args.shuffle_blocks)),
                                ("pipeline", pipeline_read(store, args))):
            results[name].append((rows / t.wall, t.cpu / rows))
            print(f"  repeat {r} {name:8s}: {rows / t.wall:12,.0f} rows/s, {t.cpu / t.wall:.2f} cores busy")
    per_row = gb / store.n_tokens
    rate = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print(f"raw sequential tensorstore read: {rate['raw']:,.0f} rows/s = {rate['raw'] * per_row:.2f} GB/s, "
          f"{cpu['raw'] / per_row:.2f} CPU s/GB")
    print(f"pipeline (shuffled, batched {args.batch_size}, {store.dtype}->float32, prefetch {args.prefetch}): "
          f"{rate['pipeline']:,.0f} rows/s = {rate['pipeline'] * per_row:.2f} GB/s of stored bytes, "
          f"{cpu['pipeline'] / per_row:.2f} CPU s/GB")
    print(f"ratio pipeline / raw (medians of {args.repeats}): {rate['pipeline'] / rate['raw']:.2f}  (goal >= 0.8); "
          f"best of each: {max(r for r, _ in results['pipeline']) / max(r for r, _ in results['raw']):.2f}")


if __name__ == "__main__":
    sys.exit(main())

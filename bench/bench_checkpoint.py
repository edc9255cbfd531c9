"""How long an asynchronous checkpoint save blocks the training loop, against a step's time.

    python bench/bench_checkpoint.py --d-model 768 --d-sae 16384 --batch 4096

Builds the real loop pieces (store, mesh, jitted step, loader, ``checkpoint.Checkpoints``) on a
store of Gaussian rows (or --store), runs --steps steps, each timed to completion
(block_until_ready), and saves after every --every-th one. It reports the median of:
  step:        one train step;
  save blocks: the ``Checkpoints.save`` call (waiting for the previous save, digest dispatch,
               orbax's blocking part: handing the arrays over and writing the JSON item);
  step after:  the step right after a save (it shares the CPU with the background write);
  write:       a last save followed at once by ``wait``: the background write and commit (what a
               synchronous save would add to the blocking time);
  digest:      the per-leaf digests on their own (part of 'save blocks').
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_jax import config as config_lib  # noqa: E402
from sae_jax import hostmem, sharding  # noqa: E402
from sae_jax.data import pipeline  # noqa: E402
from sae_jax.data import store as store_lib  # noqa: E402
from sae_jax.train import checkpoint, loop  # noqa: E402


def make_store(path: Path, rows: int, d_model: int) -> store_lib.Store:
    """A store of Gaussian rows."""
    rng = np.random.default_rng(0)
    writer = store_lib.create_store(path, d_model=d_model, source={"model": "bench", "hook": "random"})
    for start in range(0, rows, 16384):
        writer.append(rng.standard_normal((min(16384, rows - start), d_model), dtype=np.float32))
    return writer.finalize(norm_scalar=float(d_model))


def timed(fn, *args):
    """(fn(*args), seconds)."""
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def digest_now(state, replicated):
    return jax.block_until_ready(checkpoint.tree_digest(state, replicated))


def main() -> None:
    hostmem.reexec_with_hugepages()  # as the sae-jax command runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=9, help="timed steps (after one warm-up step)")
    p.add_argument("--every", type=int, default=2, help="save after every this many steps")
    p.add_argument("--store", help="an existing store (default: make one of 4 batches of Gaussian rows)")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    a = p.parse_args()

    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    store = store_lib.open_store(a.store) if a.store else make_store(root / "store", 4 * a.batch + 1024, a.d_model)
    cfg = config_lib.load_config(None, [f"data.store={store.path}", f"train.workdir={root / 'run'}",
                                        f"model.d_sae={a.d_sae}", f"train.batch_size={a.batch}",
                                        f"train.steps={a.steps + 1}", "data.holdout_fraction=0.01"])
    run = loop.prepare(cfg)
    state = loop.init_train_state(run)
    train_step = loop.compile_step(run, state)
    loader = loop.make_loader(run)
    batch_sharding = sharding.batch_sharding(run.mesh)
    ckpts = checkpoint.Checkpoints(root / "run" / "checkpoints", 0, 2, sharding.replicated(run.mesh), fresh=True)

    def step(state):
        x = pipeline.to_global(next(loader), batch_sharding)
        return timed(lambda: jax.block_until_ready(train_step(state, x)[0]))

    state, _ = step(state)  # compile
    digest_now(state, ckpts.replicated)  # compile
    step_s, after_s, save_s, digest_s = [], [], [], []
    saved_last = False
    for i in range(1, a.steps + 1):
        state, t = step(state)
        (after_s if saved_last else step_s).append(t)
        saved_last = i % a.every == 0
        if saved_last:
            digest_s.append(timed(digest_now, state, ckpts.replicated)[1])
            _, t = timed(ckpts.save, i, state, loop.checkpoint_meta(run, loader, i))
            save_s.append(t)
    ckpts.wait()
    _, last_save_s = timed(ckpts.save, a.steps + 1, state, loop.checkpoint_meta(run, loader, a.steps + 1))
    _, write_s = timed(ckpts.wait)  # at once: the background write and commit, nothing overlapping
    ckpts.close()
    loader.close()

    leaves = jax.tree.leaves(state)
    mb = sum(x.size * x.dtype.itemsize for x in leaves) / 2**20
    med = statistics.median
    print(f"machine     {platform.machine()} {os.cpu_count()} CPUs, {jax.device_count()} {jax.default_backend()} "
          f"device(s); jax {jax.__version__}; {hostmem.describe()}")
    print(f"config      d_model {a.d_model}, d_sae {a.d_sae}, batch {a.batch}; state {mb:.0f} MiB in {len(leaves)} "
          f"leaves")
    print(f"step        {med(step_s) * 1e3:8.1f} ms  (median of {len(step_s)})")
    print(f"save blocks {med(save_s) * 1e3:8.1f} ms  (median of {len(save_s)}; = "
          f"{med(save_s) / med(step_s):.1%} of a step)")
    print(f"step after  {med(after_s) * 1e3:8.1f} ms  (median of {len(after_s)}: a step during the background "
          "write)")
    print(f"write       {write_s * 1e3:8.1f} ms  (a last save, {last_save_s * 1e3:.0f} ms blocking, then wait at "
          "once: what a synchronous save would add)")
    print(f"digest      {med(digest_s) * 1e3:8.1f} ms  (median of {len(digest_s)}, on its own; part of 'save blocks', "
          "since orbax takes the digests with the state)")
    if not a.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

"""K SAEs in one sweep (one data stream, one vmapped step) against K sequential single runs, in one run.

    python bench/bench_sweep.py --members 8 --steps 300 --d-model 64 --d-sae 512

Makes a synthetic store (or uses --store), then trains the same K configs (K sparsity
coefficients, log-spaced) twice:
  sweep:      `sae_jax.train.sweep.sweep` — every member stacked, one jitted step per batch (vmapped
              over --vmap-size members at a time; 0 = auto);
  sequential: `sae_jax.train.loop.train` once per member, one after another in this process
              (each compiles its own step; separate jobs would also pay K interpreter starts).
Prints, for each: total wall time (compile, train, save, held-out eval), the training-loop wall
time (train_seconds of the summaries), tokens delivered by the data loaders (train + eval
rows), and bytes read through system calls (/proc/self/io rchar, page-cache hits included;
Linux only) as tokens of the store's row size; then the ratios and the machine. The members
of both are checked to agree (max |FVU difference|).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from sae_jax import config as config_lib  # noqa: E402
from sae_jax import hostmem  # noqa: E402
from sae_jax.data import store as store_lib  # noqa: E402
from sae_jax.data.synthetic import SynthSpec, write_synthetic  # noqa: E402
from sae_jax.eval.report import plot_pareto, write_report  # noqa: E402
from sae_jax.train.loop import train  # noqa: E402
from sae_jax.train.sweep import sweep  # noqa: E402


def rchar() -> int | None:
    """Bytes this process has read through read()/pread() so far (None where /proc/self/io is missing)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn) -> dict:
    """Wall seconds and syscall-read bytes of fn(); its result under 'result'."""
    before, t = rchar(), time.perf_counter()
    result = fn()
    wall, after = time.perf_counter() - t, rchar()
    return {"wall": wall, "read_bytes": None if before is None else after - before, "result": result}


def overrides(args, store: Path, workdir: Path) -> list[str]:
    return [f"data.store={store}", f"train.workdir={workdir}", f"model.architecture={args.architecture}",
            f"model.d_sae={args.d_sae}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.eval_tokens={args.eval_tokens}", "train.progress=false", f"train.log_every={args.steps}"]


def coefficients(k: int) -> list[float]:
    """K log-spaced sparsity coefficients (for L1 at E||x||^2 = 1)."""
    return [float(f"{c:.3g}") for c in np.geomspace(0.01, 1.0, k)]


def run_sweep(args, store: Path, root: Path) -> dict:
    """The sweep, less the syscall reads of drawing its report (matplotlib rereads its font files on every
    savefig), measured by drawing it once more."""
    grid = "sweep.sparsity.coefficient=[" + ",".join(map(str, coefficients(args.members))) + "]"
    cfg = config_lib.load_config(None, [*overrides(args, store, root / "sweep"), grid,
                                        f"sweep.vmap_size={args.vmap_size}"], resolve_recipe=False)
    m = measure(lambda: sweep(cfg))
    drawing = measure(lambda: write_report([root / "sweep"], root / "sweep"))
    if m["read_bytes"] is not None:
        m["read_bytes"] -= drawing["read_bytes"]
    return m


def run_sequential(args, store: Path, root: Path) -> dict:
    def runs():
        out = {}
        for c in coefficients(args.members):
            cfg = config_lib.load_config(None, [*overrides(args, store, root / f"single-{c}"),
                                                f"sparsity.coefficient={c}"])
            out[f"coefficient-{c!r}"] = train(cfg)
        return out

    return measure(runs)


def report(name: str, m: dict, row_bytes: int, eval_tokens: int, sweep_mode: bool) -> dict:
    summaries = list(m["result"].values())
    train_tokens = summaries[0]["train_tokens"] * (1 if sweep_mode else len(summaries))
    loaded = train_tokens + eval_tokens * len(summaries)
    loop_wall = summaries[0]["train_seconds"] if sweep_mode else sum(s["train_seconds"] for s in summaries)
    row = {"mode": name, "wall_s": m["wall"], "train_loop_s": loop_wall, "loader_tokens": loaded,
           "syscall_read_tokens": None if m["read_bytes"] is None else m["read_bytes"] / row_bytes}
    print(f"{name:<10} wall {m['wall']:8.1f} s   train loop {loop_wall:8.1f} s   loader tokens {loaded:>12,}   "
          f"read via syscalls {row['syscall_read_tokens'] or float('nan'):>14,.0f} tokens")
    return row


def main() -> None:
    hostmem.reexec_with_hugepages()  # as the sae-jax command runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=8, help="K: sweep members = sequential runs")
    p.add_argument("--architecture", default="relu")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=262144, help="rows of the synthetic store")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--vmap-size", type=int, default=0, help="sweep.vmap_size (0 = auto: 1 on CPU, K elsewhere)")
    p.add_argument("--store", help="use this store instead of making a synthetic one")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        root = Path(tmp)
        store_path = Path(args.store) if args.store else root / "store"
        if not args.store:
            write_synthetic(store_path, SynthSpec(d_model=args.d_model, n_features=4 * args.d_model,
                                                  n_tokens=args.tokens, seed=0))
        store = store_lib.open_store(store_path)
        row_bytes = store.d_model * {"float32": 4, "bfloat16": 2}[store.dtype]
        # Import and draw once first: loading matplotlib would count as reads of the sweep.
        plot_pareto([{"l0": 1.0, "fvu": 0.5, "architecture": "warm-up", "pareto": True}], root / "warm.png")
        # The sequential runs go first, so the sweep is not the one that warms the page cache.
        seq = run_sequential(args, store_path, root)
        swp = run_sweep(args, store_path, root)
        eval_tokens = summaries_eval(seq)
        rows = [report("sequential", seq, row_bytes, eval_tokens, False),
                report("sweep", swp, row_bytes, eval_tokens, True)]
        diff = max(abs(seq["result"][k]["fvu"] - swp["result"][k]["fvu"]) for k in swp["result"])
    speed = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"K={args.members} {args.architecture} d_model={store.d_model} d_sae={args.d_sae} steps={args.steps} "
          f"batch={args.batch_size} sweep.vmap_size={args.vmap_size}: sweep is {speed:.2f}x faster in wall time "
          f"({rows[0]['train_loop_s'] / rows[1]['train_loop_s']:.2f}x in the training loop), reads "
          f"{rows[0]['loader_tokens'] / rows[1]['loader_tokens']:.2f}x fewer loader tokens; max |FVU sweep - "
          f"sequential| = {diff:.2e}")
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, {hostmem.describe()}")
    print("machine:", machine)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "machine": machine}, indent=2))


def summaries_eval(m: dict) -> int:
    """Held-out tokens each evaluation read (the eval split may be shorter than --eval-tokens)."""
    return next(iter(m["result"].values()))["tokens"]


if __name__ == "__main__":
    main()

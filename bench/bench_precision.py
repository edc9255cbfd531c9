"""Train-step speed with train.compute_dtype=bfloat16 against float32, interleaved in one run.

    python bench/bench_precision.py [--d-model 768 --d-sae 16384 --batch 4096 --rounds 5]
                                    [--archs relu,topk] [--moment-dtype float32]

For each architecture both steps (the library's ``make_train_step``, state donated, as the
loop runs it) are compiled, then timed in alternating rounds (float32 step, bfloat16 step, ...)
so a shared machine's load falls on both alike; each round's time is the median of
``--steps`` steps after a warm-up. Prints the median tokens/s of each and their ratio, and the
machine (``bench_arch.machine``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_arch import machine, timed  # noqa: E402

from sae_jax.config import load_config, with_d_model  # noqa: E402
from sae_jax.models import make_sae  # noqa: E402
from sae_jax.train import step as step_lib  # noqa: E402
from sae_jax.train.state import init_state  # noqa: E402


def make_step(arch: str, d: int, m: int, b: int, compute_dtype: str, moment_dtype: str):
    """One jitted, donating step for ``arch`` and a closure that runs it once."""
    cfg = with_d_model(load_config(None, [f"model.architecture={arch}", f"model.d_sae={m}",
                                          f"optim.moment_dtype={moment_dtype}"]), d)
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    tx = step_lib.make_optimizer(cfg.optim)
    box = [init_state(sae, tx, jax.random.key(0), None, cfg.optim.lr, cfg.sparsity.coefficient)]
    fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 100), step_lib.coefficient_factor(1),
                                          compute_dtype=compute_dtype), donate_argnums=0)
    x = jax.random.normal(jax.random.key(2), (b, d))

    def one():
        box[0], metrics = fn(box[0], x)
        return metrics["loss"]

    return one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--archs", default="relu,topk")
    p.add_argument("--moment-dtype", default="float32")
    a = p.parse_args()
    print(f"machine: {machine()}")
    print(f"shapes: B {a.batch}, d {a.d_model}, m {a.d_sae}; {a.rounds} interleaved rounds of {a.steps} steps")
    print("| arch | float32 tokens/s | bfloat16 tokens/s | bfloat16 / float32 |")
    print("| --- | ---: | ---: | ---: |")
    for arch in a.archs.split(","):
        steps = {dt: make_step(arch, a.d_model, a.d_sae, a.batch, dt, a.moment_dtype)
                 for dt in ("float32", "bfloat16")}
        rates = {dt: [] for dt in steps}
        for _ in range(a.rounds):
            for dt, one in steps.items():
                rates[dt].append(a.batch / timed(one, a.steps))
        f32, bf16 = statistics.median(rates["float32"]), statistics.median(rates["bfloat16"])
        print(f"| {arch} | {f32:,.0f} | {bf16:,.0f} | {bf16 / f32:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

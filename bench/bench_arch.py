"""Train-step throughput per architecture against the machine's dense matmul bound.

    python bench/bench_arch.py [--d-model 768 --d-sae 16384 --batch 4096 --steps 3] [--saelens]

A dense step costs about 10·B·d·m FLOPs (2 encoder forward, 2 decoder forward, 4 decoder
backward, 2 encoder weight gradient). The bound is measured in the same run as the
throughput of one [B, d] x [d, m] float32 matmul in XLA. With --saelens (sae-lens and
torch installed) SAELens's own training step is timed for the same shapes. Runs unchanged
on CPU or GPU. Prints medians and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax

from sae_jax.config import load_config, with_d_model
from sae_jax.models.sae import make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state

ARCHS = ("relu", "gated", "jumprelu", "topk", "batchtopk", "prolu")


def timed(fn, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(b: int, d: int, m: int, steps: int) -> float:
    """FLOP/s of a jitted [b, d] @ [d, m] float32 matmul."""
    x = jax.random.normal(jax.random.key(0), (b, d))
    w = jax.random.normal(jax.random.key(1), (d, m))
    f = jax.jit(lambda x, w: x @ w)
    return 2 * b * d * m / timed(lambda: f(x, w), steps)


def sae_tokens_per_s(arch: str, b: int, d: int, m: int, steps: int, extra=()) -> float:
    cfg = with_d_model(load_config(None, [f"model.architecture={arch}", f"model.d_sae={m}", *extra]), d)
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    tx = step_lib.optimizer(cfg.optim.beta1, cfg.optim.beta2, cfg.optim.grad_clip)
    fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 100), step_lib.coefficient_factor(1)),
                 donate_argnums=0)
    x = jax.random.normal(jax.random.key(2), (b, d))
    box = [init_state(sae, tx, jax.random.key(0), None, cfg.optim.lr, cfg.sparsity.coefficient)]

    def one():
        box[0], metrics = fn(box[0], x)
        return metrics["loss"]

    return b / timed(one, steps)


def saelens_tokens_per_s(arch: str, b: int, d: int, m: int, steps: int) -> float | None:
    """SAELens's training_forward_pass + backward + Adam step, CPU threads as available."""
    try:
        import torch
        from sae_lens import (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig,
            GatedTrainingSAE,
            GatedTrainingSAEConfig,
            JumpReLUTrainingSAE,
            JumpReLUTrainingSAEConfig,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
            TopKTrainingSAE,
            TopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    classes = {"relu": (StandardTrainingSAE, StandardTrainingSAEConfig),
               "gated": (GatedTrainingSAE, GatedTrainingSAEConfig),
               "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
               "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
               "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}
    if arch not in classes:
        return None
    cls, cfg_cls = classes[arch]
    sae = cls(cfg_cls(d_in=d, d_sae=m, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(b, d)
    dead = torch.zeros(m, dtype=torch.bool)

    def one():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 1.0, "l0": 1.0},
                                                       dead_neuron_mask=dead, n_training_steps=0,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return b / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--saelens", action="store_true", help="also time SAELens's step (needs sae-lens)")
    a = p.parse_args()
    b, d, m = a.batch, a.d_model, a.d_sae
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    bound = matmul_flops(b, d, m, a.steps)
    bound_tps = bound / (10 * b * d * m) * b
    print(f"shape B={b} d={d} m={m} float32; dense matmul {bound / 1e9:.1f} GFLOP/s "
          f"-> FLOP bound {bound_tps:,.0f} tokens/s at 10·B·d·m")
    print(f"{'arch':<10} {'tokens/s':>10} {'of bound':>9} {'SAELens':>9} {'ratio':>6}")
    for arch in a.archs.split(","):
        tps = sae_tokens_per_s(arch, b, d, m, a.steps)
        ref = saelens_tokens_per_s(arch, b, d, m, a.steps) if a.saelens else None
        ratio = f"{tps / ref:5.2f}x" if ref else "   -"
        print(f"{arch:<10} {tps:>10,.0f} {tps / bound_tps:>8.0%} {ref or 0:>9,.0f} {ratio:>6}", flush=True)
        if arch in ("topk", "batchtopk"):
            dense = sae_tokens_per_s("relu", b, d, m, a.steps, ["sparsity.coefficient=0.0"])
            print(f"{'':<10} same model with a dense decoder (relu step): {dense:,.0f} tokens/s; "
                  f"sparse/dense {tps / dense:.2f}x", flush=True)


if __name__ == "__main__":
    main()

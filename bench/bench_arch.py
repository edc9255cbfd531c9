"""Train-step throughput per architecture against the machine's dense matmul bound (and SAELens).

    python bench/bench_arch.py [--d-model 768 --d-sae 16384 --batch 4096 --steps 3] [--saelens]
                               [--archs relu,gated,jumprelu,topk,topk+auxk,batchtopk,prolu]

A dense step costs 10·B·d·m FLOPs: 2 encoder forward, 2 decoder forward, 4 decoder backward
and 2 for the encoder's weight gradient (b_dec's gradient comes from −W_enc Σ_b δ_b, so the
[B, d] input cotangent is never formed). Gated adds its aux decoder forward and backward
(14·B·d·m). The bound is the FLOP/s of one jitted [B, d] x [d, m] float32 matmul, measured
right before each architecture (the machine may be shared: each row is compared with its own
neighbour), and "of bound" is tokens/s over bound / (10·d·m). TopK and BatchTopK rows also
time the same model with a dense decoder and dense encoder backward (``DenseTopK``), the
sparse/dense ratio being the speed-up of the sparse paths. ``topk+auxk`` and
``batchtopk+auxk`` hold half the latents dead every step, so AuxK runs. With ``--saelens``
(sae-lens and torch installed) SAELens's own training step (training_forward_pass, firing
statistics, backward, grad-norm clip, Adam: ``SAETrainer._train_step``) is timed on the same
shapes and k; ProLU, which SAELens lacks, is compared with its standard SAE (same FLOPs).
Medians over ``--steps`` steps after one warm-up step. Runs unchanged on CPU and GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from sae_jax import hostmem
from sae_jax.config import load_config, with_d_model
from sae_jax.models import activations as act
from sae_jax.models import make_sae, registry
from sae_jax.models.batchtopk import BatchTopKSAE
from sae_jax.models.matryoshka import default_widths
from sae_jax.models.sae import Output, abstract, normalized_mse
from sae_jax.models.topk import TopKSAE
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state

ARCHS = tuple(registry()) + ("topk+auxk", "batchtopk+auxk")  # +auxk: half the latents held dead
SPARSE = tuple(n for n, cls in registry().items() if cls.uses_k)  # one dense matmul per step: no FLOP bound
FLOPS_PER_BDM = {"gated": 14}  # dense matmul FLOPs per B·d·m of one step; 10 for the other dense archs
SAELENS = {"relu": "standard", "gated": "gated", "jumprelu": "jumprelu", "topk": "topk",
           "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}


class DenseTopKMixin:
    """The same TopK / BatchTopK model with a dense B·m·d decoder and dense encoder backward."""

    def forward(self, x):
        pre = self.pre_acts(x)
        if self.batch_select:
            kept, _ = act.batch_topk_select(pre, self.k, self.latent_groups)
        else:
            values, idx = act.topk_select(pre, self.k, self.latent_groups)
            kept = act.densify(values, idx, self.d_sae)
        f = jnp.where(jax.lax.stop_gradient(kept != 0), jax.nn.relu(pre), 0.0)
        x_hat = f @ self.W_dec[...] + self.b_dec[...]
        extras = {"min_kept": jnp.min(jnp.where(kept > 0, kept, jnp.inf))} if self.batch_select else {}
        zero = jnp.zeros(())
        return Output(x_hat, jax.lax.stop_gradient(f), normalized_mse(x, x_hat), zero, zero, extras)


class DenseTopK(DenseTopKMixin, TopKSAE):
    """TopK decoded densely (the reference for the sparse speed-up)."""


class DenseBatchTopK(DenseTopKMixin, BatchTopKSAE):
    """BatchTopK decoded densely."""


def machine() -> str:
    """Platform, CPU model and count, JAX version, backend and devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    devices = jax.devices()
    return (f"{platform.platform()}; {cpu}, {os.cpu_count()} CPUs; jax {jax.__version__}, backend "
            f"{jax.default_backend()}, {len(devices)} x {devices[0].device_kind}; {hostmem.describe()}")


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


def build(arch: str, d: int, m: int, dense: bool = False):
    """The architecture with its recipe defaults (k = 32, k_aux = d/2), optimizer and state."""
    name = arch.split("+")[0]
    cfg = with_d_model(load_config(None, [f"model.architecture={name}", f"model.d_sae={m}"]), d)
    sae = make_sae(cfg.model, cfg.sparsity.penalty)
    if dense:
        cls = DenseBatchTopK if name == "batchtopk" else DenseTopK
        sae = abstract(cls, sae.d_model, sae.d_sae, **sae.hyperparameters())
    tx = step_lib.optimizer(cfg.optim.beta1, cfg.optim.beta2, cfg.optim.grad_clip)
    state = init_state(sae, tx, jax.random.key(0), None, cfg.optim.lr, cfg.sparsity.coefficient)
    return sae, tx, state


def tokens_per_s(arch: str, b: int, d: int, m: int, steps: int, dense: bool = False) -> float:
    """Tokens/s of the library's jitted train step (state donated, as the loop runs it)."""
    sae, tx, state = build(arch, d, m, dense)
    fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 100), step_lib.coefficient_factor(1)),
                 donate_argnums=0)
    x = jax.random.normal(jax.random.key(2), (b, d))
    dead = half_dead(sae) if arch.endswith("+auxk") else None
    box = [state]

    def one():
        if dead is not None:  # hold half the latents dead, so AuxK runs every step
            box[0] = box[0].replace(stats=dict(box[0].stats, tokens_since_fired=dead + 0))
        box[0], metrics = fn(box[0], x)
        return metrics["loss"]

    return b / timed(one, steps)


def half_dead(sae) -> jax.Array:
    """tokens_since_fired with the upper half of the latents past the dead window."""
    return jnp.where(jnp.arange(sae.d_sae) >= sae.d_sae // 2, sae.dead_tokens, 0).astype(jnp.int32)


def saelens_tokens_per_s(arch: str, b: int, d: int, m: int, steps: int) -> float | None:
    """Tokens/s of SAELens's training step on the same shapes (None where it has no such SAE)."""
    try:
        import sae_lens.saes as saes
        import torch
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    name = SAELENS.get(arch.split("+")[0], "standard")  # SAELens lacks it: the dense SAE of the same FLOPs
    if name is None:
        return None
    prefix = {"standard": "Standard", "gated": "Gated", "jumprelu": "JumpReLU", "topk": "TopK",
              "batchtopk": "BatchTopK", "matryoshka_batchtopk": "MatryoshkaBatchTopK"}[name]
    cls, cfg_cls = getattr(saes, f"{prefix}TrainingSAE"), getattr(saes, f"{prefix}TrainingSAEConfig")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"k": 32} if name in ("topk", "batchtopk", "matryoshka_batchtopk") else {}
    if name == "matryoshka_batchtopk":
        extra["matryoshka_widths"] = list(default_widths(m))
    sae = cls(cfg_cls(d_in=d, d_sae=m, dtype="float32", device=device, **extra))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(b, d, device=device)
    dead = torch.arange(m, device=device) >= (m // 2 if arch.endswith("+auxk") else m)

    def one():  # sae_lens.training.sae_trainer.SAETrainer._train_step
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 1.0, "l0": 1.0},
                                                       dead_neuron_mask=dead, n_training_steps=0,
                                                       is_logging_step=False))
        with torch.no_grad():
            out.feature_acts.bool().float().sum(-2).bool()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return b / statistics.median(times)


def saelens_version() -> str:
    try:
        import sae_lens
        import torch
    except ImportError:
        return "not installed"
    return f"sae-lens {sae_lens.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    hostmem.reexec_with_hugepages()  # as the sae-jax command runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--saelens", action="store_true", help="also time SAELens's step (needs sae-lens)")
    a = p.parse_args()
    b, d, m = a.batch, a.d_model, a.d_sae
    unknown = [x for x in a.archs.split(",") if x.split("+")[0] not in registry()]
    if unknown:
        raise SystemExit(f"--archs: unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}.")
    print(f"machine: {machine()}")
    if a.saelens:
        print(f"SAELens: {saelens_version()}")
    print(f"shape B={b} d={d} m={m} float32, median of {a.steps} steps; bound = one [B,d]x[d,m] matmul's FLOP/s, "
          "measured before each row, / (10·B·d·m)")
    print(f"{'arch':<15} {'tokens/s':>9} {'matmul':>11} {'bound':>9} {'of bound':>8} {'SAELens':>8} {'ratio':>6}  "
          "dense decoder")
    for arch in a.archs.split(","):
        flops = matmul_flops(b, d, m, a.steps)
        bound = flops / (10 * d * m)
        tps = tokens_per_s(arch, b, d, m, a.steps)
        ref = saelens_tokens_per_s(arch, b, d, m, a.steps) if a.saelens else None
        own = FLOPS_PER_BDM.get(arch, 10) if arch.split("+")[0] not in SPARSE else None
        note = f"({tps * own * d * m / flops:.0%} of its {own}·B·d·m)" if own and own != 10 else ""
        if arch.split("+")[0] in ("topk", "batchtopk") and not arch.endswith("+auxk"):
            dense = tokens_per_s(arch, b, d, m, a.steps, dense=True)
            note = f"{dense:,.0f} tokens/s; sparse/dense {tps / dense:.2f}x"
        ratio = f"{tps / ref:5.2f}x" if ref else "    -"
        print(f"{arch:<15} {tps:>9,.0f} {flops / 1e9:>6.1f} GF/s {bound:>9,.0f} {tps / bound:>8.0%} "
              f"{ref or 0:>8,.0f} {ratio:>6}  {note}", flush=True)


if __name__ == "__main__":
    main()

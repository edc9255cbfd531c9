"""Harvest throughput of SmolLM2-135M up to one layer: the JAX Llama against torch, in one run.

    python bench/bench_harvest.py --layer 15 --batch 8 --seq 128 --repeats 5

JAX: sae_jax.lm.gguf_source() (GGUF dequantized to float32), activations at
blocks.{layer}.hook_resid_post, which stops after that layer. torch (when torch and
transformers are installed): transformers' own GGUF loader, float32, run through
sae_jax.lm.hf_adapter with the same hook (it also stops after that layer). Both see the
same random tokens; the first call of each is a warm-up (compilation). Prints the median
tokens/s of each, the ratio JAX / torch, and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sae_jax import hostmem  # noqa: E402
from sae_jax.lm import find_smollm2_gguf, gguf_source, hook_name  # noqa: E402


def tokens_per_second(run, tokens: np.ndarray, repeats: int) -> float:
    """Median tokens/s of ``run(tokens)`` over ``repeats`` timed calls after one warm-up."""
    run(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(tokens)
        times.append(time.perf_counter() - start)
    return tokens.size / statistics.median(times)


def jax_runner(hook: str):
    """A blocking JAX harvest call for ``hook``."""
    import jax

    source = gguf_source()
    return lambda tokens: jax.block_until_ready(source(tokens, [hook]))


def torch_runner(hook: str):
    """A torch harvest call for ``hook``, or None without torch/transformers."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers

    from sae_jax.lm.hf_adapter import hf_source

    path = find_smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    source = hf_source(model, name="smollm2-torch")
    return lambda tokens: source(tokens, [hook])


def machine() -> str:
    """CPU, core count and accelerator in one line."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    backend = f"jax backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
    return f"{cpu}, {os.cpu_count()} cores, {backend}, {hostmem.describe()}"


def main() -> None:
    """Parse arguments, time both sources, print the comparison."""
    hostmem.reexec_with_hugepages()  # as the sae-jax command runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hook = hook_name(args.layer, "resid_post")
    tokens = np.random.default_rng(0).integers(17, 49152, (args.batch, args.seq)).astype(np.int32)
    print(f"machine: {machine()}")
    print(f"hook {hook}, tokens {args.batch}x{args.seq}, median of {args.repeats}")
    jax_tps = tokens_per_second(jax_runner(hook), tokens, args.repeats)
    print(f"jax:   {jax_tps:9.0f} tokens/s")
    run = torch_runner(hook)
    if run is None:
        print("torch: not installed")
        return
    import torch

    torch_tps = tokens_per_second(run, tokens, args.repeats)
    print(f"torch: {torch_tps:9.0f} tokens/s  ({torch.get_num_threads()} threads)")
    print(f"ratio jax/torch: {jax_tps / torch_tps:.2f}")


if __name__ == "__main__":
    main()

"""bench_arch before against after: one run, both trees, interleaved, on this machine.

    python bench/bench_before_after.py --before REV [--rounds 3] [--d-model 512 --d-sae 8192 --batch 2048]
                                       [--archs relu,gated,...]

Checks out REV (a commit, e.g. the one before a refactor) into a temporary git worktree and, for
every architecture, runs each tree's own ``bench/bench_arch.py`` on the same shapes, alternating
before/after for ``--rounds`` rounds (so both see the same machine load), and prints the median
tokens/s of each and their ratio. It also compares the optimized HLO of the two train steps: where
it is the same program, any difference in speed is noise.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HLO_SNIPPET = r"""
import hashlib, re, sys
import jax
from sae_jax.config import load_config, with_d_model
try:
    from sae_jax.models import make_sae
except ImportError:
    from sae_jax.models.sae import make_sae
from sae_jax.train import step as step_lib
from sae_jax.train.state import init_state
arch, b, d, m = sys.argv[1], *map(int, sys.argv[2:5])
cfg = with_d_model(load_config(None, [f"model.architecture={arch}", f"model.d_sae={m}"]), d)
sae = make_sae(cfg.model, cfg.sparsity.penalty)
tx = step_lib.optimizer(cfg.optim.beta1, cfg.optim.beta2, cfg.optim.grad_clip)
state = init_state(sae, tx, jax.random.key(0), None, cfg.optim.lr, cfg.sparsity.coefficient)
state = state.replace(**{f: None for f in ("rng",) if hasattr(state, f)})
fn = jax.jit(step_lib.make_train_step(sae, tx, step_lib.lr_factor(1, 100), step_lib.coefficient_factor(1)))
hlo = fn.lower(state, jax.numpy.zeros((b, d))).compile().as_text()
ops = [line.split("=", 1)[1].split("(")[0].strip() for line in hlo.splitlines() if " = " in line and "ROOT" not in line]
print("HLO", hashlib.sha256("\n".join(sorted(ops)).encode()).hexdigest()[:12], len(ops))
"""


def tokens_per_s(tree: Path, arch: str, shape: list[str], steps: int) -> float:
    """The tokens/s bench_arch.py of ``tree`` reports for ``arch``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "bench/bench_arch.py", "--archs", arch, "--steps", str(steps), *shape],
                         cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == arch)
    return float(row.split()[1].replace(",", ""))


def hlo_signature(tree: Path, arch: str, b: int, d: int, m: int) -> str:
    """A digest of the compiled step's HLO op shapes (names stripped) and its op count."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", HLO_SNIPPET, arch.split("+")[0], str(b), str(d), str(m)], cwd=tree,
                         env=env, capture_output=True, text=True, check=True).stdout
    return re.search(r"HLO (\S+ \d+)", out).group(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the git revision to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--archs", default=None, help="default: every architecture of this tree, and topk/batchtopk +auxk")
    a = p.parse_args()
    if a.archs is None:
        from sae_jax.models import registry

        a.archs = ",".join([*registry(), "topk+auxk", "batchtopk+auxk"])
    shape = ["--d-model", str(a.d_model), "--d-sae", str(a.d_sae), "--batch", str(a.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), a.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            machine = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['x']; import bench.bench_arch as b;"
                                      " print(b.machine())"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     capture_output=True, text=True).stdout.strip()
            print(f"machine: {machine}\nbefore {a.before} against after (this tree), B={a.batch} d={a.d_model} "
                  f"m={a.d_sae}, median of {a.rounds} interleaved rounds of bench_arch.py --steps {a.steps}")
            print(f"{'arch':<15} {'before':>10} {'after':>10} {'after/before':>12}  same HLO")
            for arch in a.archs.split(","):
                runs = {"before": [], "after": []}
                for _ in range(a.rounds):
                    runs["before"].append(tokens_per_s(before, arch, shape, a.steps))
                    runs["after"].append(tokens_per_s(ROOT, arch, shape, a.steps))
                old, new = statistics.median(runs["before"]), statistics.median(runs["after"])
                same = hlo_signature(before, arch, a.batch, a.d_model, a.d_sae) == \
                    hlo_signature(ROOT, arch, a.batch, a.d_model, a.d_sae)
                print(f"{arch:<15} {old:>10,.0f} {new:>10,.0f} {new / old:>12.3f}  {'yes' if same else 'NO'}",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()

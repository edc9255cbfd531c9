"""`sae-jax synth`: write a synthetic store with known ground-truth features"""

from __future__ import annotations

from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "synth", run, __doc__, parents=[parents.restart])
    p.add_argument("out", help="output store directory")
    p.add_argument("--d-model", type=int, default=128, help="activation width D")
    p.add_argument("--n-features", type=int, default=512, help="number of true features F (> D)")
    p.add_argument("--n-tokens", type=int, default=1_000_000, help="number of rows N")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same store)")
    p.add_argument("--l0", type=float, default=8.0, help="expected active true features per token")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")


def run(args) -> int:
    from sae_jax.data.synthetic import SynthSpec, write_synthetic
    from sae_jax.io import layout

    spec = SynthSpec(d_model=args.d_model, n_features=args.n_features, n_tokens=args.n_tokens, seed=args.seed,
                     l0=args.l0, dtype=args.dtype)
    store = write_synthetic(args.out, spec, resume=args.resume, overwrite=args.overwrite)
    print(f"wrote {store.n_tokens:,} × {store.d_model} {store.dtype} activations with {args.n_features} true "
          f"features to {args.out} (ground truth: {Path(args.out) / layout.GROUND_TRUTH})")
    return 0

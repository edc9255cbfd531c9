"""`sae-jax import`: import a SAELens folder or a Gemma Scope params.npz as a work directory

Convert a SAELens folder or a Gemma Scope params.npz into OUT/sae/ (for eval and the Python API) and
OUT/config.yaml with model.init_from set, so `sae-jax train OUT/config.yaml data.store=STORE` continues
training it.
"""

from __future__ import annotations

from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "import", run, __doc__)
    p.add_argument("src", help="SAELens folder (cfg.json + sae_weights.safetensors) or Gemma Scope params.npz")
    p.add_argument("--out", required=True, help="new work directory")
    p.add_argument("--member", default=None, help="which SAE, when SRC holds several")


def run(args) -> int:
    from sae_jax.io import layout, loader

    folder, model = loader.import_sae(args.src, args.out, member=args.member)
    print(f"imported a {model.sae.name} SAE (d_model={model.sae.d_model}, d_sae={model.sae.d_sae}) into {folder}\n"
          f"evaluate: sae-jax eval {args.out} --data STORE\n"
          f"continue training: sae-jax train {Path(args.out) / layout.CONFIG} data.store=STORE")
    return 0

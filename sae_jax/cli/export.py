"""`sae-jax export`: write trained SAEs as SAELens folders (cfg.json + sae_weights.safetensors)

Export every trained SAE under WORKDIR (a run, or each member of a sweep) in the layout SAELens's
SAE.load_from_disk reads, normalization and decoder norms folded in so it works on raw activations. See
sae_jax/io/saelens.py.
"""

from __future__ import annotations

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "export", run, __doc__)
    p.add_argument("workdir", help="work directory of `sae-jax train` or `sae-jax sweep` (or an sae/ folder)")
    p.add_argument("--format", default="saelens", choices=["saelens"], help="output format")
    p.add_argument("--out", required=True, help="output folder (one subfolder per SAE when there are several)")
    p.add_argument("--model-name", default="", help="cfg.json metadata.model_name (e.g. for Neuronpedia)")
    p.add_argument("--hook-name", default="", help="cfg.json metadata.hook_name, e.g. blocks.12.hook_resid_post")


def run(args) -> int:
    from sae_jax.io import saelens

    metadata = {"model_name": args.model_name, "hook_name": args.hook_name}
    for e in saelens.export_workdir(args.workdir, args.out, metadata):
        notes = f"; {'; '.join(e.notes)}" if e.notes else ""
        print(f"wrote {e.path} ({e.architecture} as SAELens {e.saelens_architecture}{notes})")
    return 0

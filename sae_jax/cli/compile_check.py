"""`sae-jax compile-check`: compile the train step for a mesh from shapes: memory and FLOPs per device

Lower and compile one train step for a DATAxMODEL mesh from abstract shapes (no data, no parameters), then
print per-device memory (parameters, optimizer, batch, activations) and FLOPs. A mesh larger than this
machine is compiled on fake CPU devices. Exit status 1 if the step does not fit --device-memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "compile-check", run, __doc__, parents=[
        parents.config("YAML config file (model.d_model, or a data.store to take it from)")])
    p.add_argument("--mesh", help="DATAxMODEL, e.g. 4x8 (default: the config's mesh.data/mesh.model over the "
                   "devices here)")
    p.add_argument("--device-memory", help="memory per device, e.g. 16GiB or 80GB: say whether the step fits")
    p.add_argument("--json", help="also write the report to this JSON file")


def run(args) -> int:
    from sae_jax import config as config_lib
    from sae_jax.train import aot

    data, model = aot.parse_mesh(args.mesh) if args.mesh else (None, None)
    device_memory = aot.parse_bytes(args.device_memory) if args.device_memory else None
    report = aot.compile_check(config_lib.load_config(args.config, args.overrides), data, model)
    print(report.table(device_memory))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report) | {"peak": report.peak}, indent=2))
    return 0 if device_memory is None or report.fits(device_memory) else 1

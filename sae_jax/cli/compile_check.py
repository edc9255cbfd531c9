"""`sae-jax compile-check`: compile the train step for a mesh from shapes: memory and FLOPs per device

Lower and compile one train step for a DATAxMODEL mesh from abstract shapes (no data, no parameters), then
print per-device memory (parameters, optimizer, batch, activations) and FLOPs; per process (--processes), the
input bytes of each step; per step, the bytes moved by collectives (from the compiled HLO), and how many of
them cross processes. --step-time gives the read and collective rates one step every S seconds needs. A mesh
larger than this machine is compiled on fake CPU devices. Exit status 1 if the step does not fit
--device-memory.
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
    p.add_argument("--processes", type=int, default=1, help="processes (hosts) the mesh's devices are split "
                   "over, each holding the same number (default: 1)")
    p.add_argument("--step-time", type=float, help="seconds per step: print the read rate each process must "
                   "sustain and the collective bandwidth per device")
    p.add_argument("--json", help="also write the report to this JSON file")


def run(args) -> int:
    from sae_jax import config as config_lib
    from sae_jax.train import aot

    data, model = aot.parse_mesh(args.mesh) if args.mesh else (None, None)
    device_memory = aot.parse_bytes(args.device_memory) if args.device_memory else None
    if args.step_time is not None and not args.step_time > 0:
        raise ValueError(f"--step-time {args.step_time} must be a positive number of seconds, e.g. --step-time 0.5.")
    report = aot.compile_check(config_lib.load_config(args.config, args.overrides), data, model, args.processes)
    print(report.table(device_memory, args.step_time))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report) | {"peak": report.peak}, indent=2))
    return 0 if device_memory is None or report.fits(device_memory) else 1

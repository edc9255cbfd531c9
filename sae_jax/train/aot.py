"""Ahead-of-time check of a training step for a target mesh: memory per device and FLOPs.

``compile_check(cfg, data, model)`` lowers and compiles the loop's own step (``loop.compile_step``:
the same shardings, donation and two-stage top-k) from abstract shapes only: no store is read,
no parameter is allocated. It reports what one device holds (parameters, optimizer state,
statistics, its share of the batch), the compiler's scratch for activations and gradients, and
the FLOPs of one step, and says whether that fits ``device_memory``.

A mesh with more devices than this process has is compiled on fake CPU devices in a
subprocess (``--xla_force_host_platform_device_count``). The state and batch bytes are exact
for any backend (they follow from shapes and shardings); the activation scratch and FLOPs are
then the CPU compiler's, an estimate for a GPU or TPU, whose compilers fuse differently.

How far the figures are to be trusted (peak = arguments + temp + outputs not donated):
on one CPU device the measured step (live arrays + rise of the process's peak resident set)
was 7-10% above it for ReLU, TopK and JumpReLU at d 64, m 4096, batch 4096
(tests/test_sharding.py checks 20%); on one H200 (jax 0.11.2, autotuning off) the GPU
compiler's peak equalled the allocator's ``peak_bytes_in_use`` to within 100 bytes for ReLU
(d 1024, m 32768, batch 16384: 5.0 GiB) and TopK (batch 8192: 9.1 GiB). GPU autotuning,
when on, allocates scratch during compilation that this does not count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sae_jax import config as config_lib
from sae_jax.io import layout

_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_mesh(text: str) -> tuple[int, int]:
    """'2x4' -> (data, model) = (2, 4); -1 is allowed for one of them ("the rest")."""
    match = re.fullmatch(r"\s*(-1|\d+)\s*[x×,]\s*(-1|\d+)\s*", text)
    if not match or "0" in (match[1], match[2]):
        raise ValueError(f"--mesh '{text}' must look like DATAxMODEL with positive sizes, e.g. --mesh 2x4.")
    return int(match[1]), int(match[2])


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB' or '1000000B' -> bytes. A number without a unit is refused: '16' is far
    more likely to mean 16 GiB than 16 bytes, so the unit must be written."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match and not unit:
        raise ValueError(f"--device-memory '{text}' has no unit; write it with one, e.g. {match[1]}GiB, "
                         f"{match[1]}GB or {match[1]}B.")
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"--device-memory '{text}' must be a positive size such as 16GiB, 80GB or 512MiB.")
    return int(float(match[1]) * _UNITS[unit])


def human(n: float) -> str:
    """Bytes in binary units, e.g. 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass
class StepReport:
    """Per-device memory and compute of one train step on a mesh (bytes and FLOPs per device)."""

    mesh: tuple[int, int]
    """(data, model) axis sizes."""
    platform: str
    """Backend the step was compiled for (cpu when fake devices stand in for the target)."""
    params: int
    """SAE parameters held by one device."""
    optimizer: int
    """Optimizer state (Adam moments) held by one device."""
    other_state: int
    """The rest of the train state: latent statistics, step, hyper-parameters, RNG key."""
    batch: int
    """This device's share of the batch, counted as float32 (a bfloat16 store's batch is half that)."""
    temp: int
    """Compiler scratch during the step: activations, gradients, updates (memory_analysis temp)."""
    outputs_not_donated: int
    """Outputs that do not reuse a donated input buffer (the metrics)."""
    generated_code: int
    """Compiled code, where the backend reports it."""
    flops: float
    """FLOPs of one step on one device (cost_analysis)."""
    arguments: int
    """Everything passed in (state + batch), as the compiler counts it."""
    processes: int = 1
    """Processes the devices are split over (contiguous, as ``sharding.make_mesh`` lays them out)."""
    input_per_process: int = 0
    """Bytes of each global batch that one process reads and feeds (its B/P rows, as float32)."""
    collective_bytes: float = 0.0
    """Bytes one device moves in collectives per step (``collectives``: ring model, from the compiled HLO)."""
    cross_process_bytes: float = 0.0
    """Of those, the bytes of collectives whose device groups span processes (between hosts)."""
    collectives: dict = field(default_factory=dict)
    """Per kind (all-gather, all-reduce, ...): instructions, runs per step, bytes, cross-process bytes."""

    @property
    def state(self) -> int:
        """The whole train state on one device."""
        return self.params + self.optimizer + self.other_state

    @property
    def peak(self) -> int:
        """Bytes one device needs during a step: inputs, scratch, new outputs and code."""
        return self.arguments + self.temp + self.outputs_not_donated + self.generated_code

    @property
    def devices(self) -> int:
        return self.mesh[0] * self.mesh[1]

    def table(self, device_memory: int | None = None, step_time: float | None = None) -> str:
        """The report as aligned lines, with the verdict when ``device_memory`` is given and the rates that one
        step every ``step_time`` seconds needs."""
        d, m = self.mesh
        lines = [f"compile-check: one train step on a {d}x{m} (data x model) mesh, {self.platform} compiler",
                 "  per device:"]
        for name, value in (("parameters", self.params), ("optimizer state", self.optimizer),
                            ("other state", self.other_state), ("batch share", self.batch),
                            ("activations/temp", self.temp), ("outputs (not donated)", self.outputs_not_donated),
                            ("generated code", self.generated_code), ("peak", self.peak)):
            lines.append(f"    {name:<22}{human(value):>12}")
        lines.append(f"  FLOPs per step: {self.flops:.3e} per device, {self.flops * self.devices:.3e} in all")
        lines += self.traffic_lines(step_time)
        if device_memory is not None:
            verdict = "fits" if self.fits(device_memory) else "DOES NOT FIT"
            lines.append(f"  device memory {human(device_memory)}: {verdict} "
                         f"({100 * self.peak / device_memory:.0f}% used)")
        return "\n".join(lines)

    def traffic_lines(self, step_time: float | None) -> list[str]:
        """Input per process and collective bytes per step; with ``step_time``, the rates they need."""
        per = self.devices // self.processes
        lines = [f"  per process ({self.processes} process(es) of {per} device(s)): input "
                 f"{human(self.input_per_process)} per step"]
        lines.append(f"  collectives per step, per device: {human(self.collective_bytes)} "
                     f"({human(self.cross_process_bytes)} between processes)")
        for kind, row in sorted(self.collectives.items()):
            lines.append(f"    {kind:<20}{int(row['runs']):>6} runs {human(row['bytes']):>12}"
                         f"   between processes {human(row['cross_process_bytes']):>12}")
        if step_time:
            read = human(self.input_per_process / step_time)
            lines.append(f"  at one step every {step_time:g} s: each process reads {read}/s; each device moves "
                         f"{human(self.collective_bytes / step_time)}/s in collectives, "
                         f"{human(self.cross_process_bytes / step_time)}/s of it between processes")
        return lines

    def fits(self, device_memory: int) -> bool:
        """Whether the step's peak fits in ``device_memory`` bytes per device."""
        return self.peak <= device_memory


# --------------------------------------------------------------------------- in this process
def _resolve_d_model(cfg: config_lib.Config) -> config_lib.Config:
    if cfg.model.d_model:
        return config_lib.with_d_model(cfg, cfg.model.d_model)
    if cfg.data.store:
        from sae_jax.data import store as store_lib

        return config_lib.with_d_model(cfg, store_lib.open_store(cfg.data.store).d_model)
    raise config_lib.ConfigError("config key 'model.d_model' is 0 and 'data.store' is empty; compile-check needs "
                                 "one of them, e.g. model.d_model=2048.")


@dataclass
class Compiled:
    """The step compiled from abstract shapes, with what it was built from."""

    step: object
    """The compiled step: (state, batch) -> (state, metrics), the state donated."""
    run: object
    """The ``loop.Run`` (store None) whose step and shardings these are."""
    abstract: object
    """The train state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves)."""
    shardings: object
    """The train state's NamedShardings."""
    batch: object
    """The batch's shape, dtype and sharding."""


def abstract_step(cfg: config_lib.Config, devices: list) -> Compiled:
    """The loop's step for ``cfg.mesh`` over ``devices``, lowered and compiled from shapes only."""
    import jax
    import numpy as np

    from sae_jax import sharding
    from sae_jax.models import make_sae
    from sae_jax.train import loop
    from sae_jax.train import step as step_lib
    from sae_jax.train.state import init_state

    o = cfg.optim
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model, devices=devices)
    sharding.check_divisible(mesh, cfg.train.batch_size, cfg.model.d_sae)
    run = loop.Run(cfg=cfg, store=None, sae=make_sae(cfg.model, cfg.sparsity.penalty, cfg.train.dead_tokens),
                   mesh=mesh, scale=1.0, tx=step_lib.make_optimizer(o),
                   lr_schedule=step_lib.schedule(o, cfg.train.steps),
                   coef=step_lib.coefficient_factor(cfg.sparsity.warmup_steps))
    sample = jax.ShapeDtypeStruct((loop.INIT_SAMPLE_ROWS, cfg.model.d_model), np.float32)
    abstract = jax.eval_shape(lambda key, s: init_state(run.sae, run.tx, key, s, o.lr, cfg.sparsity.coefficient),
                              jax.random.key(cfg.seed), sample)
    shardings = loop.state_shardings(run, abstract)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.d_model), np.float32,
                                 sharding=sharding.input_sharding(mesh))
    compiled = loop.compile_step(run, abstract).lower(state, batch).compile()
    return Compiled(compiled, run, abstract, shardings, batch)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def report_here(cfg: config_lib.Config, devices: list, processes: int = 1) -> StepReport:
    """Compile the step for ``cfg.mesh`` over ``devices`` of this process and measure it, its collectives
    counted as if the devices were split over ``processes`` processes."""
    import numpy as np

    from sae_jax import sharding
    from sae_jax.train import collectives

    c = abstract_step(cfg, devices)
    abstract, shardings, batch = c.abstract, c.shardings, c.batch
    memory = c.step.memory_analysis()
    params = sharding.shard_bytes(abstract.params, shardings.params)
    optimizer = sharding.shard_bytes(abstract.opt_state, shardings.opt_state)
    batch_bytes = int(np.prod(batch.sharding.shard_shape(batch.shape))) * batch.dtype.itemsize
    return StepReport(
        mesh=tuple(int(n) for n in c.run.mesh.devices.shape), platform=devices[0].platform,
        params=params, optimizer=optimizer, other_state=sharding.shard_bytes(abstract, shardings) - params - optimizer,
        batch=batch_bytes, temp=int(memory.temp_size_in_bytes),
        outputs_not_donated=max(int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes), 0),
        generated_code=int(memory.generated_code_size_in_bytes), flops=_flops(c.step),
        arguments=int(memory.argument_size_in_bytes), processes=processes,
        input_per_process=cfg.train.batch_size // processes * cfg.model.d_model * 4,
        **traffic(collectives.parse(c.step.as_text(), len(devices), processes)),
    )


def traffic(found: list) -> dict:
    """StepReport's collective fields from ``collectives.parse``."""
    from sae_jax.train import collectives

    kinds = collectives.summary(found)
    return {"collectives": kinds, "collective_bytes": sum(r["bytes"] for r in kinds.values()),
            "cross_process_bytes": sum(r["cross_process_bytes"] for r in kinds.values())}


# --------------------------------------------------------------------------- anywhere
def compile_check(cfg: config_lib.Config, data: int | None = None, model: int | None = None,
                  processes: int = 1) -> StepReport:
    """The step report for a ``data`` × ``model`` mesh (default: the config's mesh over this process's devices)
    whose devices are split over ``processes`` processes.

    Uses this process's devices when it has enough, else fake CPU devices in a subprocess.
    """
    import dataclasses

    import jax

    from sae_jax import sharding

    cfg = _resolve_d_model(cfg)
    data = cfg.mesh.data if data is None else data
    model = cfg.mesh.model if model is None else model
    if -1 in (data, model):  # "the rest" of this process's devices
        data, model = sharding.axis_sizes(data, model, jax.device_count())
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=data, model=model))
    sharding.check_divisible(sharding.mesh_shape(data, model), cfg.train.batch_size, cfg.model.d_sae)
    check_processes(processes, data * model, cfg.train.batch_size)
    if jax.device_count() >= data * model and jax.process_count() == 1:
        return report_here(cfg, jax.devices()[:data * model], processes)
    return _report_in_subprocess(cfg, data * model, processes)


def check_processes(processes: int, n_devices: int, batch_size: int) -> None:
    """ValueError unless ``processes`` splits the devices (and the batch) evenly."""
    if processes < 1 or n_devices % processes:
        raise ValueError(f"--processes {processes} must be a positive divisor of the mesh's {n_devices} devices "
                         "(every process holds the same number of them).")


def _report_in_subprocess(cfg: config_lib.Config, n_devices: int, processes: int = 1) -> StepReport:
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out = Path(tmp) / layout.CONFIG, Path(tmp) / "report.json"
        config_lib.save_config(cfg, cfg_path)
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        result = subprocess.run([sys.executable, "-m", "sae_jax.train.aot", str(cfg_path), str(out), str(processes)],
                                env=env,
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compile-check on {n_devices} fake CPU devices failed:\n{result.stderr[-3000:]}")
        fields = json.loads(out.read_text())
    return StepReport(**{**fields, "mesh": tuple(fields["mesh"])})


def _main(cfg_path: str, out: str, processes: str = "1") -> None:
    import jax

    cfg = config_lib.load_config(cfg_path)
    report = report_here(cfg, jax.devices()[:cfg.mesh.data * cfg.mesh.model], int(processes))
    Path(out).write_text(json.dumps(asdict(report)))


if __name__ == "__main__":
    _main(*sys.argv[1:4])

"""The device mesh and the one table of logical-axis rules.

This is the only module that names mesh axes. Model code speaks of logical axes
(``batch``, ``latent``, ``embed``, ``sweep``); ``RULES`` maps them to the mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("latent", MODEL),
    ("embed", None),
    ("sweep", None),
)


def sweep_rules(shard: bool, rules=RULES) -> tuple[tuple[str, str | None], ...]:
    """The rules table with the ``sweep`` axis on the data axis (members on different devices, each
    seeing the whole batch) when ``shard``, else as in ``rules``."""
    return tuple((name, DATA if shard and name == "sweep" else axis) for name, axis in rules)


def axis_sizes(data: int, model: int, n_devices: int) -> tuple[int, int]:
    """Resolve -1 ("the rest") in the mesh sizes and check they cover the devices."""
    if data == -1 and model == -1:
        raise ValueError("mesh.data and mesh.model cannot both be -1; set one of them.")
    for name, size, other in (("mesh.data", data, model), ("mesh.model", model, data)):
        if size != -1 and (size < 1 or (other == -1 and n_devices % size)):
            raise ValueError(f"config key '{name}' is {size}, but this job has {n_devices} device(s), which "
                             f"{name} must divide; set {name} to a divisor of {n_devices}, or run on more devices "
                             "(`sae-jax compile-check --mesh DATAxMODEL` checks a larger mesh without them).")
    if data == -1:
        data = n_devices // model
    if model == -1:
        model = n_devices // data
    if data * model != n_devices:
        raise ValueError(f"mesh.data × mesh.model = {data} × {model} must equal the {n_devices} devices; "
                         "set one of them to -1 to take the rest.")
    return data, model


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all devices of all processes).

    Devices are laid out in (process, id) order, so in the mesh's row-major order each process's
    devices are one contiguous run: the input sharding (``input_sharding``) then puts each
    process's rows of a batch on its own devices, whichever axis spans the processes.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    devices.sort(key=lambda dev: (dev.process_index, dev.id))
    d, m = axis_sizes(data, model, len(devices))
    return Mesh(np.asarray(devices).reshape(d, m), (DATA, MODEL))


def logical_to_spec(axes: tuple[str | None, ...], rules=RULES) -> PartitionSpec:
    """PartitionSpec of a tensor whose dimensions carry these logical names."""
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def tree_specs(tree: Any, axes: dict[str, tuple], rules=RULES, lead: tuple = ()) -> Any:
    """PartitionSpecs for a pytree (params, optimizer state, statistics).

    A leaf takes the logical axes of the nearest dict key on its path that ``axes`` names
    (so Adam's mu/nu follow their parameter); other leaves are replicated. ``lead`` names
    extra leading dimensions (the sweep axis).
    """

    def spec(path, leaf):
        if not hasattr(leaf, "shape") or leaf.shape == ():
            return PartitionSpec()
        names = [getattr(k, "key", None) for k in path]
        for name in reversed(names):
            if name in axes and len(axes[name]) + len(lead) == len(leaf.shape):
                return logical_to_spec(lead + tuple(axes[name]), rules)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    """NamedShardings for a pytree of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def batch_sharding(mesh: Mesh, lead: tuple = ()) -> NamedSharding:
    """Sharding of a [B, d] batch inside the step: rows split over the data axis, each row on every
    device of the model axis (the latents' devices)."""
    return NamedSharding(mesh, logical_to_spec(lead + ("batch", "embed")))


def input_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, d] batch as it arrives: rows split over every device of the mesh in mesh order
    (``make_mesh``: process-major), so process p's devices hold rows [p·B/P, (p+1)·B/P), the rows it read.

    The step then moves the batch to where the latents are (``to_step_layout``), not the parameters to
    the batch: a batch is B·d values, the parameters 2·d·m.
    """
    return NamedSharding(mesh, PartitionSpec((DATA, MODEL), None))


def to_step_layout(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a jitted step: the input-sharded batch resharded to ``batch_sharding`` (XLA inserts an
    all-gather over the model axis; a no-op when that axis has one device)."""
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def with_step_layout(fn, mesh: Mesh):
    """``fn(state, x)`` taking ``x`` in ``input_sharding`` and handing it on in ``batch_sharding``."""

    def step(state, x):
        return fn(state, to_step_layout(x, mesh))

    return step


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding."""
    return NamedSharding(mesh, PartitionSpec())


def mesh_shape(data: int, model: int) -> dict[str, int]:
    """Axis sizes by mesh-axis name, like ``Mesh.shape``, for a mesh not built (yet)."""
    return {DATA: data, MODEL: model}


def axis_size(mesh: Mesh | dict[str, int], logical: str) -> int:
    """How many devices a logical axis is split over (1 if the rules replicate it); ``mesh`` may
    be a Mesh or its ``mesh_shape``."""
    axis = dict(RULES).get(logical)
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return int(shape[axis]) if axis is not None else 1


def check_divisible(mesh: Mesh | dict[str, int], batch_size: int, d_sae: int) -> None:
    """Reject a batch or dictionary that the mesh (or ``mesh_shape``) cannot split evenly, naming the key.

    The batch arrives split over every device (``input_sharding``), so train.batch_size must be a
    multiple of all of them. On a real Mesh, also check that each process's devices hold exactly the
    rows that process reads (``check_process_rows``).
    """
    for key, size, logical in (("train.batch_size", batch_size, "batch"), ("model.d_sae", d_sae, "latent")):
        n = axis_size(mesh, logical)
        if size % n:
            raise ValueError(f"config key '{key}'={size} must be a multiple of the {n} devices of the mesh's "
                             f"'{dict(RULES)[logical]}' axis; change it or mesh.data/mesh.model.")
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    devices = int(shape[DATA]) * int(shape[MODEL])
    if batch_size % devices:
        raise ValueError(f"config key 'train.batch_size'={batch_size} must be a multiple of the mesh's {devices} "
                         "devices (each device receives its own rows of every batch before the step gathers them "
                         "over the model axis); change it or mesh.data/mesh.model.")
    if isinstance(mesh, Mesh):
        check_process_rows(mesh, batch_size)


def check_process_rows(mesh: Mesh, batch_size: int) -> None:
    """Each process reads its own share of every batch (rows [p·B/P, (p+1)·B/P) of global batch B for
    process p of P, data/pipeline.py); the input sharding must put exactly those rows on p's devices.

    ``make_mesh`` orders devices so that it does; a mesh built from devices in another order would
    not, and ``make_array_from_process_local_data`` would not notice.
    """
    n = jax.process_count()
    share = batch_size // n
    rows: dict[int, list[tuple[int, int]]] = {}
    for device, index in input_sharding(mesh).devices_indices_map((batch_size, 1)).items():
        r = index[0]
        rows.setdefault(device.process_index, []).append((r.start or 0, batch_size if r.stop is None else r.stop))
    for p, slabs in rows.items():
        if (min(a for a, _ in slabs), max(b for _, b in slabs)) != (p * share, (p + 1) * share):
            raise ValueError(f"the mesh's devices are not in process order, so process {p} of {n} would hold "
                             "batch rows that another process reads; build the mesh with sharding.make_mesh.")


def for_mesh(sae: Any, mesh: Mesh) -> Any:
    """The architecture with its two-stage top-k split like the latent axis (TopK, BatchTopK).

    ``latent_groups`` never changes the result, only where the first selection stage runs.
    """
    if "latent_groups" not in sae.hyper_names():
        return sae
    return sae.replace(latent_groups=axis_size(mesh, "latent"))


def to_host(tree: Any) -> Any:
    """A pytree of jax.Arrays as numpy on this process, whole: an array with shards on other processes
    (the latent axis across hosts) is gathered from them, so every process must call this together."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return jax.device_get(a)

    return jax.tree.map(one, tree)


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree of (abstract) arrays laid out by ``shardings``."""
    sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


# --------------------------------------------------------------------------- processes
def is_main() -> bool:
    """Whether this is process 0 of the job: the one that writes logs, summaries and the lock."""
    return jax.process_index() == 0


def _autodetected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
    tpu = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS"))
    return slurm or tpu


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Start jax.distributed when the config or the environment asks for several processes.

    Explicit coordinator/num_processes/process_id win; otherwise SLURM and Cloud TPU are
    autodetected by JAX itself. On CPU the collectives use gloo. Returns True if started.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = bool(coordinator) or num_processes > 1
    if not explicit and not _autodetected():
        return False
    # Only affects the CPU backend; must be set before the backends start.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator or None, num_processes=num_processes or None,
                      process_id=None if process_id < 0 else process_id)
    jax.distributed.initialize(**kwargs)
    return True

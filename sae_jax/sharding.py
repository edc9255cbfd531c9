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
    """A (data, model) mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices()) if devices is None else list(devices)
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
    """Sharding of a [B, d] batch: rows split over the data axis."""
    return NamedSharding(mesh, logical_to_spec(lead + ("batch", "embed")))


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

    On a real Mesh, also check that each process's devices hold exactly the rows that process
    reads (``check_process_rows``).
    """
    for key, size, logical in (("train.batch_size", batch_size, "batch"), ("model.d_sae", d_sae, "latent")):
        n = axis_size(mesh, logical)
        if size % n:
            raise ValueError(f"config key '{key}'={size} must be a multiple of the {n} devices of the mesh's "
                             f"'{dict(RULES)[logical]}' axis; change it or mesh.data/mesh.model.")
    if isinstance(mesh, Mesh):
        check_process_rows(mesh, batch_size)


def check_process_rows(mesh: Mesh, batch_size: int) -> None:
    """Each process reads its own share of every batch (rows [p·B/P, (p+1)·B/P) of global batch B for
    process p of P, data/pipeline.py); the batch sharding must put exactly those rows on p's devices.

    It does not when the model axis spans processes (two processes would then hold the same rows
    but read different ones), and ``make_array_from_process_local_data`` would not notice.
    """
    n = jax.process_count()
    share = batch_size // n
    rows: dict[int, list[tuple[int, int]]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((batch_size, 1)).items():
        r = index[0]
        rows.setdefault(device.process_index, []).append((r.start or 0, batch_size if r.stop is None else r.stop))
    for p, slabs in rows.items():
        if (min(a for a, _ in slabs), max(b for _, b in slabs)) != (p * share, (p + 1) * share):
            raise ValueError(f"mesh.model={mesh.shape[MODEL]} spans several of the {n} processes, so they would "
                             f"share batch rows that each reads on its own; set mesh.model to at most "
                             f"{jax.local_device_count()} (the devices of one process).")


def for_mesh(sae: Any, mesh: Mesh) -> Any:
    """The architecture with its two-stage top-k split like the latent axis (TopK, BatchTopK).

    ``latent_groups`` never changes the result, only where the first selection stage runs.
    """
    if "latent_groups" not in sae.hyper_names():
        return sae
    return sae.replace(latent_groups=axis_size(mesh, "latent"))


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

"""Bytes that one train step moves between devices, read from its compiled HLO (``compiled.as_text()``).

Every collective instruction (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute,
and their async ``-start`` forms) is counted as many times as it runs per step: once in the entry
computation, times the known trip count inside a while loop, once per branch of a conditional (an
upper bound: one branch runs). Its bytes per device follow the usual ring model for a group of n
devices holding S bytes of result:

    all-gather       S·(n-1)/n   received (S is the gathered result)
    all-reduce       2·S·(n-1)/n (a reduce-scatter, then an all-gather)
    reduce-scatter   S·(n-1)     (S is one device's result; the input is n·S)
    all-to-all       S·(n-1)/n
    collective-permute  S        (to one peer)

A collective *crosses processes* when its group (or a permute's pair) holds devices of more than one
process; devices are numbered as the mesh lays them out (``sharding.make_mesh``: process-major), so
with P processes device i belongs to process i // (N/P). Those bytes go over the network between
hosts rather than the links inside one.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
            "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(ITEMSIZE) + r")\[([0-9,]*)\]")


@dataclass
class Collective:
    """One collective instruction of the step."""

    kind: str
    """One of KINDS."""
    count: int
    """Times it runs per step."""
    bytes_per_device: float
    """Bytes each device of its groups receives per run (ring model)."""
    group_size: int
    crosses_processes: bool


def parse(hlo: str, n_devices: int, processes: int = 1) -> list[Collective]:
    """The step's collectives from its HLO text, for ``n_devices`` devices over ``processes`` processes."""
    computations, entry = _computations(hlo)
    runs = _runs(computations, entry)
    found = []
    for name, lines in computations.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match or runs.get(name, 0) == 0:
                continue
            shape, op = match[1], match[2]
            kind = op.removesuffix("-start")
            if kind not in KINDS or op.endswith("-done"):
                continue
            groups = _groups(line, n_devices)
            size = max(len(g) for g in groups)
            nbytes = _result_bytes(shape, async_start=op.endswith("-start"))
            found.append(Collective(kind, runs[name], _ring_bytes(kind, nbytes, size), size,
                                    _crosses(groups, n_devices, processes)))
    return found


def summary(collectives: list[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: instructions, runs per step, bytes per device per step, and of those the bytes crossing
    processes."""
    out: dict[str, dict[str, float]] = {}
    for c in collectives:
        row = out.setdefault(c.kind, {"instructions": 0, "runs": 0, "bytes": 0.0, "cross_process_bytes": 0.0})
        row["instructions"] += 1
        row["runs"] += c.count
        row["bytes"] += c.count * c.bytes_per_device
        row["cross_process_bytes"] += c.count * c.bytes_per_device * c.crosses_processes
    return out


def as_json(collectives: list[Collective]) -> str:
    return json.dumps([asdict(c) for c in collectives])


# --------------------------------------------------------------------------- the HLO text
def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header[2]
            computations[current] = []
            entry = current if header[1] else entry
        elif line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    if not entry:
        raise ValueError("the HLO text has no ENTRY computation")
    return computations, entry


def _runs(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per step, following while bodies (times their known trip count),
    conditional branches, calls and fusions from the entry computation."""
    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        if name not in computations:
            return
        runs[name] = runs.get(name, 0) + times
        for line in computations[name]:
            for callee, factor in _callees(line):
                visit(callee, times * factor)

    visit(entry, 1)
    return runs


def _callees(line: str) -> list[tuple[str, int]]:
    if " while(" in line:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        n = int(trip[1]) if trip else 1
        body = re.search(r"body=%?([\w.\-]+)", line)
        return [(body[1], n)] if body else []
    callees = []
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
        callees += [(b.strip().lstrip("%"), 1) for b in branches[1].split(",")]
    for key in ("true_computation", "false_computation", "calls"):
        for m in re.finditer(key + r"=%?([\w.\-]+)", line):
            callees.append((m[1], 1))
    return callees


def _result_bytes(shape: str, async_start: bool) -> int:
    """Bytes of an instruction's result; of an async start's (operand, result) tuple, the result's."""
    arrays = [(ITEMSIZE[t], [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(shape)]
    if async_start and len(arrays) >= 2:
        arrays = arrays[len(arrays) // 2:]
    return int(sum(size * int(np.prod(dims, dtype=np.int64)) for size, dims in arrays))


def _groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective: replica_groups in either text form, or a permute's pairs."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs[1] + "}")]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                     r" \{([^}]*)\}", line)
    if mesh:
        return _mesh_groups(mesh[1], mesh[2], mesh[3], mesh[4])
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        dims = [int(d) for d in iota[3].split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota[4]:
            ids = ids.transpose([int(p) for p in iota[4].split(",")])
        return ids.reshape(int(iota[1]), int(iota[2])).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if explicit and explicit[1]:
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", explicit[1])]
    return [list(range(n_devices))]  # {} : every device


def _mesh_groups(axes: str, id_dims: str | None, perm: str | None, over: str) -> list[list[int]]:
    """Groups of the ``mesh['a'=2,'b'=4] {'b'}`` form: devices laid out on the named axes (in the order
    ``device_ids`` gives, an iota reshaped and transposed), one group along the listed axes per point of
    the others."""
    names = re.findall(r"'([^']+)'=(\d+)", axes)
    sizes = [int(n) for _, n in names]
    ids = np.arange(int(np.prod(sizes)))
    if id_dims:
        ids = ids.reshape([int(d) for d in id_dims.split(",")])
        if perm:
            ids = ids.transpose([int(q) for q in perm.split(",")])
    ids = ids.reshape(sizes)
    group_axes = [i for i, (name, _) in enumerate(names) if f"'{name}'" in over]
    rest = [i for i in range(len(names)) if i not in group_axes]
    size = int(np.prod([sizes[i] for i in group_axes])) if group_axes else 1
    return ids.transpose(rest + group_axes).reshape(-1, size).tolist()


def _ring_bytes(kind: str, nbytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    return {"all-gather": nbytes * (n - 1) / n, "all-reduce": 2 * nbytes * (n - 1) / n,
            "reduce-scatter": nbytes * (n - 1), "all-to-all": nbytes * (n - 1) / n,
            "collective-permute": float(nbytes)}[kind]


def _crosses(groups: list[list[int]], n_devices: int, processes: int) -> bool:
    per_process = max(n_devices // max(processes, 1), 1)
    return any(len({d // per_process for d in g}) > 1 for g in groups)

"""The package's shape: no import cycle, the front door (api.py) used by no module of the package, the
work directory's file names written once (in io/layout.py).

Imports are read from the source (the AST), so function-level and TYPE_CHECKING imports count too:
a cycle that only a lazy import keeps from failing is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sae_jax"


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (``from a import b`` counts as a.b where that is a
    module, else as a)."""

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "sae_jax"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (line {node.lineno}); import sae_jax.… absolutely"
            if node.module and node.module.split(".")[0] == "sae_jax":
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else owner(node.module)
                          for a in node.names}
    return found - {None}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, known) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a -> b -> ... -> a) of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read():
    edges = graph()
    assert "sae_jax.io.sae_folder" in edges["sae_jax.io.saelens"]
    assert "sae_jax.train.init_from" in edges["sae_jax.train.loop"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle in sae_jax: " + " -> ".join(cycle)


def test_api_is_imported_by_no_module_of_the_package():
    users = sorted(name for name, deps in graph().items() if "sae_jax.api" in deps)
    assert not users, f"sae_jax.api is the front door for users only, but {', '.join(users)} import(s) it"


# The names that double as JSON keys ("sae" in sae.json, "members" in sweep.json and the checkpoint meta)
# are left out: those literals are keys, not file names.
KEYS_TOO = {"SAE_DIR", "MEMBERS"}
NOT_YET: set[str] = set()  # modules not yet moved to the constants (none)


def layout_names() -> dict[str, str]:
    from sae_jax.io import layout

    return {k: v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and k not in KEYS_TOO}


def literals(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_config_yaml_is_a_literal_only_in_io_layout():
    where = sorted(str(p.relative_to(PACKAGE)) for p in modules().values() if "config.yaml" in literals(p))
    assert set(where) - NOT_YET == {"io/layout.py"}, where


def test_the_file_names_of_the_layout_are_literals_only_in_io_layout():
    names = layout_names()
    assert {"config.yaml", "summary.json", "metrics.jsonl", "checkpoints", ".corrupt", ".lock", "params.safetensors",
            "sae.json", "metadata.json"} <= set(names.values())
    found = {}
    for path in modules().values():
        rel = str(path.relative_to(PACKAGE))
        here = sorted(f"{v!r} (layout.{k})" for k, v in names.items() if v in literals(path))
        if here and rel not in ("io/layout.py", *NOT_YET):
            found[rel] = here
    assert not found, f"write these file names as the constants of sae_jax/io/layout.py: {found}"


def test_no_function_is_over_60_lines():
    """Short functions (issue 16); the training loop's driver is the one allowed to be longer."""
    long = {}
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert {k: v for k, v in long.items() if k != "train/loop.py:run_job"} == {}, long


def test_every_architecture_is_a_flax_module_declared_in_its_source():
    """config.py reads each class's declarations from the source; they equal the imported classes'."""
    from flax import nnx

    from sae_jax import config
    from sae_jax.models import registry

    assert set(config.ARCHITECTURE_INFO) == set(registry())
    for name, cls in registry().items():
        assert issubclass(cls, nnx.Module), name
        info = config.ARCHITECTURE_INFO[name]
        assert (tuple(info["penalties"]), info["uses_k"], info["saelens"]) == (cls.penalties, cls.uses_k, cls.saelens)
        assert info["options"] == cls.all_options(), name

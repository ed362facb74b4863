"""The house's floors, read from the source: every import goes down (or stays on its floor),
the two sides of a floor do not import each other, and no modules import each other in a
ring. The README's "Layout" section draws the same floors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Folder in the repository -> package it installs as (pyproject.toml's package-dir).
FOLDERS = {"reverie": "reverie", "agents": "reverie.agents", "graphs": "reverie.graphs",
           "memory": "reverie.memory", "prompts": "reverie.prompts",
           "training": "reverie.training", "wake": "reverie.wake"}
# (floor, side): higher floors may import lower ones; one floor's sides stay apart.
FLOORS = [
    ("reverie.cli", (3, "cli")), ("reverie.__main__", (3, "cli")),
    ("reverie.wake", (2, "day")), ("reverie.graphs", (2, "night")),
    ("reverie.agents", (1, "agents")), ("reverie.training", (1, "forge")),
    ("reverie.memory", (0, "ground")), ("reverie.prompts", (0, "ground")),
    ("reverie.runtime", (0, "ground")), ("reverie.config", (0, "ground")),
    ("reverie.paths", (0, "ground")), ("reverie", (0, "ground")),
]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Reverie modules that ``name`` imports anywhere in its file (function-level too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def floor(name: str) -> tuple[int, str]:
    for prefix, where in FLOORS:
        if name == prefix or name.startswith(prefix + "."):
            return where
    raise AssertionError(f"{name}: on no floor (add it to FLOORS and the README's Layout)")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_graph_sees_the_packages(graph):
    # the scan itself: a broken mapping would pass every rule below on an empty graph
    assert {"reverie.cli.main", "reverie.graphs.night", "reverie.training.lora",
            "reverie.memory.store", "reverie.runtime.models"} <= set(graph)
    assert "reverie.memory.records" in graph["reverie.memory.store"]


def test_imports_go_down_and_sides_stay_apart(graph):
    wrong = []
    for name, targets in graph.items():
        level, side = floor(name)
        for target in targets:
            t_level, t_side = floor(target)
            if t_level > level or (t_level == level and level > 0 and t_side != side):
                wrong.append(f"{name} ({side}, floor {level}) imports {target} "
                             f"({t_side}, floor {t_level})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    rings = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                rings.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not rings, "\n".join(rings)

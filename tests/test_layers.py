"""The package layout keeps its shape: no import cycles, and imports only run down the data path.

Every import statement in ``vne/``, ``training/`` and ``gadgets/`` (module level or inside a
function: a lazy import is still a dependency) is read with ``ast``, no module is imported. Layers,
bottom to top (docs/architecture.md):

    0  vne, vne.errors
    1  vne.exam          the data model, roles, geometry
    2  vne.io, vne.t1    files, wire formats, T1 mapping
    3  vne.prepare       slice matching, resampling, the input contract
    4  vne.runtime       model session, quality guard, pipeline, study store, servers
    5  vne.evaluation, vne.simulate
    6  training          (torch; the runtime never imports it)
    7  vne.commands, vne.cli
    8  gadgets           entry points for Gadgetron / MRD servers

A module may import its own layer or lower ones, never a higher one.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vne", "training", "gadgets")
LAYERS = [
    ("gadgets", 8), ("vne.commands", 7), ("vne.cli", 7), ("training", 6), ("vne.evaluation", 5), ("vne.simulate", 5),
    ("vne.runtime", 4), ("vne.prepare", 3), ("vne.io", 2), ("vne.t1", 2), ("vne.exam", 1), ("vne.errors", 0), ("vne", 0),
]
# Known upward imports, each to be removed by moving code (not by growing this list). They sit in
# files being rewritten on other branches, so the moves wait for those to land.
KNOWN_UPWARD = {
    ("vne.commands.serve", "gadgets.vne_gadget"): "the stream loop belongs in vne.runtime; the gadget file should import it",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def existing(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {existing(a.name) for a in node.names if a.name.split(".")[0] in PACKAGES}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] in PACKAGES:
                    out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else existing(target) for a in node.names}
        edges[mod] = out - {mod, ""}
    return edges


def _layer(mod: str) -> int:
    return next(rank for prefix, rank in LAYERS if mod == prefix or mod.startswith(prefix + "."))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_down_the_layers():
    edges = _graph()
    upward = {(m, t) for m, targets in edges.items() for t in targets if _layer(t) > _layer(m)}
    assert sorted(upward - set(KNOWN_UPWARD)) == []
    stale = set(KNOWN_UPWARD) - upward
    assert not stale, f"fixed, so remove from KNOWN_UPWARD: {sorted(stale)}"


def test_runtime_layers_never_import_training():
    edges = _graph()
    assert [(m, t) for m, ts in edges.items() for t in ts
            if _layer(m) <= 4 and t.split(".")[0] == "training"] == []

"""The package's layering, checked from the source: no import cycles (deferred imports inside
functions included: a cycle hidden in a function is still a cycle), and the engine, drafters,
trainer and converters reach a model family only through `specjax.models` (the family seam)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specjax", "checkpoints_convert", "pallas_kernels")
# Importing any submodule runs the top-level package first; `specjax/__init__.py` is a facade
# that re-exports the public API, so an edge into it says nothing about layering.
FACADES = {"specjax"}


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(path: Path, known: set[str], me: str) -> set[str]:
    """The modules of `known` that importing `path` may run: every import statement, at top
    level or inside a function, except under `if TYPE_CHECKING:`; `import a.b.c` runs a, a.b
    and a.b.c (the importer's own packages are already running and are left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in known and mod != me and not me.startswith(mod + "."):
                    out.add(mod)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imported_modules(p, known, m) - FACADES for m, p in files.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 60 and "specjax.engine.loop" in graph["specjax.api"] | {
        d for m in graph["specjax.api"] for d in graph[m]
    }
    found = cycles(graph)
    detail = [[f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c] for c in found]
    assert not found, detail
    # The check finds a cycle where there is one: the drafter contract importing a drafter.
    graph["specjax.engine.protocol"].add("specjax.drafters.cascade")
    assert any("specjax.engine.protocol" in c for c in cycles(graph))


def test_engine_imports_no_drafter():
    # The engine defines the protocol drafters implement (engine/protocol.py); it never imports
    # a drafter module.
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("specjax.engine"):
            assert not {d for d in deps if d.startswith("specjax.drafters")}, (mod, deps)


def test_families_are_reached_through_the_seam():
    # Outside specjax/models/, nothing imports a family module: the engine, drafters, trainer,
    # loaders and converters go through `specjax.models` (family_of, forward, layouts), so a new
    # family plugs in without touching them.
    graph = import_graph()
    direct = {
        m
        for m, deps in graph.items()
        if "specjax.models.llama" in deps and not m.startswith("specjax.models")
    }
    assert not direct, sorted(direct)

"""The package's structure, read from its source with `ast`: every module imports, no module takes
part in an import cycle (imports inside functions count: a lazy import only hides a loop), the
sub-packages depend on each other without a loop either, and no module imports another module's
private (``_name``) objects, nor a private module of another package.

The import graph: a node per module (``stem_boost.eval.runner``; a package is its ``__init__``);
``from .a import b`` is an edge to ``a.b`` when that is a module, else to ``a``. The sub-package
graph merges the modules of each first-level sub-package (``stem_boost.eval``, ...) into one node.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stem_boost"  # read as source: no import needed
PACKAGE = ROOT.name


def module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


MODULES = module_files()


def _existing(name: str) -> str:
    """The longest prefix of ``name`` that is a module of the package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imported(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(target module, imported object name or None) of one import statement, package-internal only."""
    if isinstance(node, ast.Import):
        return [(_existing(a.name), None) for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level == 0:
        if (node.module or "").split(".")[0] != PACKAGE:
            return []
        base = node.module
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub, None) if sub in MODULES else (_existing(base), alias.name))
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def parent(module: str) -> str:
    return module.rsplit(".", 1)[0]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> the package modules it imports, [(importer, source module, private name)])."""
    graph, private = {}, []
    for module, (path, is_pkg) in MODULES.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in imported(module, is_pkg, node):
                if target != module:
                    graph[module].add(target)
                if name and is_private(name) and target != module:
                    private.append((module, target, name))
                elif not name and is_private(target.rsplit(".", 1)[-1]) and not module.startswith(parent(target)):
                    private.append((module, parent(target), target.rsplit(".", 1)[-1]))  # a private module
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def subpackage(module: str) -> str:
    """The first-level sub-package holding ``module`` (or the module itself when it is top-level)."""
    head = ".".join(module.split(".")[:2])
    return head if MODULES.get(head, (None, False))[1] else module


def test_cycle_finder_finds_a_planted_loop_and_only_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith(".__main__")))  # that one runs
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_module_imports_in_a_loop():
    graph, _ = import_graph()
    assert {"stem_boost.eval.runner", "stem_boost.testbeds.smollm2_dsa"} <= set(graph)  # the graph was read
    assert cycles(graph) == []


def test_no_subpackage_loop():
    graph, _ = import_graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = subpackage(module)
        packages.setdefault(src, set()).update(t for t in map(subpackage, targets) if t != src)
    assert cycles(packages) == []


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == [], "\n".join(f"{m} imports {name} from {src}" for m, src, name in private)

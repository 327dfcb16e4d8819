"""The package's layout: subpackages for the methods, the engine and the optimizer, and no
import cycle among the modules' top-level imports (a lazy import inside a function may point
upwards, e.g. the registry's ``import lossbalance``)."""

from __future__ import annotations

import ast
import pathlib

import lossbalance

ROOT = pathlib.Path(lossbalance.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path, known: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found & known


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py") if "experiments" not in p.parts}
    known = set(files)
    return {name: _top_level_imports(path, known) - {name} for name, path in files.items()}


def test_modules_live_in_their_subpackages():
    graph = _graph()
    for name in ("_mgda", "_nash_mtl", "_upgrad", "_famo", "_vector"):
        assert f"lossbalance.methods.{name}" in graph
    for name in ("_engine", "_graph", "_vjp", "_autogram", "_backward", "_fsdp"):
        assert f"lossbalance.engine.{name}" in graph
    assert "lossbalance.optim._mtadam" in graph
    flat = sorted(p.name for p in ROOT.glob("_*.py"))
    assert flat == [
        "__init__.py",
        "__main__.py",
        "_base.py",
        "_catalog.py",
        "_logging.py",
        "_registry.py",
        "_validation.py",
    ]


def test_top_level_imports_have_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_vjp_does_not_import_the_engine_dispatcher():
    graph = _graph()
    assert "lossbalance.engine._engine" not in graph["lossbalance.engine._vjp"]
    assert "lossbalance.engine._vjp" in graph["lossbalance.engine._engine"]

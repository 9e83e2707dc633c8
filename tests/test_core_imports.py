"""The core's module graph: every gmi_core module imports, and no two modules import each other, directly or through
others (lazy imports inside functions count: they run too). An import cycle means two modules that cannot be read
or changed apart."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "gmi_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imported_core_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The gmi_core modules ``name`` imports anywhere in its body (``if TYPE_CHECKING:`` blocks never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import limits`: a module
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_three_modules_and_none_in_a_chain():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_lazy_import_in_a_function_and_the_relative_forms_are_edges(tmp_path):
    path = tmp_path / "cli.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nfrom . import limits\nfrom .hub.build import x\n"
        "if TYPE_CHECKING:\n    from .engine import Gmi\n"
        "def f():\n    from .library_cli import y\n"
    )
    known = {"gmi_core.limits", "gmi_core.hub.build", "gmi_core.library_cli", "gmi_core.engine", "gmi_core.hub"}
    found = imported_core_modules("gmi_core.cli", path, known)
    assert found == {"gmi_core.limits", "gmi_core.hub.build", "gmi_core.library_cli"}


def test_every_core_module_imports_and_the_core_has_no_import_cycle():
    modules = core_modules()
    for name in modules:
        if not name.endswith("__main__"):  # `python -m gmi_core` runs the CLI when imported
            importlib.import_module(name)
    graph = {name: imported_core_modules(name, path, set(modules)) for name, path in modules.items()}
    assert import_cycles(graph) == []

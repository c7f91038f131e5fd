"""The project's import graph: no cycles, and dependencies that point one way.

Every import statement of every project module counts, wherever it stands (module level, inside a
function, under ``TYPE_CHECKING``), so an import deferred into a function cannot hide a cycle. The
graph is read from the source (``ast``), nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizers_svc", "serving", "training", "evals")
APPS = (
    "serving",
    "training",
    "evals",
)  # built on the library, which imports none of them; nor do they each other


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
    }


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports: ``from a.b import c`` counts as a.b.c when c is a
    module, else as a.b; relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_project_modules():
    graph = import_graph()
    assert len(graph) > 40  # every package was read
    assert cycles(graph) == []


def test_library_imports_no_app():
    graph = import_graph()
    wrong = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith("tokenizers_svc")
        for target in targets
        if target.split(".")[0] in APPS
    }
    assert wrong == set()


def app_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where one application imports another."""
    return {
        (name, target)
        for name, targets in graph.items()
        if name.split(".")[0] in APPS
        for target in targets
        if target.split(".")[0] in APPS and target.split(".")[0] != name.split(".")[0]
    }


def test_no_app_imports_another_app():
    """serving, training and evals are built on the library only; what two of them need is library code,
    and a script that drives two of them lives outside (benchmarks/)."""
    assert app_imports(import_graph()) == set()


def test_app_import_check_sees_one(tmp_path):
    """The check is not vacuous: a deferred training -> evals import is found."""
    (tmp_path / "t.py").write_text("def f():\n    from evals import fid\n")
    modules = {"training.t": tmp_path / "t.py", "evals.fid": tmp_path / "fid.py"}
    graph = {"training.t": imports_of("training.t", modules["training.t"], modules), "evals.fid": set()}
    assert app_imports(graph) == {("training.t", "evals.fid")}


def test_cycle_finder_sees_a_deferred_import(tmp_path):
    """The walk counts imports inside functions, the way a cycle is usually hidden."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert cycles(graph) == [["a", "b"]]

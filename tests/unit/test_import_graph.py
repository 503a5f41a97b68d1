"""The architecture as a test: the project's import graph (every import statement, including the ones inside
functions) has no cycle, the layers point one way (common <- data_pipeline <- trainer <- launch), and no source
file outgrows 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.support.cli import REPO

PACKAGES = ("common", "data_pipeline", "trainer", "launch")
MAX_LINES = 400
# layer -> the project packages it must never import
FORBIDDEN = {"common": ("data_pipeline", "trainer", "launch"), "data_pipeline": ("trainer", "launch"),
             "trainer": ("launch",)}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports: ``from a.b import c`` counts a.b.c when that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = _graph()
    # a sanity anchor: if the walk found nothing, the assertions below would pass vacuously
    assert "data_pipeline.factory" in graph["trainer.engine.trainer"]
    assert "trainer.meta.reweighter" in graph["trainer.meta"]  # an import inside a function counts
    assert "data_pipeline.readers.registry" in graph["trainer.config"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_one_way():
    bad = [f"{mod} imports {dep}" for mod, deps in _graph().items() for dep in sorted(deps)
           if dep.split(".")[0] in FORBIDDEN.get(mod.split(".")[0], ())]
    assert bad == []


def test_no_source_file_over_400_lines():
    long = [f"{path.relative_to(REPO)}: {n} lines" for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert long == []

"""The shape of the dsss package's import graph: no cycles, no test or lab tooling imported.

The graph is read from the source with `ast`, so it holds every import: module level, inside
functions, and under `if TYPE_CHECKING:` (a cycle through type-only imports is still a cycle for
a reader and for a type checker). Adapters see the services they serve through small
`typing.Protocol`s of what they use, which is what keeps the graph acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dsss

PACKAGE_DIR = Path(dsss.__file__).resolve().parent
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name `path` (the module `name`) imports, resolved to absolute names; for
    `from X import Y` both X and X.Y (Y may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_graph(root: Path = PACKAGE_DIR) -> tuple[Graph, dict[str, set[str]]]:
    """(edges between the package's own modules, every name each module imports)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    imports = {name: imported_names(path, name) for name, path in files.items()}
    graph = {name: {m for m in names if m in files and m != name} for name, names in imports.items()}
    return graph, imports


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_type_checking_imports_are_edges(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "service.py").write_text("from pkg.sub import adapter\n")
    (pkg / "sub" / "adapter.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..service import Service\n"
    )
    graph, _ = package_graph(pkg)
    assert graph["pkg.sub.adapter"] == {"pkg.service"}
    assert find_cycle(graph) == ["pkg.service", "pkg.sub.adapter", "pkg.service"]


def test_the_graph_is_read():
    graph, _ = package_graph()
    # The services build their adapters: these edges exist, so the graph is not vacuous.
    assert "dsss.server.api" in graph["dsss.server.service"]
    assert "dsss.agent.transfer" in graph["dsss.agent.service"]


def test_dsss_has_no_import_cycle():
    graph, _ = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_dsss_imports_no_test_or_lab_tooling():
    """`pip install dsss` installs only dsss/: nothing in it may need tests/ or tools/."""
    _, imports = package_graph()
    bad = {
        name: sorted(m for m in names if m.split(".")[0] in ("tests", "tools", "pytest", "hypothesis"))
        for name, names in imports.items()
    }
    assert {name: mods for name, mods in bad.items() if mods} == {}

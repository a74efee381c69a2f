"""The import graph of ``src/difflab`` has no cycle: every ``import`` counts, the ones inside functions too."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """``{module: {difflab modules it imports}}`` (``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``; a package's own ``__init__`` is not counted as imported by its submodules)."""
    files = {module_name(p): p for p in (SRC / "difflab").rglob("*.py")}

    def known(name: str) -> str:
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == "difflab"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
                if base.split(".")[0] == "difflab":
                    targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base) for a in node.names}
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first = last), or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_search_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_difflab_has_no_import_cycle():
    graph = import_graph()
    assert "difflab.engine.loop" in graph and "difflab.checkpoint" in graph["difflab.engine.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)

"""The package's modules import one another without a circle: no module imports one that imports it back, at the top
of the file or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "groupvq_hf"


def intra_package_imports() -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its file (``from .x import``, ``from . import x``,
    ``from groupvq_hf.x import``, ``import groupvq_hf.x``)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "groupvq_hf"):
                    parts = (node.module or "").split(".")[node.level == 0:]
                    found |= {parts[0]} if parts and parts[0] else {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("groupvq_hf.")}
        graph[path.stem] = (found & modules) - {path.stem}
    return graph


def circles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import ``a -> b`` from which ``a`` can be reached again."""
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return sorted((a, b) for a in graph for b in graph[a] if a in reachable(b))


def test_no_module_imports_one_that_imports_it_back():
    graph = intra_package_imports()
    # The walk sees the imports (top level and inside functions): results formatting for cards has one home.
    assert {"cards"} <= graph["hub"] and {"cards"} <= graph["evaluation"] and "evaluation" in graph["analysis"]
    assert "hub" not in graph["evaluation"] and "evaluation" not in graph["hub"]
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b"), ("b", "c"), ("c", "a")]

"""The package's layers, checked by walking every import (top level and inside functions) of every module:

- the model files at the root (exactly the files that travel with a saved model) import only each other, relatively;
- the configuration imports nothing of the package but the quantizer (transformers: modeling imports configuration);
- subpackages import the model files and each other's modules, never a ``_private`` name of another module;
- the root never imports a subpackage (``__init__`` loads their public names lazily);
- no module imports one that imports it back.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "groupvq_hf"
MODEL_FILES = {
    "quantizer", "configuration_groupvq", "modeling_groupvq", "image_processing_groupvq", "vq_model", "vit",
    "simvq_backbone", "shells", "fileio",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The dotted name (relative to the package, "" for the package itself) that an import statement names."""
    if node.level == 0:
        return (node.module or "").removeprefix("groupvq_hf").lstrip(".")
    base = module.split(".") if module else []
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, str]]:
    """(imported module, imported name) pairs of the package's own imports in one module file."""
    known, found = modules(), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "groupvq_hf"):
            target = resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append((sub, "") if sub in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("groupvq_hf."), "") for a in node.names if a.name.startswith("groupvq_hf.")]
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports_of(name, path) if m in known} - {name} for name, path in known.items()}


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


def test_the_model_files_are_the_root_modules():
    root = {name for name in modules() if "." not in name and name and (PACKAGE / f"{name}.py").is_file()}
    assert root == MODEL_FILES


def test_model_files_import_only_each_other_relatively():
    for name in MODEL_FILES:
        path = PACKAGE / f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        absolute = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    and any("groupvq_hf" in (a.name or "") for a in n.names) or isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("groupvq_hf")]  # fmt: skip
        assert not absolute, f"{name} imports the package absolutely: it must travel as remote code"
        assert {m for m, _ in imports_of(name, path)} <= MODEL_FILES, name


def test_configuration_imports_only_the_quantizer():
    assert import_graph()["configuration_groupvq"] == {"quantizer"}


def test_the_root_never_imports_a_subpackage():
    graph = import_graph()
    for name in MODEL_FILES | {""}:
        assert all("." not in m and m in MODEL_FILES for m in graph[name]), (name, graph[name])


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        (name, target, imported)
        for name, path in modules().items()
        for target, imported in imports_of(name, path)
        if imported.startswith("_") and target != name
    ]
    assert offenders == []


def test_no_circle():
    graph = import_graph()
    # The walk sees imports inside functions too: hub and evaluation both import the card formatting, neither the other.
    assert "hub.cards" in graph["hub.publishing"] and "hub.cards" in graph["evaluation.evaluator"]
    assert not any(m.startswith("evaluation") for m in graph["hub.publishing"])
    assert circles(graph) == []


def test_the_checks_find_what_they_look_for():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b"), ("b", "c"), ("c", "a")]
    node = ast.parse("from ..quantizer import _x").body[0]
    assert resolve("evaluation.metrics", False, node) == "quantizer"
    assert resolve("data", True, ast.parse("from .sources import y").body[0]) == "data.sources"


@pytest.mark.parametrize("subpackage", ["data", "training", "evaluation", "hub", "app"])
def test_subpackages_exist_with_public_names(subpackage):
    import importlib

    module = importlib.import_module(f"groupvq_hf.{subpackage}")
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


def test_console_entry_points_run_the_scripts_code():
    """The installed console entry points name callables of the package; one runs as a command (no scripts/ on
    sys.path, so `import evaluate` finds the library)."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("groupvq-")}
    expected = {
        "groupvq-train", "groupvq-evaluate", "groupvq-resize-study", "groupvq-demo", "groupvq-tokenize",
        "groupvq-analyze-codebook", "groupvq-convert-checkpoint", "groupvq-push-to-hub",
    }  # fmt: skip
    assert expected <= set(scripts), sorted(scripts)
    for entry in scripts.values():
        assert callable(entry.load()), entry.value
    command = Path(sys.executable).parent / "groupvq-evaluate"
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--model" in done.stdout, done.stderr[-2000:]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "groupvq-convert-checkpoint"), "--help"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "--from_simvq" in done.stdout, done.stderr[-2000:]


def test_a_script_reached_through_a_symlinked_folder_keeps_its_folder_off_the_import_path(tmp_path):
    """Python puts the script's resolved folder on sys.path: the scripts compare resolved paths, so `evaluate.py`
    does not shadow the `evaluate` library when the checkout is reached through a symlink."""
    import subprocess
    import sys

    link = tmp_path / "checkout"
    link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    done = subprocess.run([sys.executable, str(link / "scripts" / "evaluate.py"), "--help"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and "--model" in done.stdout, done.stderr[-2000:]

"""The layout's rules, read from the source alone (as an editor or a type checker reads it): every
``paligemma_edge`` import names a module that exists, ``runtime/`` builds on no other folder, and the
module-level imports have no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from link_tree import link_tree  # noqa: E402  (tools/ is not a package)

PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def source_modules() -> dict[str, Path]:
    """Every module of the package by dotted name, found through pyproject's package-dir."""
    modules = {}
    for package, folder in PACKAGE_DIR.items():
        for path in (ROOT / folder).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports_of(module: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The ``paligemma_edge`` modules (or packages) a module imports, resolved to absolute names."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "paligemma_edge":
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import tasks`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "paligemma_edge")
    return found


def test_every_package_import_names_a_module_that_exists():
    modules = source_modules()
    packages = set(PACKAGE_DIR)
    missing = []
    for module, path in modules.items():
        for target in imports_of(module, path):
            # `from pkg import name`: pkg must exist; pkg.name is a module only where such a file exists
            if target not in modules and target not in packages and target.rpartition(".")[0] not in modules:
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert missing == []


def test_the_import_checker_sees_a_broken_import(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("from .generation.no_such_module import x\nfrom paligemma_edge.runtime import model\n")
    found = imports_of("paligemma_edge.runtime.broken", broken)
    assert "paligemma_edge.runtime.generation.no_such_module" in found
    assert "paligemma_edge.runtime.model" in found
    assert "paligemma_edge.runtime.generation.no_such_module" not in source_modules()


def test_the_runtime_builds_on_no_other_folder():
    """What ships to the device imports nothing of export, quantize, apps and the other folders."""
    crossing = [
        f"{path.relative_to(ROOT)}: {target}"
        for module, path in source_modules().items() if module.startswith("paligemma_edge.runtime")
        for target in imports_of(module, path)
        if not target.startswith("paligemma_edge.runtime")
    ]
    assert crossing == []


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle a depth-first walk meets, as 'a -> b -> a'."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_module_level_imports_have_no_cycles():
    modules = source_modules()
    graph = {
        module: {t if t in modules else t.rpartition(".")[0] for t in imports_of(module, path, top_level_only=True)}
        & set(modules) - {module}
        for module, path in modules.items()
    }
    assert sum(map(len, graph.values())) > 100  # the graph was read
    assert find_cycles(graph) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


def test_the_link_tree_is_the_package_as_it_imports(tmp_path):
    top = link_tree(tmp_path / "typecheck")
    for module, path in source_modules().items():
        parts = module.split(".")[1:]
        linked = top.joinpath(*parts, "__init__.py") if path.stem == "__init__" else top.joinpath(*parts[:-1],
                                                                                                   f"{parts[-1]}.py")
        assert linked.resolve() == path.resolve(), module

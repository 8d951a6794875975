"""The package's shape, checked from its source: one-way imports (no cycle, device code never
imports host code), no private name used across modules, modules and functions short enough to
read in one sitting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "patchcore_jax"
# Device stages: pure array programs that never import host code (files, datasets, CLI, viz).
# (backbones.convert and backbones.tflite read weight files: host code beside the models.)
DEVICE = {
    "features",
    "coreset",
    "knn",
    "candidates",
    "reranking",
    "scoring",
    "sharding",
    "config",
    "programs",
    "backbones.resnet",
    "backbones.mobilenet_v2",
    "backbones.densenet",
    "interrupt",  # checked inside the device loops' host boundaries
    "errors",
}
HOST_ONLY = {
    "cli", "workflows", "benchmark", "viz", "plots", "reports", "datasets", "checkpoint", "export",
    "files",
}  # fmt: skip
LONG_MODULES = {"coreset"}  # the greedy kernels (full and pruned) read best in one place
MAX_MODULE_LINES = 700
MAX_CLI_LINES = 600
MAX_FUNCTION_LINES = 80  # not counting the docstring


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(part for part in parts if part != "__init__")


def modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports, at module level or inside functions."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(p for p in base if p)
                source = ".".join(p for p in (prefix, node.module or "") if p)
            elif node.module and node.module.startswith("patchcore_jax"):
                source = node.module.removeprefix("patchcore_jax").lstrip(".")
            else:
                continue
            for alias in node.names:
                candidate = ".".join(p for p in (source, alias.name) if p)
                found.add(candidate if candidate in known else source)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("patchcore_jax."):
                    found.add(alias.name.removeprefix("patchcore_jax."))
    return {m for m in found if m in known and m != name and m != ""}


def top(name: str) -> str:
    return name.split(".")[0]


def test_import_graph_has_no_cycle_and_device_code_imports_no_host_code():
    trees = modules()
    known = set(trees)
    graph = {name: imported_modules(name, tree, known) for name, tree in trees.items()}
    # Packages import their own submodules for their namespace: edges into a package's own
    # children are not cycles of the design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".") or name == ""}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycles.append([*path[path.index(child) :], child] if child in path else [child])
            elif child not in state:
                visit(child, [*path, child])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"
    upward = [
        f"{name} imports {m}"
        for name, imports in graph.items()
        if name in DEVICE
        for m in imports
        if top(m) in HOST_ONLY
    ]
    assert not upward, upward


def test_no_private_name_is_used_from_another_module():
    trees = modules()
    uses = []
    for name, tree in trees.items():
        aliases = {}  # local name -> package module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                source = node.module.removeprefix("patchcore_jax").lstrip(".")
                from_package = node.module.startswith("patchcore_jax") or node.level
                for alias in node.names:
                    if from_package and alias.name.startswith("_") and alias.name != "__version__":
                        uses.append(f"{name}: from {node.module} import {alias.name}")
                    full = ".".join(p for p in (source, alias.name) if p)
                    if from_package and full in trees:
                        aliases[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                uses.append(f"{name}: {node.value.id}.{node.attr} (line {node.lineno})")
    assert not uses, uses


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        lines = len(path.read_text().splitlines())
        limit = MAX_CLI_LINES if name == "cli" else MAX_MODULE_LINES
        if lines > limit and name not in LONG_MODULES:
            long_modules.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                docstring = node.body[0]
                if isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant):
                    length -= docstring.end_lineno - docstring.lineno + 1
                if length > MAX_FUNCTION_LINES and name not in LONG_MODULES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_sources_cite_nothing_outside_the_repository():
    """Docstrings cite the README or the paper, not a specification file the repository lacks."""
    cited = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for folder in ("patchcore_jax", "tests", "benchmarks", "scripts")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bSPEC( section)? \d", line)
    ]
    assert not cited, cited


def test_the_package_namespace_lists_its_public_names_and_no_helpers():
    import patchcore_jax

    names = set(dir(patchcore_jax))
    assert set(patchcore_jax.__all__) <= names
    assert not {"importlib", "Any", "annotations", "_LAZY"} & names
    assert all(not name.startswith("_") or name == "__version__" for name in names)

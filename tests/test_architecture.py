"""The import graph as ARCHITECTURE.md draws it: layers that import one way, and no import cycle anywhere.

Read from the source (ast), not from sys.modules: an import inside a function counts as much as one at the
top (a local import only hides a cycle, it does not remove it). kernels/ is the package fastsft.kernels.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Who may not import whom (ARCHITECTURE.md, "Layers"): importer prefix -> forbidden prefixes.
FORBIDDEN = {
    "fastsft.kernels": ("fastsft.ops", "fastsft.patch", "fastsft.data", "fastsft.train", "fastsft.cli"),
    "fastsft.ops": ("fastsft.patch", "fastsft.data", "fastsft.train", "fastsft.cli"),
    "fastsft.patch": ("fastsft.kernels", "fastsft.data", "fastsft.train", "fastsft.cli"),
    "fastsft.data": ("fastsft.kernels", "fastsft.ops", "fastsft.patch", "fastsft.train", "fastsft.cli"),
    "fastsft.train": ("fastsft.kernels", "fastsft.ops", "fastsft.cli"),  # train/ reaches ops/ through patch/
}
# Inside train/: the CLI verbs (inference) and the loop are tops, neither imports the other.
FORBIDDEN_WITHIN_TRAIN = {
    "fastsft.train.loop": ("fastsft.train.inference",),
    "fastsft.train.inference": ("fastsft.train.loop",),
}


def package_modules() -> dict[str, Path]:
    """Module name -> file, for fastsft/ and kernels/ (as fastsft.kernels)."""
    modules = {}
    for root, package in ((REPO / "fastsft", "fastsft"), (REPO / "kernels", "fastsft.kernels")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source). `from a import b` counts as an import
    of a.b when that is a module, else of a. A package importing its own submodules, or a module its parent
    package, is not an edge (Python runs those in order, they cannot deadlock)."""
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:  # `import fastsft.data.packing.x` -> the module
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                if target.startswith(name + ".") or name.startswith(target + "."):
                    continue
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_modules())


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The checker itself can fail: a local import that closes a loop is a cycle."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import thing\n")
    (tmp_path / "c.py").write_text("from .b import f\n")
    modules = {f"pkg.{p.stem}": p for p in tmp_path.glob("*.py")}
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.b"]]


def test_the_graph_is_read_from_the_real_source(graph):
    assert "fastsft.kernels.cross_entropy" in graph["fastsft.ops.cross_entropy"]
    assert "fastsft.patch.binding" in graph["fastsft.patch.patcher"]
    assert "fastsft.train.build" in graph["fastsft.train.loop"]


def test_no_import_cycle_in_the_package(graph):
    assert cycles(graph) == []


@pytest.mark.parametrize("rules", [FORBIDDEN, FORBIDDEN_WITHIN_TRAIN], ids=["layers", "train-tops"])
def test_layers_import_one_way(graph, rules):
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for layer, forbidden in rules.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert wrong == []

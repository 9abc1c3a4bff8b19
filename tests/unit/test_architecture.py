"""The package's import graph: layers only import downwards, and no module imports itself back.

The layers come from the import-linter contract in ``pyproject.toml`` (``lint-imports`` checks
the same table in CI), so there is one list to edit. The graph is grimp's: imports inside
functions and under ``TYPE_CHECKING`` count, because a late import is still a dependency.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest

import runicorn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
PACKAGE = "runicorn"
# Modules outside the layers: the facade (names resolve lazily, by string) and ``python -m``.
UNLAYERED = {PACKAGE, f"{PACKAGE}.__main__"}


def _contract_layers() -> list[set[str]]:
    """The layers, top first, each a set of sibling packages, from the layers contract."""
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]
    contracts = [c for c in config["contracts"] if c["type"] == "layers"]
    assert len(contracts) == 1, f"expected one layers contract in {PYPROJECT}, got {contracts}"
    assert config.get("exclude_type_checking_imports", False) is False
    return [{name.strip() for name in line.split("|")} for line in contracts[0]["layers"]]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # cache_dir=None: no cache directory written into the working tree.
    return grimp.build_graph(PACKAGE, exclude_type_checking_imports=False, cache_dir=None)


def _where(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    return ", ".join(f"line {d['line_number']}: {d['line_contents'].strip()}" for d in details)


def _layer_violations(graph: grimp.ImportGraph, layers: list[set[str]]) -> list[str]:
    """One line per import chain that climbs a layer or crosses between siblings, each hop
    with the line that makes it."""
    found = graph.find_illegal_dependencies_for_layers(
        layers=[grimp.Layer(*sorted(line), independent=True) for line in layers]
    )
    lines = []
    for dependency in sorted(found, key=lambda d: (d.importer, d.imported)):
        for route in dependency.routes:
            for head in sorted(route.heads):
                for tail in sorted(route.tails):
                    chain = [head, *route.middle, tail]
                    hops = list(itertools.pairwise(chain))
                    if all(graph.direct_import_exists(importer=a, imported=b) for a, b in hops):
                        described = "; ".join(
                            f"{a} -> {b} ({_where(graph, a, b)})" for a, b in hops
                        )
                        lines.append(
                            f"{dependency.importer} must not import {dependency.imported}: "
                            + described
                        )
    return lines


def _cycles(graph: grimp.ImportGraph, modules: Iterable[str]) -> list[list[str]]:
    """Each strongly connected group of modules, as one closed import path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(root: str) -> None:
        # Iterative Tarjan: the graph is small, but recursion depth should not depend on it.
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append(
                        (target, iter(sorted(graph.find_modules_directly_imported_by(target))))
                    )
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1 or graph.direct_import_exists(importer=node, imported=node):
                        groups.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)

    cycles = []
    for group in groups:
        start = group[0]
        back = next(m for m in sorted(graph.find_modules_that_directly_import(start)) if m in group)
        path = graph.find_shortest_chain(importer=start, imported=back) or (start,)
        cycles.append([*path, start])
    return cycles


def _describe_cycle(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    hops = [f"{a} -> {b} ({_where(graph, a, b)})" for a, b in itertools.pairwise(cycle)]
    return "import cycle:\n    " + "\n    ".join(hops)


def test_every_subpackage_sits_in_exactly_one_layer() -> None:
    layers = _contract_layers()
    listed = [name for line in layers for name in line]
    assert len(listed) == len(set(listed)), f"a package is listed twice: {sorted(listed)}"
    package_dir = Path(runicorn.__file__).parent
    children = {
        f"{PACKAGE}.{path.stem if path.is_file() else path.name}"
        for path in package_dir.iterdir()
        if (path.is_dir() and (path / "__init__.py").exists())
        or (path.suffix == ".py" and path.name != "__init__.py")
    }
    assert children - UNLAYERED == set(listed), (
        "the layers contract in pyproject.toml must name every subpackage and module of "
        f"runicorn: missing {sorted(children - UNLAYERED - set(listed))}, "
        f"stale {sorted(set(listed) - children)}"
    )


def test_imports_only_point_down_the_layers(graph: grimp.ImportGraph) -> None:
    violations = _layer_violations(graph, _contract_layers())
    assert not violations, "imports against the layers contract:\n" + "\n".join(violations)


def test_no_module_of_the_package_takes_part_in_an_import_cycle(
    graph: grimp.ImportGraph,
) -> None:
    cycles = _cycles(graph, graph.modules)
    assert not cycles, "\n".join(_describe_cycle(graph, cycle) for cycle in cycles)


def test_the_checks_report_an_upward_import_a_sibling_import_and_a_cycle() -> None:
    """The checks above pass on a clean graph; this shows they would not pass on a dirty one."""
    dirty = grimp.ImportGraph()
    for module in ["pkg", "pkg.top", "pkg.left", "pkg.left.a", "pkg.right", "pkg.low"]:
        dirty.add_module(module)
    dirty.add_import(importer="pkg.low", imported="pkg.top", line_number=3, line_contents="x")
    dirty.add_import(importer="pkg.left.a", imported="pkg.right", line_number=4, line_contents="y")
    dirty.add_import(importer="pkg.right", imported="pkg.left", line_number=5, line_contents="z")
    dirty.add_import(importer="pkg.left", imported="pkg.left.a", line_number=6, line_contents="w")

    violations = _layer_violations(dirty, [{"pkg.top"}, {"pkg.left", "pkg.right"}, {"pkg.low"}])
    assert any(line.startswith("pkg.low must not import pkg.top") for line in violations)
    assert any("pkg.left.a" in line and "pkg.right" in line for line in violations)
    assert any(line.startswith("pkg.right must not import pkg.left") for line in violations)

    cycles = _cycles(dirty, dirty.modules)
    assert cycles == [["pkg.left", "pkg.left.a", "pkg.right", "pkg.left"]]
    assert "pkg.left.a -> pkg.right (line 4: y)" in _describe_cycle(dirty, cycles[0])

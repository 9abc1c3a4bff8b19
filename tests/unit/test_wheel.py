"""What a user installs: the wheel holds the package and its type marker, never the test harness.

The test builds a pure-Python wheel from a clean copy of the source tree (no isolated build
environment, so no index is needed; about 3 s). ``.ci/run`` also builds the wheel with the
compiled core and points ``RUNICORN_TEST_WHEEL`` at it, so the same checks, and the one that
every ``csrc/*.pyx`` became an extension module, run on the wheel users get from a compiler.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
WHEEL_ENV = "RUNICORN_TEST_WHEEL"
# What setup.py and pyproject.toml read: everything a build from an sdist would have.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "src", "csrc"]
# Build leftovers of the developer's in-place build, which must not leak into the wheel.
_LEFTOVERS = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.so", "*.pyd", "*.c", "*.html", "*.egg-info", "build"
)
_TEST_ONLY_MODULES = {"pytest", "_pytest", "hypothesis", "harness"}


def _build_pure_wheel(workdir: Path) -> Path:
    source = workdir / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=_LEFTOVERS)
        else:
            shutil.copy2(origin, source / name)
    out = workdir / "dist"
    env = {**os.environ, "RUNICORN_PURE_PYTHON": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("RUNICORN_REQUIRE_NATIVE", None)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "-w", str(out), str(source)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(
            f"building the wheel failed (exit {result.returncode}); the test environment needs "
            f"the build requirements of pyproject.toml (pip install -e '.[test]'):\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given)
        assert path.is_file(), f"{WHEEL_ENV}={given} is not a file"
        return path
    return _build_pure_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_only_the_package_and_its_metadata(names: list[str]) -> None:
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"runicorn"}
    for forbidden in ("runicorn/testing/", "harness/", "tests/", "benchmarks/"):
        assert not [n for n in names if n.startswith(forbidden) or f"/{forbidden}" in n]
    assert not [n for n in names if n.rsplit("/", 1)[-1] in ("conftest.py", "harness.py")]
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith("test_")]


def test_wheel_holds_every_module_of_the_source_tree(names: list[str]) -> None:
    source = ROOT / "src"
    expected = {p.relative_to(source).as_posix() for p in source.rglob("*.py")}
    assert expected <= set(names), f"missing from the wheel: {sorted(expected - set(names))}"


def test_wheel_marks_the_package_as_typed(names: list[str]) -> None:
    assert "runicorn/py.typed" in names


def test_wheel_holds_the_service_units_runicorn_units_prints(names: list[str]) -> None:
    source = ROOT / "src"
    units = {p.relative_to(source).as_posix() for p in source.rglob("units/*.service")}
    assert units, "no units/*.service found in the source tree"
    assert units <= set(names), f"missing from the wheel: {sorted(units - set(names))}"


def _imported_top_levels(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_in_the_wheel_imports_a_test_tool(wheel: Path, names: list[str]) -> None:
    offenders = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in names:
            if name.endswith(".py"):
                imported = _imported_top_levels(archive.read(name).decode("utf-8"))
                if imported & _TEST_ONLY_MODULES:
                    offenders[name] = sorted(imported & _TEST_ONLY_MODULES)
    assert not offenders, f"wheel modules importing test tools: {offenders}"


def test_the_import_scan_sees_every_form_of_import() -> None:
    code = (
        "import os\nimport pytest as p\nfrom _pytest.fixtures import x\ndef f():\n import harness\n"
    )
    assert _imported_top_levels(code) == {"os", "pytest", "_pytest", "harness"}


def test_wheel_kind_matches_its_contents(wheel: Path, names: list[str]) -> None:
    """A pure wheel is for any platform and holds no binary; a compiled one holds every twin."""
    binaries = sorted(n for n in names if n.endswith((".so", ".pyd")))
    tag = wheel.name.removesuffix(".whl").split("-")[-3:]
    if not binaries:
        assert tag == ["py3", "none", "any"], wheel.name
        return
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    twins = sorted(p.stem for p in (ROOT / "csrc").glob("*.pyx"))
    assert twins, "no csrc/*.pyx found"
    for stem in twins:
        built = [n for n in binaries if n.startswith(f"runicorn/core/{stem}.")]
        assert built, f"the compiled twin runicorn.core.{stem} is missing from {wheel.name}"
        assert built[0].endswith(suffixes), built
    assert tag[-1] != "any", wheel.name

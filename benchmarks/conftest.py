"""Benchmark fixtures: every benchmark runs once per backend, like every test.

The ``backend`` parametrization mirrors ``tests/conftest.py`` (the benchmarks are collected
on their own, so they cannot lean on that file); ``--no-native`` deselects the compiled
half here too. Run with ``pytest benchmarks --benchmark-only`` to measure, or with
``--benchmark-disable`` to run each benchmark once as a correctness check.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from runicorn.core.backend import NATIVE, PYTHON, Backend, load_backend, native_available


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/conftest.py registers the same option when tests and benchmarks run together
    with contextlib.suppress(ValueError):
        parser.addoption(
            "--no-native",
            action="store_true",
            default=False,
            help="deselect the compiled backend (where it cannot be built)",
        )


def _backend_names(config: pytest.Config) -> list[str]:
    pure_forced = os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0")
    if config.getoption("--no-native") or pure_forced:
        return [PYTHON]
    return [NATIVE, PYTHON]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", _backend_names(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def backend(backend_name: str) -> Backend:
    """The implementation under measurement; the native half fails loudly if it did not build."""
    if backend_name == NATIVE and not native_available():
        pytest.fail(
            "the compiled core did not import; rebuild it (pip install -e .) "
            "or pass --no-native to benchmark pure Python only"
        )
    return load_backend(backend_name)

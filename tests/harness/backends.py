"""The pytest side of the two-backend rule: every test and benchmark runs on both.

``tests/conftest.py`` and ``benchmarks/conftest.py`` load this module as a plugin (its hooks
and the ``backend`` fixture), so a test that takes ``backend`` (directly or through a fixture
that does) runs once against the compiled core and once against pure Python. ``--no-native`` (or
``RUNICORN_PURE_PYTHON=1``) keeps only the pure half, for machines without a compiler;
``--only-native`` keeps only the compiled half (CI's passes over other paramiko versions,
where the backend is not what varies).
"""

from __future__ import annotations

import os

import pytest

from runicorn.core.backend import NATIVE, PYTHON, Backend, load_backend, native_available


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/ and benchmarks/ both load this module with pytest_plugins; pytest registers it once.
    parser.addoption(
        "--no-native",
        action="store_true",
        default=False,
        help="deselect the compiled backend (where it cannot be built)",
    )
    parser.addoption(
        "--only-native",
        action="store_true",
        default=False,
        help="deselect the pure-Python backend (for passes where the backend is not tested)",
    )


def pytest_configure(config: pytest.Config) -> None:
    pure_forced = os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0")
    if config.getoption("--only-native") and (config.getoption("--no-native") or pure_forced):
        raise pytest.UsageError(
            "--only-native contradicts --no-native and RUNICORN_PURE_PYTHON=1; drop one"
        )


def backend_names(config: pytest.Config) -> list[str]:
    """The backends this session runs: both, unless pure Python was asked for."""
    pure_forced = os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0")
    if config.getoption("--no-native") or pure_forced:
        return [PYTHON]
    if config.getoption("--only-native"):
        return [NATIVE]
    return [NATIVE, PYTHON]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", backend_names(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def backend(backend_name: str) -> Backend:
    """The implementation under test; the native half fails loudly if it did not build."""
    if backend_name == NATIVE and not native_available():
        pytest.fail(
            "the compiled core did not import; rebuild it (pip install -e .) "
            "or pass --no-native to run pure Python only"
        )
    return load_backend(backend_name)


@pytest.fixture(scope="session")
def both(request: pytest.FixtureRequest) -> tuple[Backend, Backend]:
    """``(compiled, pure)``, for parity tests that compare the two on the same input; skipped
    where the compiled half is deselected."""
    if request.config.getoption("--no-native"):
        pytest.skip("the compiled core is deselected")
    if not native_available():
        pytest.fail("the compiled core did not import; rebuild it (pip install -e .)")
    return load_backend(NATIVE), load_backend(PYTHON)

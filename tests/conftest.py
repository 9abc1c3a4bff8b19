"""Shared fixtures. Every behavioural test takes ``backend`` (directly or through a fixture
that does), so it runs once against the compiled core and once against pure Python."""

from __future__ import annotations

import os

import pytest

from runicorn.core.backend import NATIVE, PYTHON, Backend, load_backend, native_available


def pytest_addoption(parser: pytest.Parser) -> None:
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
    """The implementation under test; the native half fails loudly if it did not build."""
    if backend_name == NATIVE and not native_available():
        pytest.fail(
            "the compiled core did not import; rebuild it (pip install -e .) "
            "or pass --no-native to test pure Python only"
        )
    return load_backend(backend_name)


# Real-sshd fixtures (sshd_server, sshd_factory, ssh_client, sftp) live in tests/_sshd_fixtures.py.
from _sshd_fixtures import *  # noqa: E402, F403

"""Shared fixtures and markers of the test suite.

Layout: ``unit/`` needs no server; ``sshd/`` runs the sync against a real OpenSSH sshd on
127.0.0.1; ``faults/`` injects failures (cut links, stalls, killed processes, hostile
servers, live writers). The harness they share (sshd launcher, WAN emulator, labs) is the
``harness`` package beside this file.

Every behavioural test takes ``backend`` (directly or through a fixture that does), so it
runs once against the compiled core and once against pure Python.

Markers ``pytest -m`` can select: ``sshd`` (set here on every test that uses a server
fixture, and by hand on tests that start their own server), ``faults`` (set here on
everything under ``faults/``) and ``slow``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from harness.lab import Lab, make_client, make_lab
from runicorn.core.backend import Backend
from runicorn.sync import service as service_module
from runicorn.sync.client import ManifestSyncClient

# The backend parametrization (the ``backend`` fixture, --no-native), shared with the
# benchmarks, and the real-sshd fixtures (sshd_server, sshd_factory, ssh_client, sftp).
pytest_plugins = ["harness.backends", "harness.sshd_fixtures"]

TESTS_DIR = Path(__file__).parent
_SERVER_FIXTURES = {"sshd_server", "sshd_factory", "ssh_client", "sftp"}


def pytest_configure(config: pytest.Config) -> None:
    # A test runner started in the background by a non-interactive shell has SIGINT ignored,
    # and its children inherit that: the tests that press Ctrl+C on a child would see it
    # shrug. Ctrl+C is the suite's to test, so it gets its default meaning back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _library_logging_restored() -> Iterator[None]:
    """CLI tests configure the ``runicorn`` and ``paramiko`` loggers as the CLI does (a
    stderr handler, ``-v`` levels); undo that after each test so that it cannot leak into
    the next one's captured output."""
    loggers = [logging.getLogger(name) for name in ("runicorn", "paramiko", "paramiko.transport")]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    yield
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers = handlers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unit_dir = TESTS_DIR / "unit"
    faults_dir = TESTS_DIR / "faults"
    for item in items:
        if _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.sshd)
        if item.path.is_relative_to(faults_dir):
            item.add_marker(pytest.mark.faults)
        if item.path.is_relative_to(unit_dir) and item.get_closest_marker("sshd"):
            raise pytest.UsageError(
                f"{item.nodeid} needs an sshd but lives in tests/unit/; "
                "move it to tests/sshd/ (or tests/faults/ if it injects a failure)"
            )


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path, backend: Backend) -> Lab:
    """A seeded sample lab under ``tmp_path/lab``, its full manifest published.

    Options of :func:`harness.lab.make_lab` come from the ``lab`` marker, e.g.
    ``pytestmark = pytest.mark.lab(runs=4)`` for a module of small labs.
    """
    marker = request.node.get_closest_marker("lab")
    return make_lab(tmp_path, backend, **(marker.kwargs if marker else {}))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """Where a test's client mirrors the lab (created by the first sync)."""
    return tmp_path / "cache"


@pytest.fixture
def client_for(
    sftp: paramiko.SFTPClient, lab: Lab, cache: Path, backend: Backend
) -> Iterator[Callable[..., ManifestSyncClient]]:
    """Build clients of ``lab`` into ``cache`` on the test's SFTP session, without jitter;
    keyword options go to the client. All are closed after the test."""
    clients: list[ManifestSyncClient] = []

    def build(**options: object) -> ManifestSyncClient:
        client = make_client(sftp, lab.root, cache, backend, **options)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def cli_backend(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The CLI has no backend flag; route the fixture's backend into every service it builds."""
    original = service_module.MetadataSyncService.__init__

    def init(self, *args, **kwargs) -> None:
        kwargs.setdefault("backend", backend)
        original(self, *args, **kwargs)

    monkeypatch.setattr(service_module.MetadataSyncService, "__init__", init)
    return backend

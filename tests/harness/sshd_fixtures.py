"""Fixtures for tests against a real OpenSSH server on 127.0.0.1 (mark them ``pytest.mark.sshd``).

The server serves the whole filesystem with absolute paths, so a test's "lab root" is simply a
directory under ``tmp_path``. When ``sshd`` is missing these fixtures fail, never skip: a CI job
without openssh-server would otherwise pass without testing the sync client at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import paramiko
import pytest

from harness.sshd import SshServer, find_sftp_server, find_sshd

__all__ = ["sftp", "ssh_client", "sshd_factory", "sshd_server"]


def _require_openssh(count_requests: bool) -> None:
    if find_sshd() is None:
        pytest.fail(
            "OpenSSH sshd is not installed; install openssh-server "
            "(apt-get install -y openssh-server; .ci/run does this in CI)",
            pytrace=False,
        )
    if count_requests and find_sftp_server() is None:
        pytest.fail(
            "OpenSSH sftp-server is not installed (needed to count SFTP requests); "
            "install openssh-server",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshServer]:
    """One sshd for the whole session, counting SFTP requests; call ``reset_request_counts()``
    before the operation you measure."""
    _require_openssh(count_requests=True)
    with SshServer(count_requests=True) as server:
        yield server


@pytest.fixture
def sshd_factory() -> Iterator[Callable[..., SshServer]]:
    """Start extra servers with their own options (``max_sessions=1`` …), stopped after the test."""
    started: list[SshServer] = []

    def start(**options: Any) -> SshServer:
        _require_openssh(count_requests=bool(options.get("count_requests", False)))
        server = SshServer(**options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def ssh_client(sshd_server: SshServer) -> Iterator[paramiko.SSHClient]:
    """A client connected to ``sshd_server`` that verified its host key; closed after the test."""
    client = sshd_server.connect()
    yield client
    client.close()


@pytest.fixture
def sftp(ssh_client: paramiko.SSHClient) -> Iterator[paramiko.SFTPClient]:
    """An SFTP session on ``ssh_client``; closed after the test."""
    session = ssh_client.open_sftp()
    yield session
    session.close()

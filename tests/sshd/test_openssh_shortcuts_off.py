"""With ``RUNICORN_OPENSSH_SHORTCUTS=0`` the transport uses only paramiko's public API and the
plain SFTP protocol, and syncs against a real sshd still come out byte for byte: the way out
when a paramiko release breaks a hook, or a server claims to be OpenSSH and is not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner

from harness.lab import (
    Lab,
    assert_cache_equals_server,
    cache_files,
    make_client,
    make_lab,
    server_files,
)
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import training_step
from runicorn.format import layout
from runicorn.transport.openssh_shortcuts import ENV_VAR, enabled
from runicorn.transport.sftp_pipeline import SftpPipeline, open_sftp_client
from runicorn.transport.sftp_remote import SftpRemote
from runicorn.transport.ssh import AEAD_CIPHERS

pytestmark = pytest.mark.sshd

MANIFESTS = [f"{layout.MANIFEST_DIRNAME}/full_manifest.json.gz"]


@pytest.fixture(autouse=True)
def shortcuts_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")


@pytest.fixture
def connection(sshd_server: SshServer) -> Iterator[paramiko.SSHClient]:
    """A connection made by runicorn's own ``connect`` (the CLI's path)."""
    client = sshd_server.runicorn_connect()
    yield client
    client.close()


@pytest.fixture
def session(connection: paramiko.SSHClient, lab: Lab) -> Iterator[paramiko.SFTPClient]:
    """The SFTP session the CLI would open, asking for the first-round-trip prefetch."""
    transport = connection.get_transport()
    assert transport is not None
    client = open_sftp_client(transport, timeout=10, root=str(lab.root), prefetch=MANIFESTS)
    yield client
    client.close()


def test_the_connection_uses_paramikos_own_transport_and_authentication(
    connection: paramiko.SSHClient,
) -> None:
    transport = connection.get_transport()
    assert transport is not None and transport.is_authenticated()
    assert not enabled(transport)
    assert type(transport) is paramiko.Transport
    assert type(transport.auth_handler) is paramiko.AuthHandler
    # The cipher order is set through paramiko's public SecurityOptions: it stays.
    assert transport.local_cipher == AEAD_CIPHERS[0]


def test_the_sftp_session_is_paramikos_own_without_a_prefetch(
    session: paramiko.SFTPClient, lab: Lab
) -> None:
    assert type(session) is paramiko.SFTPClient
    assert not hasattr(session, "prefetched")
    assert session.stat(str(lab.root)).st_size is not None


def test_worker_channels_exchange_init_before_their_first_request(
    connection: paramiko.SSHClient,
) -> None:
    transport = connection.get_transport()
    assert transport is not None
    pipe = SftpPipeline.open(transport, timeout=10)
    try:
        assert pipe.server_version == 3  # the handshake is done: no INIT rides along later
    finally:
        pipe.close()


def test_prefix_reads_ask_on_past_a_short_answer_and_stop_at_eof(
    session: paramiko.SFTPClient, tmp_path: Path
) -> None:
    content = os.urandom(2500)
    (tmp_path / "data.bin").write_bytes(content)
    (tmp_path / "small.json").write_bytes(b'{"a": 1}')
    with SftpRemote(session, str(tmp_path), read_size=1000) as remote:
        assert remote.read_prefix("data.bin", 10_000) == content
        assert remote.read_prefix("data.bin", 1500) == content[:1500]
        assert remote.read_file("small.json", 100) == b'{"a": 1}'
        prefixes = remote.read_prefixes(["data.bin", "small.json", "absent"], 900)
        assert prefixes[:2] == [content[:900], b'{"a": 1}']
        assert isinstance(prefixes[2], FileNotFoundError)


def test_cold_then_incremental_sync_mirrors_the_server(
    session: paramiko.SFTPClient, lab: Lab, cache: Path, backend: Backend
) -> None:
    client = make_client(session, lab.root, cache, backend, delete=True)
    try:
        cold = client.sync()
        assert cold["failed_count"] == 0
        assert cold["files_synced"] == lab.info.listed_files
        assert_cache_equals_server(lab.root, cache)

        training_step(lab.root, seed=11, now=lab.now + 60)
        lab.publish(now=lab.now + 60)
        step = client.sync()
        assert step["failed_count"] == 0
        assert step["incremental_count"] > 0  # appends verified and extended in place
        assert_cache_equals_server(lab.root, cache)

        assert client.sync()["skipped"] is True
    finally:
        client.close()


@pytest.mark.parametrize("published", [True, False], ids=["manifest", "legacy-walk"])
def test_the_cli_syncs_over_ssh_with_the_shortcuts_off(
    sshd_server: SshServer, tmp_path: Path, cli_backend: Backend, published: bool
) -> None:
    lab = make_lab(tmp_path, cli_backend, publish=published)
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    cache = tmp_path / "cache"
    args = ["sync", f"labserver:{lab.root}", str(cache), "--ssh-config", str(config), "--json"]

    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    stats = orjson.loads(first.stdout.strip().splitlines()[-1])
    assert stats["mode"] == ("manifest" if published else "legacy")
    assert stats["failed_count"] == 0
    if published:
        assert_cache_equals_server(lab.root, cache)
    else:  # SFTP v3 mtimes are whole seconds: the legacy walk's copies are compared by content
        assert cache_files(cache) == server_files(lab.root)

    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0, again.stderr
    assert orjson.loads(again.stdout.strip().splitlines()[-1])["files_synced"] == 0

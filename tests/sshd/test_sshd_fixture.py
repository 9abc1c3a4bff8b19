"""The throw-away sshd behaves like a real, careful SSH server and counts SFTP requests exactly."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from harness.sshd import SshServer, SshServerError

pytestmark = pytest.mark.sshd


def _client_trusting(known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _connect(client: paramiko.SSHClient, server: SshServer) -> None:
    client.connect(
        server.host,
        port=server.port,
        username=server.username,
        pkey=server.client_key(),
        allow_agent=False,
        look_for_keys=False,
        timeout=10,
    )


def test_connect_verifies_the_servers_host_key(
    sshd_server: SshServer, ssh_client: paramiko.SSHClient
) -> None:
    transport = ssh_client.get_transport()
    assert transport is not None and transport.is_authenticated()
    key = transport.get_remote_server_key()
    assert f"{key.get_name()} {key.get_base64()}" == sshd_server.host_public_key
    known = sshd_server.known_hosts_path.read_text().split()
    assert known[0] == f"[127.0.0.1]:{sshd_server.port}"


def test_unknown_host_key_is_refused(sshd_server: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    client = _client_trusting(empty)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _connect(client, sshd_server)
    client.close()


def test_changed_host_key_is_refused(sshd_server: SshServer, tmp_path: Path) -> None:
    other = paramiko.Ed25519Key.from_private_key_file(str(sshd_server.client_key_path))
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd_server.port} {other.get_name()} {other.get_base64()}\n")
    client = _client_trusting(wrong)
    with pytest.raises(paramiko.BadHostKeyException):
        _connect(client, sshd_server)
    client.close()


def test_sftp_lists_stats_and_reads_files_by_absolute_path(
    sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    run = tmp_path / "lab" / "run-1"
    run.mkdir(parents=True)
    (run / "meta.json").write_bytes(b'{"status": "running"}')
    (run / "logs.txt").write_bytes(b"epoch 1\n")

    assert sorted(sftp.listdir(str(run))) == ["logs.txt", "meta.json"]
    assert sftp.stat(str(run / "meta.json")).st_size == 21
    with sftp.open(str(run / "logs.txt")) as remote:
        assert remote.read() == b"epoch 1\n"


def test_open_read_close_counts_one_request_of_each_type(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(b"x" * 100)
    sshd_server.reset_request_counts()

    with sftp.open(str(path)) as remote:
        assert remote.read(100) == b"x" * 100

    counts = sshd_server.sftp_request_count()
    assert counts.by_type == {"open": 1, "read": 1, "close": 1}
    assert counts.total == 3


def test_stat_counts_one_request(sshd_server: SshServer, sftp: paramiko.SFTPClient) -> None:
    sshd_server.reset_request_counts()
    sftp.stat("/")
    counts = sshd_server.sftp_request_count()
    assert (counts.total, counts["stat"]) == (1, 1)


def test_reset_forgets_earlier_requests(sshd_server: SshServer, sftp: paramiko.SFTPClient) -> None:
    sftp.stat("/")
    sftp.listdir("/")
    sshd_server.reset_request_counts()
    assert sshd_server.sftp_request_count().total == 0

    sftp.lstat("/")
    assert sshd_server.sftp_request_count().by_type == {"lstat": 1}


def test_counting_after_close_waits_for_the_sessions_to_end(
    sshd_server: SshServer, ssh_client: paramiko.SSHClient
) -> None:
    sshd_server.reset_request_counts()
    for _ in range(3):
        session = ssh_client.open_sftp()
        session.stat("/")
        session.close()

    counts = sshd_server.sftp_request_count(wait_for_close=True)

    assert counts.sessions == 3
    assert counts.by_type == {"stat": 3}
    assert sshd_server.open_sftp_sessions() == set()


def test_max_sessions_one_refuses_a_second_channel(
    sshd_factory: Callable[..., SshServer],
) -> None:
    server = sshd_factory(max_sessions=1)
    client = server.connect()
    first = client.open_sftp()
    with pytest.raises(paramiko.ChannelException):
        client.open_sftp()
    assert first.stat("/").st_mode is not None
    first.close()
    client.close()


def test_ssh_config_reaches_the_server_through_paramiko(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    config_path = sshd_server.write_ssh_config(tmp_path / "ssh_config", "lab")
    entry = paramiko.SSHConfig.from_path(str(config_path)).lookup("lab")
    assert (entry["hostname"], entry["port"], entry["user"]) == (
        "127.0.0.1",
        str(sshd_server.port),
        sshd_server.username,
    )

    client = _client_trusting(Path(entry["userknownhostsfile"]))
    client.connect(
        entry["hostname"],
        port=int(entry["port"]),
        username=entry["user"],
        key_filename=entry["identityfile"],
        allow_agent=False,
        look_for_keys=False,
        timeout=10,
    )
    assert client.open_sftp().stat("/").st_mode is not None
    client.close()


@pytest.mark.skipif(shutil.which("sftp") is None, reason="OpenSSH client (sftp) not installed")
def test_ssh_config_reaches_the_server_through_the_openssh_client(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    config_path = sshd_server.write_ssh_config(tmp_path / "ssh_config", "lab")
    result = subprocess.run(
        ["sftp", "-F", str(config_path), "-o", "BatchMode=yes", "-b", "-", "lab"],
        input=f"ls {tmp_path}\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ssh_config" in result.stdout


def test_missing_sshd_fails_with_an_install_hint() -> None:
    with pytest.raises(SshServerError, match="install openssh-server"):
        SshServer(sshd_path="/nonexistent/sshd").start()


def test_a_server_that_cannot_start_reports_its_log() -> None:
    with pytest.raises(SshServerError, match="NoSuchOption"):
        SshServer(extra_config=["NoSuchOption yes"]).start()

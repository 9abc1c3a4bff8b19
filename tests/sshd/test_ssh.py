"""runicorn.transport.ssh against a real sshd: host keys are verified, never learned, and
authentication never waits for a password."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import paramiko
import pytest

from harness.sshd import SshServer
from runicorn.transport.openssh_shortcuts import speaks_openssh
from runicorn.transport.ssh import (
    AEAD_CIPHERS,
    ChangedHostKeyError,
    SshAuthenticationError,
    SshConfigError,
    UnknownHostKeyError,
    connect,
    fingerprint,
    parse_destination,
    resolve_host,
)

pytestmark = pytest.mark.sshd


def _connect(server: SshServer, known_hosts: Path, **options: object) -> paramiko.SSHClient:
    """Connect with only the test's own key and the given known_hosts."""
    return server.runicorn_connect(known_hosts=known_hosts, **options)


def _server_key(server: SshServer) -> paramiko.PKey:
    return server.host_key()


def test_connects_when_the_host_key_is_known(sshd_server: SshServer) -> None:
    client = _connect(sshd_server, sshd_server.known_hosts_path)
    try:
        _, stdout, _ = client.exec_command("echo ok", timeout=10)
        assert stdout.read().strip() == b"ok"
    finally:
        client.close()


def test_unknown_host_key_is_refused_with_fingerprint_and_how_to_trust_it(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError) as caught:
        _connect(sshd_server, empty)
    message = str(caught.value)
    assert fingerprint(_server_key(sshd_server)) in message
    assert f"ssh-keyscan -p {sshd_server.port} -t ed25519 127.0.0.1 >> {empty}" in message
    assert caught.value.port == sshd_server.port


def test_unknown_host_key_is_not_added_to_known_hosts(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError):
        _connect(sshd_server, empty)
    assert empty.read_text() == ""


def test_changed_host_key_is_refused_as_possible_man_in_the_middle(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    impostor = paramiko.Ed25519Key.from_private_key_file(str(_impostor_key(tmp_path)))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 {impostor.get_base64()}\n")
    with pytest.raises(ChangedHostKeyError) as caught:
        _connect(sshd_server, known)
    message = str(caught.value)
    assert "HAS CHANGED" in message
    assert "man-in-the-middle" in message
    assert fingerprint(impostor) in message
    assert fingerprint(_server_key(sshd_server)) in message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd_server.port}'" in message


def _impostor_key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "impostor"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return path


def test_ssh_config_alias_supplies_hostname_port_user_and_identity(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    client = connect("labserver", config_path=config, system_known_hosts=None, timeout=10.0)
    try:
        transport = client.get_transport()
        assert transport is not None and transport.is_authenticated()
        assert transport.get_username() == sshd_server.username
    finally:
        client.close()


def test_resolve_host_reads_every_supported_config_option(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host lab\n"
        "    HostName 10.1.2.3\n"
        "    Port 2202\n"
        "    User alice\n"
        "    IdentityFile ~/.ssh/id_lab\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2\n"
    )
    resolved = resolve_host("lab", config_path=config, system_known_hosts=None)
    assert (resolved.hostname, resolved.port, resolved.username) == ("10.1.2.3", 2202, "alice")
    assert resolved.identity_files == [str(Path("~/.ssh/id_lab").expanduser())]
    assert resolved.identities_only
    assert resolved.user_known_hosts == [f"{tmp_path}/kh1", f"{tmp_path}/kh2"]
    assert resolved.known_hosts_name == "[10.1.2.3]:2202"


def test_explicit_user_and_port_override_the_config(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host lab\n    HostName 10.1.2.3\n    Port 2202\n    User alice\n")
    resolved = resolve_host("bob@lab", port=22, config_path=config)
    assert (resolved.username, resolved.port, resolved.known_hosts_name) == ("bob", 22, "10.1.2.3")


def test_proxy_jump_is_refused_with_an_equivalent_proxy_command(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host lab\n    ProxyJump gateway\n")
    with pytest.raises(SshConfigError, match="ProxyCommand ssh -W %h:%p gateway"):
        resolve_host("lab", config_path=config)


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("host", (None, "host")),
        ("me@host", ("me", "host")),
        ("me@[::1]", ("me", "::1")),
        ("a@b@host", ("a@b", "host")),
    ],
)
def test_parse_destination(destination: str, expected: tuple[str | None, str]) -> None:
    assert parse_destination(destination) == expected


@pytest.mark.parametrize("destination", ["", "@host", "me@", "host/path", "two words"])
def test_parse_destination_refuses_malformed_input(destination: str) -> None:
    with pytest.raises(SshConfigError):
        parse_destination(destination)


def test_aes_gcm_is_negotiated_with_openssh(sshd_server: SshServer, tmp_path: Path) -> None:
    client = _connect(sshd_server, sshd_server.known_hosts_path)
    try:
        transport = client.get_transport()
        assert transport is not None
        assert (transport.local_cipher, transport.remote_cipher) == (AEAD_CIPHERS[0],) * 2
        sftp = client.open_sftp()
        payload = bytes(range(256)) * 4096  # 1 MiB: many packets under the AEAD cipher
        target = str(tmp_path / "gcm-check")
        with sftp.open(target, "wb") as handle:
            handle.write(payload)
        with sftp.open(target, "rb") as handle:
            assert handle.read() == payload
    finally:
        client.close()


def test_a_server_without_aes_gcm_gets_aes_ctr(sshd_factory) -> None:
    server = sshd_factory(extra_config=["Ciphers aes128-ctr,aes256-ctr"])
    client = _connect(server, server.known_hosts_path)
    try:
        transport = client.get_transport()
        assert transport is not None and transport.local_cipher == "aes128-ctr"
        _, stdout, _ = client.exec_command("echo ok", timeout=10)
        assert stdout.read().strip() == b"ok"
    finally:
        client.close()


def test_password_only_server_fails_fast_instead_of_prompting(sshd_factory, tmp_path: Path) -> None:
    server = sshd_factory(
        extra_config=[
            f"Match User {SshServer().username}",
            "    PubkeyAuthentication no",
            "    PasswordAuthentication yes",
        ]
    )
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            _connect(server, server.known_hosts_path).close()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "connect() hung on a password-only server"
    assert isinstance(outcome[0], SshAuthenticationError)
    assert "never asks for a password" in str(outcome[0])


def test_private_key_material_is_never_logged(
    sshd_server: SshServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = sshd_server.client_key_path.read_text()
    body = "".join(line for line in secret.splitlines() if "PRIVATE KEY" not in line)
    with caplog.at_level(logging.DEBUG):
        _connect(sshd_server, sshd_server.known_hosts_path).close()
    logged = "".join(record.getMessage() for record in caplog.records).replace("\n", "")
    assert body[:40] not in logged
    assert body[-40:] not in logged


def _authorize_new_key(server: SshServer, tmp_path: Path, key: paramiko.PKey, name: str) -> Path:
    path = tmp_path / name
    key.write_private_key_file(str(path))
    with open(server.directory / "authorized_keys", "a", encoding="ascii") as handle:
        handle.write(f"{key.get_name()} {key.get_base64()} {name}\n")
    return path


def test_public_key_authentication_does_not_wait_for_the_service_accept(
    sshd_server: SshServer,
) -> None:
    client = _connect(sshd_server, sshd_server.known_hosts_path)
    try:
        transport = client.get_transport()
        assert transport is not None and transport.is_authenticated()
        # The USERAUTH_REQUEST left right behind the SERVICE_REQUEST: one round trip less.
        assert transport.auth_handler._sent_early is True
    finally:
        client.close()


def test_an_rsa_key_authenticates_with_a_sha2_signature(sshd_factory, tmp_path: Path) -> None:
    server = sshd_factory()
    rsa_key = _authorize_new_key(server, tmp_path, paramiko.RSAKey.generate(2048), "id_rsa")
    client = _connect(server, server.known_hosts_path, identity_files=[rsa_key])
    try:
        transport = client.get_transport()
        assert transport is not None and transport.is_authenticated()
        assert transport._agreed_pubkey_algorithm in ("rsa-sha2-512", "rsa-sha2-256")
    finally:
        client.close()


def test_a_refused_key_is_followed_by_the_next_one(sshd_server: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "id_stranger"
    _write_ed25519(stranger)  # a valid key the server does not know
    client = _connect(
        sshd_server,
        sshd_server.known_hosts_path,
        identity_files=[stranger, sshd_server.client_key_path],
    )
    try:
        assert client.get_transport().is_authenticated()
    finally:
        client.close()


def _write_ed25519(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.write_bytes(data)
    path.chmod(0o600)


def test_only_an_openssh_server_gets_the_round_trip_savings() -> None:
    class FakeTransport:
        remote_version = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"

    assert speaks_openssh(FakeTransport())  # type: ignore[arg-type]
    FakeTransport.remote_version = "SSH-2.0-dropbear_2022.83"
    assert not speaks_openssh(FakeTransport())  # type: ignore[arg-type]


def test_paramiko_starts_without_invoke_and_gets_it_for_a_match_exec(tmp_path: Path) -> None:
    # A fresh process, as the command is: invoke stays out of paramiko's import, and comes in
    # when an ssh_config asks for ``Match exec`` (which then works as with plain paramiko).
    config = tmp_path / "ssh_config"
    config.write_text("Match exec true\n    Port 2222\nHost *\n    User someone\n")
    script = f"""
import sys
from runicorn.transport.paramiko_import import import_paramiko
import_paramiko()
import paramiko
assert "invoke" not in sys.modules and paramiko.config.invoke is None
from runicorn.transport.ssh import resolve_host
plain = resolve_host("lab", config_path=None)
assert "invoke" not in sys.modules and plain.port == 22
resolved = resolve_host("lab", config_path={str(config)!r})
assert resolved.port == 2222 and resolved.username == "someone"
assert "invoke" in sys.modules
import invoke
print("ok")
"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_the_first_sftp_session_asks_for_its_subsystem_before_the_channel_is_confirmed(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    from paramiko.common import MSG_CHANNEL_REQUEST

    from runicorn.transport.sftp_pipeline import open_sftp_client

    (tmp_path / "a.txt").write_bytes(b"hello")
    client = _connect(sshd_server, sshd_server.known_hosts_path)
    try:
        transport = client.get_transport()
        assert transport is not None
        # For each CHANNEL_REQUEST sent: was its channel confirmed by then?
        confirmed: list[bool] = []
        packetizer = transport.packetizer
        send = packetizer.send_message

        def sending(message: paramiko.Message) -> None:
            if message.asbytes()[:1] == bytes([MSG_CHANNEL_REQUEST]):
                newest = max(transport._channels.values(), key=lambda channel: channel.chanid)
                confirmed.append(bool(newest.active))
            send(message)

        packetizer.send_message = sending  # type: ignore[method-assign]
        first = open_sftp_client(transport, root=str(tmp_path), prefetch=["a.txt"], timeout=10)
        second = open_sftp_client(transport, timeout=10)  # not the first: the plain way
        try:
            assert confirmed == [False, True]
            assert first.prefetched.take(str(tmp_path), "a.txt", 255 * 1024) == b"hello"
            assert second.stat(str(tmp_path / "a.txt")).st_size == 5
        finally:
            first.close()
            second.close()
    finally:
        client.close()


def test_a_paramiko_that_needs_invoke_outright_is_imported_the_ordinary_way(
    tmp_path: Path,
) -> None:
    # Should paramiko ever import invoke unconditionally, hiding it must not break the start.
    fake = tmp_path / "paramiko"
    fake.mkdir()
    (fake / "__init__.py").write_text("import invoke\nNEEDS = invoke.__name__\n")
    script = """
import sys
from runicorn.transport.paramiko_import import import_paramiko
import_paramiko()
import paramiko
assert paramiko.NEEDS == "invoke" and sys.modules["invoke"] is not None
print("ok")
"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr

"""SSH security of ``runicorn sync`` against a real sshd (issue 5, item 7).

A changed host key is refused with exit code 4 and nothing is learned or written; a whole verbose
sync never logs private key material or a key's passphrase; a server that only offers password or
keyboard-interactive authentication, or a key that only a passphrase opens, makes a
non-interactive run fail fast (a watchdog bounds every such run). Proven elsewhere: the library's
changed/unknown host key errors (test_ssh.py), the CLI's exit code 4 with "HAS CHANGED"
(test_cli_sync.py::test_changed_host_key_exits_4), ``connect()`` failing fast on a password-only
server and not logging the key during ``connect()`` (test_ssh.py::test_password_only_server_fails_
fast_instead_of_prompting, ::test_private_key_material_is_never_logged).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.lab import assert_cache_equals_server, make_lab
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import PYTHON, Backend, load_backend
from runicorn.transport.ssh import fingerprint

pytestmark = pytest.mark.sshd

WATCHDOG_SECONDS = 60
PASSPHRASE = "correct-horse-battery-staple-7f3a"
# Runs that fail before any engine work are not repeated per backend (pure Python builds
# their lab).


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ~/.ssh keys, config or agent of the developer's leak into a test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def _target_args(server: SshServer, root: Path, cache: Path, tmp_path: Path) -> list[str]:
    return [
        "sync",
        f"{server.username}@127.0.0.1:{root}",
        str(cache),
        "--port",
        str(server.port),
        "--known-hosts",
        str(server.known_hosts_path),
        "--ssh-config",
        str(tmp_path / "no_ssh_config"),
    ]


def _secret_fragments(key_path: Path) -> list[str]:
    """Strings that would betray the private key: each base64 line of the file, and the raw
    32-byte seed in hex and base64."""
    text = key_path.read_text()
    lines = [line for line in text.splitlines() if line and "PRIVATE KEY" not in line]
    key = serialization.load_ssh_private_key(text.encode(), password=None)
    seed = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return [*lines, seed.hex(), base64.b64encode(seed).decode().rstrip("=")]


def _run_cli_process(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in its own session, as cron would run it: no terminal, and a stdin that stays
    open but never answers. A prompt would block until the watchdog kills it."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    try:
        return subprocess.run(
            [sys.executable, "-m", "runicorn", *args],
            stdin=subprocess.PIPE,
            capture_output=True,
            text=True,
            env=env,
            timeout=WATCHDOG_SECONDS,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"runicorn sync was still waiting after {WATCHDOG_SECONDS} s (a prompt?)")


# --------------------------------------------------------------------------- host keys


def test_changed_host_key_exits_4_naming_both_keys_and_writes_nothing(
    sshd_server: SshServer, tmp_path: Path, empty_home: Path
) -> None:
    impostor = Ed25519PrivateKey.generate().public_key()
    impostor_line = impostor.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {impostor_line}\n")
    cache = tmp_path / "cache"
    args = _target_args(sshd_server, tmp_path, cache, tmp_path)
    args[args.index("--known-hosts") + 1] = str(known)

    result = CliRunner().invoke(
        main, [*args, "-i", str(sshd_server.client_key_path), "--json"], catch_exceptions=False
    )

    assert result.exit_code == 4
    assert "HAS CHANGED" in result.stderr
    assert (
        fingerprint(
            paramiko.PKey.from_type_string(
                "ssh-ed25519", base64.b64decode(impostor_line.split()[1])
            )
        )
        in result.stderr
    )
    server_key = sshd_server.host_key()
    assert fingerprint(server_key) in result.stderr
    assert orjson.loads(result.stdout)["exit_code"] == 4
    assert known.read_text() == f"[127.0.0.1]:{sshd_server.port} {impostor_line}\n"
    assert not cache.exists()


# --------------------------------------------------------------------------- nothing secret logged


def _logged_text(result, caplog: pytest.LogCaptureFixture) -> str:
    records = "\n".join(
        f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records
    )
    return "\n".join([result.stdout, result.stderr, records])


def test_verbose_sync_logs_no_private_key_material(
    sshd_server: SshServer,
    tmp_path: Path,
    backend: Backend,
    cli_backend: Backend,
    empty_home: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lab = make_lab(tmp_path, backend, runs=3)
    cache = tmp_path / "cache"
    args = _target_args(sshd_server, lab.root, cache, tmp_path)

    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(
            main, [*args, "-i", str(sshd_server.client_key_path), "-v"], catch_exceptions=False
        )

    assert result.exit_code == 0, result.stderr
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # really verbose
    logged = _logged_text(result, caplog)
    leaked = [piece for piece in _secret_fragments(sshd_server.client_key_path) if piece in logged]
    assert leaked == []
    assert_cache_equals_server(lab.root, cache)


@pytest.fixture
def passphrase_key(sshd_server: SshServer, tmp_path: Path) -> Iterator[Path]:
    """A passphrase-protected key the server accepts (added to its authorized_keys)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = tmp_path / "locked_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-C", "locked", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    authorized = sshd_server.directory / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + key.with_suffix(".pub").read_text())
    try:
        yield key
    finally:
        authorized.write_text(original)


@pytest.fixture
def agent_with(passphrase_key: Path, tmp_path: Path) -> Iterator[str]:
    """An ssh-agent holding the passphrase key (unlocked through SSH_ASKPASS); its socket."""
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("ssh-agent / ssh-add are not installed")
    socket_path = tmp_path / "agent.sock"
    started = subprocess.run(
        ["ssh-agent", "-s", "-a", str(socket_path)], check=True, capture_output=True, text=True
    )
    pid = int(started.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        askpass = tmp_path / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho '{PASSPHRASE}'\n")
        askpass.chmod(0o700)
        env = {
            **os.environ,
            "SSH_AUTH_SOCK": str(socket_path),
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": ":0",
        }
        subprocess.run(
            ["ssh-add", str(passphrase_key)],
            check=True,
            capture_output=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=WATCHDOG_SECONDS,
        )
        yield str(socket_path)
    finally:
        os.kill(pid, 15)


def test_passphrase_key_in_an_agent_syncs_and_the_passphrase_is_never_logged(
    sshd_server: SshServer,
    tmp_path: Path,
    backend: Backend,
    cli_backend: Backend,
    empty_home: Path,
    passphrase_key: Path,
    agent_with: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", agent_with)
    lab = make_lab(tmp_path, backend, runs=3)
    cache = tmp_path / "cache"
    args = _target_args(sshd_server, lab.root, cache, tmp_path)

    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(
            main, [*args, "-i", str(passphrase_key), "-v"], catch_exceptions=False
        )

    assert result.exit_code == 0, result.stderr
    logged = _logged_text(result, caplog)
    assert PASSPHRASE not in logged
    body = [line for line in passphrase_key.read_text().splitlines() if "PRIVATE" not in line]
    assert [line for line in body if line and line in logged] == []
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- never a prompt


def test_passphrase_key_without_an_agent_fails_fast_instead_of_prompting(
    sshd_server: SshServer, tmp_path: Path, passphrase_key: Path, empty_home: Path
) -> None:
    lab = make_lab(tmp_path, load_backend(PYTHON), runs=1)
    args = _target_args(sshd_server, lab.root, tmp_path / "cache", tmp_path)

    result = _run_cli_process([*args, "-i", str(passphrase_key)], empty_home)

    assert result.returncode == 1, result.stderr
    assert "never asks for a password" in result.stderr
    assert PASSPHRASE not in result.stderr + result.stdout
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "methods",
    [
        ["PasswordAuthentication yes", "KbdInteractiveAuthentication no"],
        ["PasswordAuthentication no", "KbdInteractiveAuthentication yes"],
    ],
    ids=["password", "keyboard-interactive"],
)
def test_server_without_key_authentication_makes_the_cli_fail_fast(
    sshd_factory, tmp_path: Path, empty_home: Path, methods: list[str]
) -> None:
    server = sshd_factory(
        extra_config=[f"Match User {SshServer().username}", "    PubkeyAuthentication no"]
        + [f"    {line}" for line in methods]
    )
    lab = make_lab(tmp_path, load_backend(PYTHON), runs=1)
    args = _target_args(server, lab.root, tmp_path / "cache", tmp_path)

    result = _run_cli_process([*args, "-i", str(server.client_key_path)], empty_home)

    assert result.returncode == 1, result.stderr
    assert "never asks for a password" in result.stderr
    assert not (tmp_path / "cache").exists()

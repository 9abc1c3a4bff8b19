"""What ``runicorn sync`` draws while it works, against a real OpenSSH server on both
backends: progress rows (rich) when stderr is a terminal, and nothing but plain lines --
no bar, no escape code -- when it is not.

The terminal is a pseudo-terminal on the child's stderr; its stdout stays a pipe, as when a
user redirects the summary.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.lab import Lab, assert_cache_equals_server
from harness.sshd import SshServer

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=6, scale=0.02)]

DEADLINE_SECONDS = 60.0


def _env(backend, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNICORN_PURE_PYTHON", "NO_COLOR")}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    env.update(TERM="xterm-256color", COLUMNS="160", LINES="40", **extra)
    return env


def _sync_command(lab: Lab, cache: Path, config: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "runicorn", "sync", f"labserver:{lab.root}", str(cache)]
    return [*command, "--ssh-config", str(config), *extra]


def _run_on_a_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``command`` with its stderr on a pseudo-terminal; exit code, stdout, terminal."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL
        ) as child:
            os.close(follower)
            follower = -1
            stdout, _ = child.communicate(timeout=DEADLINE_SECONDS)
        reader.join(DEADLINE_SECONDS)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    return child.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def ssh_config(sshd_server: SshServer, tmp_path: Path) -> Path:
    return sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")


def test_one_shot_sync_on_a_terminal_draws_progress_rows_then_erases_them(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    code, stdout, terminal = _run_on_a_terminal(
        _sync_command(lab, cache, ssh_config), _env(backend)
    )
    assert code == 0, terminal
    assert "\x1b[2K" in terminal  # rich redrew (and finally erased) its row
    drawn = terminal.replace("\x1b[2K", "\n").replace("\r", "\n")
    assert any(line.startswith("manifest:") for line in drawn.splitlines()), terminal
    assert "files" in drawn
    # stdout is a pipe: the summary alone, plain
    assert stdout.count("\n") == 1 and "synced" in stdout
    assert "\x1b" not in stdout and "\r" not in stdout
    assert_cache_equals_server(lab.root, cache)


def test_one_shot_sync_off_a_terminal_writes_no_bar_and_no_escape_code(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    done = subprocess.run(
        _sync_command(lab, cache, ssh_config),
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert done.stdout.startswith(f"labserver:{lab.root}: synced ")
    assert_cache_equals_server(lab.root, cache)

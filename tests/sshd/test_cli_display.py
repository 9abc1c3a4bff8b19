"""What ``runicorn sync`` draws while it works, against a real OpenSSH server on both
backends: progress rows (rich) when stderr is a terminal, and nothing but plain lines --
no bar, no escape code -- when it is not; with ``--watch``, the live table on a terminal,
plain lines off one, JSON Lines with ``--json``.

The terminal is a pseudo-terminal; for the one-shot sync only its stderr is on it (stdout
stays a pipe, as when a user redirects the summary), for the watch both are.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from harness.child_lines import ChildLines
from harness.lab import Lab, assert_cache_equals_server
from harness.sshd import SshServer
from runicorn.manifest import ManifestType

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
    # log lines only (the lab's manifest is years old while runs are running: a warning)
    assert all(line.startswith("WARNING ") for line in done.stderr.splitlines()), done.stderr
    assert "\x1b" not in done.stderr + done.stdout and "\r" not in done.stderr + done.stdout
    assert done.stdout.startswith(f"labserver:{lab.root}: synced ")
    assert_cache_equals_server(lab.root, cache)


def test_one_shot_sync_off_a_terminal_does_not_even_import_rich(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    # A sync from cron, a pipe or a script draws nothing, so it need not pay for rich.
    overrides = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in _env(backend).items() if k not in overrides}
    command = _sync_command(lab, cache, ssh_config, "--json")
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "runicorn.sync.client" in imported
    assert not [name for name in imported if name == "rich" or name.startswith("rich.")]


# --- runicorn sync --watch ------------------------------------------------------------------

WATCH_OPTIONS = ("--watch", "--interval", "0.02", "--full-interval", "0.5")
APPENDED = b'{"step": 777, "loss": 0.125}\n'


def _append_a_step(lab: Lab) -> str:
    """Append a metrics line to a running run's events.jsonl and publish the active
    manifest; the run's key (``project/name/run_id``)."""
    run = next(r for r in lab.info.listed_runs if r.status == "running")
    with open(run.path / "events.jsonl", "ab") as handle:
        handle.write(APPENDED)
    lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
    return f"{run.project}/{run.name}/{run.path.name}"


class _Terminal:
    """A pseudo-terminal of 40 x 160 as a child's stdout and stderr, read on a thread."""

    def __init__(self) -> None:
        self.leader, self.follower = pty.openpty()
        fcntl.ioctl(self.follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.text = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # EIO: every writer closed its end
                chunk = b""
            with self._changed:
                if not chunk:
                    self.text += "\0"  # the end
                    self._changed.notify_all()
                    return
                self.text += chunk.decode(errors="replace")
                self._changed.notify_all()

    def wait_for(self, condition: Callable[[str], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        with self._changed:
            while not condition(self.text):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.text.endswith("\0"):
                    pytest.fail(f"not on the terminal; it shows {self.text[-3000:]!r}")
                self._changed.wait(remaining)

    def close(self) -> None:
        if self.follower >= 0:
            os.close(self.follower)
            self.follower = -1
        self._reader.join(DEADLINE_SECONDS)
        os.close(self.leader)


def _add_a_run_named_with_markup(lab: Lab) -> str:
    """A copy of a finished run under project ``[bold]lab`` and name ``[red]forged`` (rich
    markup, which the name rule allows); its key."""
    run = next(r for r in lab.info.listed_runs if r.status == "finished")
    target = lab.root / "[bold]lab" / "[red]forged" / "runs" / run.path.name
    shutil.copytree(run.path, target)
    lab.publish(ManifestType.FULL)
    return f"[bold]lab/[red]forged/{run.path.name}"


def test_watch_on_a_terminal_shows_the_live_table_of_the_runs_changing(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    marked_up = _add_a_run_named_with_markup(lab)
    lab.publish(ManifestType.ACTIVE)
    terminal = _Terminal()
    try:
        with subprocess.Popen(
            _sync_command(lab, cache, ssh_config, *WATCH_OPTIONS),
            env=_env(backend),
            stdin=subprocess.DEVNULL,
            stdout=terminal.follower,
            stderr=terminal.follower,
        ) as child:
            try:
                terminal.wait_for(lambda text: "run " in text and "metrics" in text)
                key = _append_a_step(lab)
                terminal.wait_for(lambda text: "loss=0.125" in text)
                child.send_signal(signal.SIGTERM)
                code = child.wait(DEADLINE_SECONDS)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    finally:
        terminal.close()
    assert code == 0
    text = terminal.text
    assert "watching labserver:" in text
    row = next(line for line in text.splitlines() if key in line and "loss=0.125" in line)
    assert "running" in row and " 777 " in row
    assert marked_up in text  # as written, not as styles (nor a style's escape codes)
    assert "\x1b[1m" + "lab" not in text and "\x1b[31m" + "forged" not in text
    assert "stopped; the cache is consistent" in text
    assert_cache_equals_server(lab.root, cache)


def _watch_off_a_terminal(
    lab: Lab, cache: Path, ssh_config: Path, backend, *extra: str
) -> tuple[list[str], str, str]:
    """Run the watch with stdout and stderr on pipes until a pass applies the appended
    line, then SIGTERM it; the lines seen up to that pass, stdout's rest and stderr."""
    lab.publish(ManifestType.ACTIVE)
    with subprocess.Popen(
        _sync_command(lab, cache, ssh_config, *WATCH_OPTIONS, *extra),
        env=_env(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        out = ChildLines(child.stdout, DEADLINE_SECONDS)  # type: ignore[arg-type]
        try:
            out.expect(lambda line: "files_synced" in line or "revision" in line)
            key = _append_a_step(lab)
            out.expect(lambda line: key in line and "777" in line)
            child.send_signal(signal.SIGTERM)
            assert child.stderr is not None
            stderr = child.stderr.read()
            child.wait(DEADLINE_SECONDS)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            out.join()
    assert child.returncode == 0, stderr
    return out.seen, key, stderr


def test_watch_off_a_terminal_prints_plain_lines_per_pass_and_run(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    seen, key, stderr = _watch_off_a_terminal(lab, cache, ssh_config, backend)
    line = next(line for line in seen if key in line and "777" in line)
    # the newest value of every metric: loss from the appended line, the others older
    assert line.startswith(f"  {key} running step 777 loss=0.125 acc=")
    assert re.search(r": 1 files, \d+ B$", line.rstrip("\n"))
    assert any(" active revision " in line for line in seen)
    for text in (*seen, stderr):
        assert "\x1b" not in text and "\r" not in text
    assert_cache_equals_server(lab.root, cache)


def test_watch_with_json_prints_one_object_per_pass_with_its_runs(
    lab: Lab, cache: Path, ssh_config: Path, backend
):
    seen, key, _stderr = _watch_off_a_terminal(lab, cache, ssh_config, backend, "--json")
    documents = [orjson.loads(line) for line in seen]
    first = documents[0]
    assert first["files_synced"] > 0 and len(first["runs"]) == len(lab.info.listed_runs)
    assert {run["change"] for run in first["runs"]} == {"added"}
    applied = documents[-1]
    assert (applied["manifest_type"], applied["files_synced"]) == ("active", 1)
    (run,) = applied["runs"]
    assert run["key"] == key and run["change"] == "changed" and run["status"] == "running"
    assert (run["files"], run["step"], run["metrics"]["loss"]) == (1, 777, 0.125)
    assert run["bytes"] >= len(APPENDED)
    assert_cache_equals_server(lab.root, cache)

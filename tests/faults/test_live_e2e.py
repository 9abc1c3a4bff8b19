"""The whole live path -- ``generate-manifest --watch`` on the server, ``sync --watch`` over a
real sshd -- with both processes killed (SIGKILL) and restarted while runs keep writing: the
cache still converges to the server's state, with inotify and with polling forced (the same
cache either way), on both backends.

Every wait is for a condition re-checked after each line a child prints, with a deadline.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.child_lines import ChildLines
from harness.lab import Lab, cache_files, server_files, temp_files
from harness.sshd import SshServer

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=6, scale=0.02, publish=False)]

DEADLINE_SECONDS = 60.0


def _env(backend) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    return env


class Child:
    """A ``runicorn`` child process with its stdout and stderr read on threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runicorn", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.out = ChildLines(self.process.stdout, DEADLINE_SECONDS)
        self.err = ChildLines(self.process.stderr, DEADLINE_SECONDS)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(DEADLINE_SECONDS)
        self._close()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(DEADLINE_SECONDS)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._close()

    def _close(self) -> None:
        self.out.join()
        self.err.join()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _publisher(lab: Lab, source: str, env: dict[str, str]) -> Child:
    args = ["generate-manifest", "--root", str(lab.root), "--watch", "--full-interval", "0"]
    if source == "poll":
        args += ["--poll", "--poll-interval", "0.1"]
    child = Child(args, env)
    child.err.expect(lambda line: "manifests up to date" in line)
    return child


def _client(lab: Lab, cache: Path, config: Path, env: dict[str, str]) -> Child:
    args = ["sync", f"labserver:{lab.root}", str(cache), "--ssh-config", str(config)]
    args += ["--watch", "--json", "--interval", "0.05", "--full-interval", "0.3"]
    child = Child(args, env)
    child.out.expect(lambda line: line.startswith("{"))  # its first pass
    return child


def _converged(lab: Lab, cache: Path) -> Callable[[], bool]:
    """Every synced file of the server is in the cache, byte for byte; the cache may keep
    more (runs the server no longer has: there is no --delete)."""

    def check() -> bool:
        cached = cache_files(cache)
        return all(cached.get(path) == data for path, data in server_files(lab.root).items())

    return check


def _wait_for(condition: Callable[[], bool], client: Child) -> None:
    """Until ``condition`` holds, re-checked after each line the client prints."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail("the cache never converged to the server's state")
        try:
            client.out.lines.get(timeout=remaining)
        except queue.Empty:
            continue


def _append(path: Path, step: int) -> None:
    with open(path, "a") as handle:
        handle.write(f'{{"step": {step}, "loss": 0.5}}\n')


@pytest.mark.parametrize("source", ["inotify", "poll"])
def test_killed_publisher_and_client_lose_nothing(
    lab: Lab, cache: Path, sshd_server: SshServer, tmp_path: Path, backend, source: str
):
    env = _env(backend)
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    running = [r for r in lab.info.listed_runs if r.status == "running"]
    finished = [r for r in lab.info.listed_runs if r.status != "running"]
    events = running[0].path / "events.jsonl"
    publisher = _publisher(lab, source, env)
    client = _client(lab, cache, config, env)
    try:
        _append(events, 1)
        _wait_for(_converged(lab, cache), client)

        publisher.kill()  # mid-stream: the writes go on without it
        _append(events, 2)
        publisher = _publisher(lab, source, env)
        _append(events, 3)

        client.kill()
        _append(events, 4)
        shutil.copytree(running[0].path, running[0].path.with_name("run_new"))
        os.rename(finished[0].path, finished[0].path.with_name("run_renamed"))
        shutil.rmtree(finished[1].path)
        client = _client(lab, cache, config, env)
        _append(events, 5)
        publisher.process.send_signal(signal.SIGHUP)  # a rescan, as after a lost event
        _append(events, 6)
        _wait_for(_converged(lab, cache), client)
    finally:
        codes = (client.terminate(), publisher.terminate())
    assert codes == (0, 0)
    assert _converged(lab, cache)()
    assert (cache / finished[1].rel / "meta.json").exists()  # kept: no --delete
    assert (cache / finished[0].rel / "meta.json").exists()  # its old name too
    assert temp_files(cache) == []

"""Today's upstream Runicorn, for tests: its SDK writing runs and its viewer serving them.

The upstream package is also called ``runicorn``, so it never shares an interpreter with
ours: each pinned version gets a virtual environment of its own (``pip install
runicorn==X``), kept between test sessions under ``~/.cache/runicorn-tests/upstream-X``
(``RUNICORN_TEST_UPSTREAM_CACHE`` moves it) and rebuilt when it is broken. Everything upstream
runs as a subprocess with its own ``HOME`` (it writes a user config there) and a clean
environment, and the viewer listens on 127.0.0.1 only.

Usage::

    sdk = upstream_sdk("0.7.2")                 # builds or reuses the venv
    runs = sdk.train(root, "initial", home)     # [(run_id, status), ...]
    with sdk.viewer(root, home) as viewer:
        viewer.get_json("/api/runs")

A venv that cannot be built (no network, no package index) raises :class:`UpstreamError`
with pip's own message: the tests that need it fail, they never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "LOOPBACK",
    "SDK_VERSIONS",
    "VIEWER_VERSION",
    "HeldRun",
    "UpstreamError",
    "UpstreamSdk",
    "Viewer",
    "upstream_sdk",
]

SDK_VERSIONS = ("0.5.3", "0.7.2")
"""The pinned upstream versions whose SDK writes test roots (0.5.x layout, 0.6+ layout)."""
VIEWER_VERSION = "0.7.2"
"""The viewer users run today; it reads both layouts."""
LOOPBACK = "127.0.0.1"
TRAIN_SCRIPT = Path(__file__).with_name("upstream_train.py")

_READY_MARKER = ".runicorn-tests-ready"
_PIP_TIMEOUT = 900.0
_SCRIPT_TIMEOUT = 120.0
_VIEWER_START_TIMEOUT = 60.0
_VIEWER_STOP_TIMEOUT = 10.0
_HTTP_TIMEOUT = 30.0
# What a subprocess of the upstream venv must not inherit from the test runner: our
# interpreter's paths (``pytest`` puts ``tests`` on them) and its venv.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "RUNICORN_DIR")


class UpstreamError(RuntimeError):
    """The upstream package could not be installed or run; the message says what failed."""


def _cache_dir() -> Path:
    explicit = os.environ.get("RUNICORN_TEST_UPSTREAM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path.home() / ".cache" / "runicorn-tests"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment an upstream subprocess runs in: ours minus Python paths, with its own
    ``HOME`` and config directory (the SDK and viewer write a user config there)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


@dataclass(frozen=True)
class UpstreamSdk:
    """One upstream version installed in a virtual environment of its own."""

    version: str
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def runicorn(self) -> Path:
        return self.venv / "bin" / "runicorn"

    def train(self, storage: Path, phase: str, home: Path) -> list[tuple[str, str]]:
        """Run one phase of the training script (see ``upstream_train.py``) with ``storage``
        as the SDK's root; ``[(run_id, status), ...]`` of the runs it made. The ``killed``
        phase's process dies by SIGKILL, as planned."""
        home.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [str(self.python), str(TRAIN_SCRIPT), str(storage), phase],
            cwd=home,
            env=clean_env(home, RUNICORN_DIR=str(storage)),
            capture_output=True,
            text=True,
            timeout=_SCRIPT_TIMEOUT,
            check=False,
        )
        expected = -signal.SIGKILL if phase == "killed" else 0
        if result.returncode != expected:
            raise UpstreamError(
                f"the runicorn {self.version} training script (phase {phase!r}) exited with "
                f"{result.returncode}, expected {expected}:\n{result.stderr[-4000:]}"
            )
        return _parse_runs(result.stdout)

    def hold(self, storage: Path, home: Path) -> HeldRun:
        """Start a run that stays running (see :class:`HeldRun`); returns once its first
        steps are on disk."""
        home.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [str(self.python), str(TRAIN_SCRIPT), str(storage), "hold"],
            cwd=home,
            env=clean_env(home, RUNICORN_DIR=str(storage)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        held = HeldRun(process)
        try:
            held.wait_ready()
        except BaseException:
            held.close()
            raise
        return held

    @contextlib.contextmanager
    def viewer(self, storage: Path, home: Path) -> Iterator[Viewer]:
        """The upstream viewer serving ``storage`` on 127.0.0.1, stopped when the block ends."""
        viewer = Viewer(self, storage, home)
        viewer.start()
        try:
            yield viewer
        finally:
            viewer.stop()


def _parse_runs(stdout: str) -> list[tuple[str, str]]:
    return [
        (match.group(1), match.group(2))
        for match in re.finditer(r"^RUN (\S+) (\S+)$", stdout, flags=re.MULTILINE)
    ]


class HeldRun:
    """A training process whose run stays "running": :meth:`step` makes it log one more step
    (and returns when it is on disk); :meth:`close` lets it finish and waits for it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.run_id = ""

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise UpstreamError(f"the held training run exited early:\n{stderr[-4000:]}")
        return line.strip()

    def wait_ready(self) -> None:
        while True:
            line = self._line()
            if line.startswith("RUN "):
                self.run_id = line.split()[1]
            if line == "READY":
                return

    def step(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        while not self._line().startswith("STEP "):
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=_SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> HeldRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class Viewer:
    """``runicorn viewer --storage DIR --host 127.0.0.1 --port N`` of an upstream venv."""

    sdk: UpstreamSdk
    storage: Path
    home: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default=Path())

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "viewer.log"
        last_error = ""
        for _attempt in range(3):  # a port taken between probing and binding: try another
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [
                        str(self.sdk.runicorn),
                        "viewer",
                        "--storage",
                        str(self.storage),
                        "--host",
                        LOOPBACK,
                        "--port",
                        str(self.port),
                    ],
                    cwd=self.home,
                    env=clean_env(self.home),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                self._wait_healthy()
                return
            except UpstreamError as error:
                last_error = str(error)
                self.stop()
        raise UpstreamError(last_error)

    def _wait_healthy(self) -> None:
        """Poll ``/api/health`` until it answers for our storage (or the viewer exits)."""
        assert self.process is not None
        deadline = time.monotonic() + _VIEWER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UpstreamError(
                    f"the runicorn {self.sdk.version} viewer exited with "
                    f"{self.process.returncode} while starting:\n{self.log()}"
                )
            try:
                health = self.get_json("/api/health", timeout=2.0)
            except (OSError, ValueError):
                time.sleep(0.05)  # not listening yet
                continue
            if health.get("status") == "ok":
                return
        raise UpstreamError(
            f"the runicorn {self.sdk.version} viewer did not answer /api/health within "
            f"{_VIEWER_START_TIMEOUT:.0f} s:\n{self.log()}"
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it ignores it (it may, with log websockets open)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_VIEWER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # -- HTTP ---------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = _HTTP_TIMEOUT
    ) -> tuple[int, bytes]:
        """``(status, body)`` of one request to the viewer (HTTP errors are returned)."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str, *, timeout: float = _HTTP_TIMEOUT) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ValueError(f"GET {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def get_bytes(self, path: str) -> bytes:
        status, body = self.request("GET", path)
        if status != 200:
            raise ValueError(f"GET {path} answered {status}: {body[:500]!r}")
        return body

    def wait_for_runs(self, run_ids: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        """``/api/runs`` once it lists every id in ``run_ids``: the viewer indexes the files
        it finds at start-up on a background thread, so its first answers may be partial."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.get_json("/api/runs")
            if run_ids <= {run["id"] for run in runs}:
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the viewer on {self.storage} lists {sorted(r['id'] for r in runs)}, "
                    f"not all of {sorted(run_ids)}, after {timeout:.0f} s"
                )
            time.sleep(0.05)


# -- building the virtual environments ---------------------------------------------------------

_built: dict[str, UpstreamSdk | UpstreamError] = {}


def upstream_sdk(version: str) -> UpstreamSdk:
    """The virtual environment with ``runicorn==version``: reused when it works, (re)built
    otherwise, under a lock so parallel sessions build it once. A build that failed is not
    tried again in the same session: every later caller gets the same error at once."""
    known = _built.get(version)
    if isinstance(known, UpstreamError):
        raise known
    if known is not None:
        return known
    base = _cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    venv = base / f"upstream-{version}"
    try:
        with open(base / f"upstream-{version}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _venv_works(venv, version):
                _build(venv, version)
    except UpstreamError as error:
        _built[version] = error
        raise
    sdk = UpstreamSdk(version, venv)
    _built[version] = sdk
    return sdk


def _venv_works(venv: Path, version: str) -> bool:
    marker = venv / _READY_MARKER
    try:
        if marker.read_text().strip() != version:
            return False
    except OSError:
        return False
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('runicorn'))",
        ],
        capture_output=True,
        text=True,
        env=clean_env(Path.home()),
        timeout=60,
        check=False,
    )
    return (
        probe.returncode == 0
        and probe.stdout.strip() == version
        and (venv / "bin" / "runicorn").exists()
    )


def _build(venv: Path, version: str) -> None:
    """Build in place (a venv's scripts name their interpreter by absolute path); the ready
    marker is written last, so an interrupted build is rebuilt next time."""
    shutil.rmtree(venv, ignore_errors=True)
    _checked(
        [sys.executable, "-m", "venv", str(venv)],
        f"could not create a virtual environment for runicorn {version} at {venv}",
    )
    _checked(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            f"runicorn=={version}",
        ],
        f"could not install runicorn=={version} from the package index into {venv} "
        "(the upstream tests need network access to the package index, as CI has)",
    )
    (venv / _READY_MARKER).write_text(version)


def _checked(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=clean_env(Path.home()),
            timeout=_PIP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UpstreamError(f"{what}: {error}") from error
    if result.returncode != 0:
        output = "\n".join(
            line
            for line in (result.stderr + result.stdout).splitlines()
            if "is ignored: it is neither a file nor a directory" not in line
        )
        raise UpstreamError(f"{what}: exit code {result.returncode}\n{output[-4000:]}")

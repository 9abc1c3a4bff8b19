"""The package without the POSIX-only parts of the standard library, as on macOS and
Windows clients: no ``fcntl`` (Windows), no ``resource``, no ``os.pread``/``os.pwrite``.

CI cannot run those systems, so their paths run here: a child Python whose
``sitecustomize`` (tests/harness/portable/) takes those modules and calls away and stands in
for ``msvcrt.locking`` imports the client, then runs the local-directory sync tests; the
Windows and macOS name rules are plain functions tested for both platforms in
tests/unit/test_client_names.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
_PORTABLE = _TESTS / "harness" / "portable"

_PROBE = """
import os, sys
assert sys.modules.get("fcntl") is None and not hasattr(os, "pread")
import runicorn, runicorn.cli.sync, runicorn.cli.runs, runicorn.cli.doctor, runicorn.cli.demo
import runicorn.sync.client, runicorn.sync.service, runicorn.transport.local_remote
import runicorn.transport.sftp_remote, runicorn.remote_storage, runicorn.manifest
from runicorn._sys import fileio, locking, fd_budget
print(locking.LOCK_KIND, fileio.pread.__name__, fileio.pwrite.__name__, fd_budget.soft_limit())
"""


def _pure_forced() -> bool:
    return os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PORTABLE), env.get("PYTHONPATH", "")])
    return env


def test_the_client_imports_without_fcntl_resource_and_pread() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["msvcrt", "_seek_read", "_seek_write", "None"]


def test_local_directory_syncs_pass_on_the_portable_paths() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(_TESTS / "unit" / "test_runs_table.py"),
            str(_TESTS / "unit" / "test_run_selection.py"),
            str(_TESTS / "unit" / "test_delta_sync.py"),
            # The backend is not what differs here: one is enough (the compiled one, unless
            # pure Python is forced); the two many-step histories add a minute and nothing
            # the other syncs lack.
            "--no-native" if _pure_forced() else "--only-native",
            "-k",
            "not equals_a_full_sync and not restricted_to_the_selection",
        ],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout

"""The package without the POSIX-only parts of the standard library, as on macOS and
Windows clients: no ``fcntl`` (Windows), no ``resource``, no ``os.pread``/``os.pwrite``.

CI cannot run those systems, so their paths run here: a child Python whose
``sitecustomize`` (tests/harness/portable/) takes those modules and calls away and stands in
for ``msvcrt.locking`` imports the client, then runs the local-directory sync tests; with
``dir_fd``, ``O_NOFOLLOW``, ``O_DIRECTORY`` and directory descriptors taken away too (as on
Windows), the cache tree, the atomic writer and the local remote take their path form
(:mod:`runicorn._sys.dirs`), and the cache and escape tests run on it, links included; the
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


def _child_env(*, no_dir_fd: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PORTABLE), env.get("PYTHONPATH", "")])
    if no_dir_fd:
        env["RUNICORN_TEST_NO_DIR_FD"] = "1"
    return env


def _backend_option() -> str:
    # The backend is not what differs here: one per CI pass (the compiled one, or pure
    # Python when it is forced), so the two passes cover both.
    return "--no-native" if _pure_forced() else "--only-native"


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


def _child_pytest(*arguments: str, no_dir_fd: bool = False) -> None:
    """Run pytest on ``arguments`` in the child Python; every test it selects must pass."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments],
        env=_child_env(no_dir_fd=no_dir_fd),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_local_directory_syncs_pass_on_the_portable_paths() -> None:
    _child_pytest(
        str(_TESTS / "unit" / "test_runs_table.py"),
        str(_TESTS / "unit" / "test_run_selection.py"),
        str(_TESTS / "unit" / "test_delta_sync.py"),
        # The two many-step histories add a minute and nothing the other syncs lack.
        _backend_option(),
        "-k",
        "not equals_a_full_sync and not restricted_to_the_selection",
    )


_NO_DIR_FD_PROBE = """
import os
from runicorn._sys import dirs
import runicorn.sync.client, runicorn.transport.local_remote
assert not any(hasattr(os, flag) for flag in ("O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC"))
print(dirs.USE_DIR_FD)
"""


def test_without_dir_fd_the_path_form_is_chosen() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _NO_DIR_FD_PROBE],
        env=_child_env(no_dir_fd=True),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def test_cache_and_escape_tests_pass_without_dir_fd() -> None:
    """Every call that would still use a descriptor of a directory fails in the child as
    it does on Windows, so these pass only on the path form; the link tests among them
    (a link in the cache, on the served tree, at the lock or manifest directory) show it
    refuses what the descriptor form refuses."""
    _child_pytest(
        str(_TESTS / "sshd" / "test_cache_manager.py"),
        str(_TESTS / "sshd" / "test_case_twins.py"),
        str(_TESTS / "faults" / "test_escapes_and_bounds.py"),
        str(_TESTS / "faults" / "test_cache_side_failures.py"),
        str(_TESTS / "faults" / "test_hostile_trees.py"),
        str(_TESTS / "faults" / "test_files_deleted_in_listed_runs.py"),
        _backend_option(),
        # Left out, for what the child lacks rather than the path form: the memory cap
        # needs ``resource``; the stand-in for Windows's lock is a POSIX record lock,
        # which one process never conflicts with; the 1500-level tree is built with
        # ``O_DIRECTORY`` (its paths exceed every path limit: see the known limits).
        "-k",
        "not gzip_bomb and not lock_held_by_another and not 1500_levels",
        no_dir_fd=True,
    )

"""One advisory lock on a file, on POSIX and Windows, from the standard library.

POSIX systems (Linux, macOS) lock with ``fcntl.flock``: a lock on the open file, released
when the descriptor closes or the process dies. Windows has no ``fcntl``; there
``msvcrt.locking`` locks one byte at the start of the file, released the same ways. The module
picks whichever of the two imports, so the package imports on every platform, and a test can
take ``fcntl`` away to run the Windows path here (``tests/unit/test_portable.py``).

:func:`runicorn._sys.atomic.exclusive_lock` holds the lock for a block (it opens the lock file
without following a link); :func:`is_locked` probes it without waiting or creating it. Both
locks are advisory between runicorn processes, which is all they are for: one sync
writing into a cache at a time, one generator per root.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any


def _optional(module: str) -> Any:
    """The standard-library module ``module``, or ``None`` where the platform lacks it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


fcntl = _optional("fcntl")  # POSIX
msvcrt = _optional("msvcrt")  # Windows

__all__ = ["LOCK_KIND", "LockUnavailableError", "is_locked", "lock_fd", "unlock_fd"]

LOCK_KIND = "flock" if fcntl is not None else ("msvcrt" if msvcrt is not None else "none")
"""Which lock this platform gives: ``flock``, ``msvcrt`` or ``none``."""

_WINDOWS_RETRY = 0.05
"""Seconds between attempts of a blocking lock on Windows (``msvcrt`` cannot wait forever)."""


class LockUnavailableError(OSError):
    """This platform offers neither ``fcntl`` nor ``msvcrt``: no lock can be taken."""


def lock_fd(fd: int, *, blocking: bool) -> bool:
    """Take the lock on ``fd``; ``False`` when ``blocking`` is off and another holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        while True:
            os.lseek(fd, 0, os.SEEK_SET)  # msvcrt locks bytes from the current position
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:  # held elsewhere (EACCES / EDEADLOCK)
                if not blocking:
                    return False
                time.sleep(_WINDOWS_RETRY)
                continue
            return True
    raise LockUnavailableError(
        "this platform offers no file lock (neither fcntl nor msvcrt); runicorn cannot keep "
        "two syncs of one cache apart here"
    )


def unlock_fd(fd: int) -> None:
    """Release the lock :func:`lock_fd` took on ``fd`` (closing ``fd`` releases it too)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def is_locked(lock_path: Path) -> bool | None:
    """Whether another process holds the lock on ``lock_path`` right now; ``None`` when the
    lock file does not exist (never created, so never held). Creates nothing."""
    try:
        fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        taken = lock_fd(fd, blocking=False)
        if taken:
            unlock_fd(fd)
        return not taken
    finally:
        os.close(fd)

"""A Python without ``fcntl``, ``resource``, ``os.pread`` and ``os.pwrite``, as on Windows,
for tests/unit/test_portable.py (put this directory first on PYTHONPATH).

Windows's ``msvcrt.locking`` is stood in for by a module of the same interface built on
POSIX record locks (``lockf``), which lock bytes from the current position as it does: the
package's Windows lock path runs, on this machine's kernel. (``subprocess`` is imported
first: it takes an importable ``msvcrt`` for a sign of Windows.)
"""

from __future__ import annotations

import errno
import fcntl as _fcntl
import os
import subprocess  # noqa: F401  (before msvcrt appears: subprocess takes it for Windows)
import sys
import types

sys.modules["fcntl"] = None  # type: ignore[assignment]  # `import fcntl` now fails
sys.modules["resource"] = None  # type: ignore[assignment]
del os.pread, os.pwrite

_msvcrt = types.ModuleType("msvcrt")
_msvcrt.LK_UNLCK, _msvcrt.LK_LOCK, _msvcrt.LK_NBLCK = 0, 1, 2


def _locking(fd: int, mode: int, nbytes: int) -> None:
    if mode == _msvcrt.LK_UNLCK:
        _fcntl.lockf(fd, _fcntl.LOCK_UN, nbytes, 0, os.SEEK_CUR)
        return
    try:
        _fcntl.lockf(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB, nbytes, 0, os.SEEK_CUR)
    except OSError:
        raise OSError(errno.EACCES, "Permission denied") from None


_msvcrt.locking = _locking
sys.modules["msvcrt"] = _msvcrt

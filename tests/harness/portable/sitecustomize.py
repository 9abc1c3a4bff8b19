"""A Python without ``fcntl``, ``resource``, ``os.pread`` and ``os.pwrite``, as on Windows,
for tests/unit/test_portable.py (put this directory first on PYTHONPATH); with
``RUNICORN_TEST_NO_DIR_FD`` set, without ``dir_fd`` and directory descriptors as well.

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

if os.environ.get("RUNICORN_TEST_NO_DIR_FD"):
    # As on Windows as well: no ``dir_fd``, no ``O_NOFOLLOW``/``O_DIRECTORY``, no
    # ``scandir``/``utime`` of a descriptor, and no ``open`` of a directory. Each call that
    # would still use one fails as it does there, so none can pass unnoticed.
    import functools
    import stat as _stat

    os.supports_dir_fd = set()  # type: ignore[misc]
    os.supports_fd = os.supports_fd - {os.scandir, os.utime}  # type: ignore[misc]
    del os.O_NOFOLLOW, os.O_DIRECTORY, os.O_CLOEXEC  # Windows has O_NOINHERIT instead

    def _no_dir_fd(call):  # type: ignore[no-untyped-def]
        @functools.wraps(call)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            for key in ("dir_fd", "src_dir_fd", "dst_dir_fd"):
                if kwargs.get(key) is not None:
                    message = f"{call.__name__}: {key} unavailable on this platform"
                    raise NotImplementedError(message)
            return call(*args, **kwargs)

        return wrapper

    for _name in (
        "stat",
        "lstat",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "rename",
        "replace",
        "chmod",
        "access",
        "readlink",
        "symlink",
        "link",
    ):
        setattr(os, _name, _no_dir_fd(getattr(os, _name)))

    _real_open = _no_dir_fd(os.open)

    def _open(path, flags, mode=0o777, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("dir_fd") is None and not isinstance(path, int):
            try:
                if _stat.S_ISDIR(os.stat(path).st_mode):
                    raise PermissionError(13, "Permission denied (a directory)", path)
            except FileNotFoundError:
                pass
        return _real_open(path, flags, mode, **kwargs)

    os.open = _open

    _real_scandir = os.scandir
    _real_utime = os.utime

    def _scandir(path="."):  # type: ignore[no-untyped-def]
        if isinstance(path, int):
            raise TypeError("scandir: path should be string, bytes, os.PathLike or None, not int")
        return _real_scandir(path)

    def _utime(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(path, int):
            raise NotImplementedError("utime: fd unavailable on this platform")
        return _no_dir_fd(_real_utime)(path, *args, **kwargs)

    os.scandir = _scandir
    os.utime = _utime
    if "shutil" in sys.modules:  # rmtree chose its form at import: the path one, as there
        sys.modules["shutil"]._use_fd_functions = False

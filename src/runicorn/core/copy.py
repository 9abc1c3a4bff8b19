"""Copy files from a local source tree into the cache: the per-file loop of a cold sync from
a local-directory remote.

A job names one file by its path below both roots. The source is opened beneath
``source_fd`` without following a symbolic link anywhere on the way
(:func:`runicorn._sys.beneath.open_beneath`, non-blocking so that a FIFO cannot hang the
copy) and must be a regular file; its first ``length`` bytes go to a new temp file in the
file's directory, which is opened beneath ``target_fd`` the same way, so nothing is ever
written outside the target tree (the directories must exist: the caller creates them, once
each). The temp file gets the mtime and is renamed over the file's name, so a reader sees the
old file or the new one, never a mix. Nothing is fsynced: the caller flushes the file system
once per sync.

A *held* job (a JSON file the caller parses before it may become visible) stops before the
rename: its result carries the temp file's name and the bytes, and :func:`install_files`
renames or removes it afterwards.

Every failure is the job's own result, never an exception: which step failed and the
``errno``, so that the caller words it as it words the same failure of any other transfer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from runicorn._sys.beneath import open_beneath

__all__ = [
    "COPIED",
    "DIR_MODE",
    "HELD",
    "INSTALL_FAILED",
    "READ_SIZE",
    "SHRUNK",
    "SOURCE_FAILED",
    "TARGET_FAILED",
    "TEMP_ATTEMPTS",
    "CopyJob",
    "CopyResult",
    "Install",
    "copy_files",
    "install_files",
    "temp_name",
]

CopyJob = tuple[str, int, int, bool]
"""``(path, length, mtime_ns, hold)``: the file's path below both roots (``/``-separated,
already checked by the caller), the bytes to copy from its start, the mtime to give it in
nanoseconds, and whether to stop before the rename."""

CopyResult = tuple[int, int, int, str | None, bytes | None]
"""``(outcome, error, received, temp, data)``: one of the outcome constants, the ``errno`` of
a failure (0 otherwise), the bytes read from the source, and for a held job the temp file's
name in the file's directory and the bytes written to it (``None`` otherwise)."""

Install = tuple[str, str, bool]
"""``(path, temp, keep)``: a held job's path and temp name; ``keep`` renames the temp file
over the path's name, otherwise it is removed."""

COPIED = 0
"""The file is in place, complete, with its mtime."""
HELD = 1
"""The temp file is complete, with its mtime; the caller installs or removes it."""
SOURCE_FAILED = 2
"""The source could not be opened or read, or is not a regular file (``EISDIR`` for a
directory, ``EINVAL`` for anything else, ``ELOOP`` for a link on its path)."""
SHRUNK = 3
"""The source ended before ``length`` bytes (``received`` says where)."""
TARGET_FAILED = 4
"""The file's directory in the target could not be opened (``ELOOP``: a link on the way,
``ENOTDIR``: a file in the way), or the temp file not created or written."""
INSTALL_FAILED = 5
"""The complete temp file could not be given its mtime or renamed into place."""

TEMP_ATTEMPTS = 8
"""Temp names tried per file before giving up with ``EEXIST``."""
READ_SIZE = 1 << 20
"""Bytes read and written at a time."""
DIR_MODE = 0o755
"""The mode a directory made for a job gets (before the umask)."""

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class _Failed(Exception):
    def __init__(self, outcome: int, error: int) -> None:
        super().__init__(outcome, error)
        self.outcome = outcome
        self.error = error


def temp_name(prefix: str, index: int, attempt: int) -> str:
    """The temp name of job ``index`` at its ``attempt``-th try (0 first)."""
    return f"{prefix}{index:x}.part" if not attempt else f"{prefix}{index:x}-{attempt}.part"


def _open_source(source_fd: int, path: str) -> int:
    try:
        fd = open_beneath(source_fd, path, os.O_RDONLY | _NONBLOCK | _BINARY)
    except OSError as error:
        raise _Failed(SOURCE_FAILED, error.errno or errno.EIO) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        os.close(fd)
        raise _Failed(SOURCE_FAILED, error.errno or errno.EIO) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _Failed(SOURCE_FAILED, errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL)
    return fd


def _open_directory(target_fd: int, path: str) -> int:
    directory = path.rpartition("/")[0]
    try:
        return open_beneath(target_fd, directory, os.O_RDONLY | _DIRECTORY)
    except OSError as error:
        raise _Failed(TARGET_FAILED, error.errno or errno.EIO) from None


_DIR_OPEN = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC


def _link_errno(parent: int, name: str, error: OSError) -> int:
    """``ELOOP`` when ``name`` is a link (``O_NOFOLLOW`` may say ``ENOTDIR`` for one)."""
    code = error.errno or errno.EIO
    if code in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                return errno.ELOOP
    return code


def _child(parent: int, name: str) -> int:
    """The directory ``name`` in ``parent``, made first when missing; never a link."""
    try:
        return os.open(name, _DIR_OPEN, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise _Failed(TARGET_FAILED, _link_errno(parent, name, error)) from None
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent)
    except FileExistsError:
        pass  # another job made it meanwhile (or something else is there: the open says)
    except OSError as error:
        raise _Failed(TARGET_FAILED, error.errno or errno.EIO) from None
    try:
        return os.open(name, _DIR_OPEN, dir_fd=parent)
    except OSError as error:
        raise _Failed(TARGET_FAILED, _link_errno(parent, name, error)) from None


def _make_directory(target_fd: int, path: str) -> int:
    """The directory part of ``path`` beneath ``target_fd``, missing parts made."""
    current = target_fd
    try:
        for part in path.rpartition("/")[0].split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                raise _Failed(TARGET_FAILED, errno.ELOOP)
            step = _child(current, part)
            if current != target_fd:
                os.close(current)
            current = step
        if current == target_fd:
            try:
                current = os.open(".", os.O_RDONLY | _DIRECTORY | _CLOEXEC, dir_fd=target_fd)
            except OSError as error:
                raise _Failed(TARGET_FAILED, error.errno or errno.EIO) from None
        return current
    except BaseException:
        if current != target_fd:
            os.close(current)
        raise


def _create_temp(dir_fd: int, prefix: str, index: int) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for attempt in range(TEMP_ATTEMPTS):
        name = temp_name(prefix, index, attempt)
        try:
            return os.open(name, flags, 0o644, dir_fd=dir_fd), name
        except FileExistsError:
            continue
        except OSError as error:
            raise _Failed(TARGET_FAILED, error.errno or errno.EIO) from None
    raise _Failed(TARGET_FAILED, errno.EEXIST)


def _copy_one(
    source_fd: int, target_fd: int, job: CopyJob, prefix: str, index: int, make_dirs: bool
) -> CopyResult:
    path, length, mtime_ns, hold = job
    received = 0
    source = dir_fd = temp_fd = -1
    temp: str | None = None
    chunks: list[bytes] = []
    try:
        source = _open_source(source_fd, path)
        try:
            dir_fd = _open_directory(target_fd, path)
        except _Failed as failure:
            if not make_dirs or failure.error != errno.ENOENT:
                raise
            dir_fd = _make_directory(target_fd, path)
        temp_fd, temp = _create_temp(dir_fd, prefix, index)
        while received < length:
            try:
                data = os.pread(source, min(READ_SIZE, length - received), received)
            except OSError as error:
                raise _Failed(SOURCE_FAILED, error.errno or errno.EIO) from None
            if not data:
                raise _Failed(SHRUNK, 0)
            received += len(data)
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(temp_fd, view) :]
            except OSError as error:
                raise _Failed(TARGET_FAILED, error.errno or errno.EIO) from None
            if hold:
                chunks.append(data)
        try:
            os.utime(temp_fd, ns=(mtime_ns, mtime_ns))
            fd, temp_fd = temp_fd, -1
            os.close(fd)
            if hold:
                return HELD, 0, received, temp, b"".join(chunks)
            os.rename(temp, path.rpartition("/")[2], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as error:
            raise _Failed(INSTALL_FAILED, error.errno or errno.EIO) from None
        temp = None
        return COPIED, 0, received, None, None
    except _Failed as failure:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        return failure.outcome, failure.error, received, None, None
    finally:
        for fd in (temp_fd, dir_fd, source):
            if fd >= 0:
                os.close(fd)


def copy_files(
    source_fd: int,
    target_fd: int,
    jobs: Sequence[CopyJob],
    temp_prefix: str,
    threads: int = 1,
    make_dirs: bool = False,
) -> list[CopyResult]:
    """Copy each job's file from beneath ``source_fd`` to beneath ``target_fd`` (see the
    module's docstring); one :data:`CopyResult` per job, in order. ``make_dirs`` makes the
    directories a job's file needs (a failure to is the job's ``TARGET_FAILED``).

    Job ``i`` writes the temp file ``temp_name(temp_prefix, i, attempt)`` (the first free
    one). ``threads`` is how many files may be copied at once; the results do not depend on
    it (the pure twin copies one at a time) as long as no two jobs name the same path, which
    a validated manifest guarantees.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return [
        _copy_one(source_fd, target_fd, job, temp_prefix, index, make_dirs)
        for index, job in enumerate(jobs)
    ]


def _install_one(target_fd: int, install: Install) -> int:
    path, temp, keep = install
    directory, _sep, name = path.rpartition("/")
    try:
        dir_fd = open_beneath(target_fd, directory, os.O_RDONLY | _DIRECTORY)
    except OSError as error:
        return error.errno or errno.EIO
    try:
        if keep:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.unlink(temp, dir_fd=dir_fd)
    except OSError as error:
        if keep:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        return error.errno or errno.EIO
    finally:
        os.close(dir_fd)
    return 0


def install_files(target_fd: int, installs: Sequence[Install], threads: int = 1) -> list[int]:
    """Rename each held temp file over its path's name (``keep``) or remove it; the
    ``errno`` of each, 0 when it worked. A temp file that cannot be renamed is removed."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return [_install_one(target_fd, install) for install in installs]

"""Files that become visible only complete: write a unique temp file, flush, rename.

Used by the generator (manifests, its state) and by the sync client (every cached file that
is not extended in place), so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from runicorn._sys.dirs import Directory, is_link, open_directory
from runicorn._sys.fileio import BINARY
from runicorn._sys.locking import lock_fd

Buffer = bytes | bytearray | memoryview
Document = Buffer | Sequence[Buffer]
"""Bytes to write: one buffer, or pieces that concatenate to them (a large manifest is
written without first being copied into one buffer)."""

TEMP_PREFIX = ".runicorn-tmp-"
"""Temp files start with this, so leftovers of a killed process are recognisable."""


def temp_prefix_for(path: Path) -> str:
    """The prefix of temp files that will become ``path``: ``.runicorn-tmp-<name>.``"""
    return f"{TEMP_PREFIX}{path.name}."


def pieces_of(data: Document) -> Sequence[Buffer]:
    """The pieces of a :data:`Document`, a lone buffer as the only one."""
    return (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data


class LinkRefusedError(OSError):
    """A file or directory this module writes is a symbolic link: someone else could point
    it anywhere, so it is refused rather than written through."""


class LockTimeoutError(TimeoutError):
    """Another process held a lock for longer than the caller would wait."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _open_directory(directory: Path) -> Directory:
    """``directory``, refusing it if it is itself a symbolic link (or a junction)."""
    try:
        return open_directory(directory, follow=False)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(directory):
            raise LinkRefusedError(
                errno.ELOOP,
                "is a symbolic link; refusing to write through it (replace it with a "
                "directory, or name the real one)",
                str(directory),
            ) from None
        raise


def _is_link(path: Path) -> bool:
    try:
        return is_link(os.lstat(path))
    except OSError:
        return False


def write_atomically(
    path: Path, data: Document, *, mode: int | None = None, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    The directory is opened once without following a link (a symlinked directory raises
    :class:`LinkRefusedError`) and the temp file is created and renamed relative to it, so
    nothing is written outside it. The file gets the process umask's mode (``0o666`` less
    the umask, as any new file) unless ``mode`` is given. On any failure (including
    ``KeyboardInterrupt``) the temp file is removed and ``path`` is untouched.
    """
    directory = _open_directory(path.parent)
    try:
        fd, temp_name = _create_temp(directory, temp_prefix_for(path))
        try:
            with os.fdopen(fd, "wb") as handle:
                for piece in pieces_of(data):
                    handle.write(piece)
                handle.flush()
                if mode is not None:
                    os.fchmod(handle.fileno(), mode)
                if durable:
                    os.fsync(handle.fileno())
            directory.replace(temp_name, path.name)
        except BaseException:
            with contextlib.suppress(OSError):
                directory.unlink(temp_name)
            raise
        if durable:
            directory.fsync()
    finally:
        directory.close()


def _create_temp(directory: Directory, prefix: str) -> tuple[int, str]:
    """A new file ``<prefix><random>.part`` in ``directory``, created with mode 0o666 (the
    umask applies) and never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | BINARY
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(4)}.part"
        try:
            return directory.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", prefix)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold an advisory lock (:mod:`runicorn._sys.locking`) on ``lock_path`` (created if
    missing) for the block.

    A lock file (or its directory) that is a symbolic link raises :class:`LinkRefusedError`:
    creating it would create a file wherever the link points. ``timeout``: seconds to wait
    for another holder before :class:`LockTimeoutError` (``None``: wait as long as it takes).

    The lock file is never deleted: deleting it would let a third process lock a fresh inode
    while a second still waits on the old one.
    """
    directory = _open_directory(lock_path.parent)
    try:
        fd = directory.open(lock_path.name, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LinkRefusedError(
                errno.ELOOP,
                "the lock file is a symbolic link; refusing to follow it (remove the link)",
                str(lock_path),
            ) from None
        raise
    finally:
        directory.close()
    try:
        _wait_for_lock(fd, lock_path, timeout)
        yield
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, lock_path: Path, timeout: float | None) -> None:
    if timeout is None:
        lock_fd(fd, blocking=True)
        return
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        if lock_fd(fd, blocking=False):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockTimeoutError(
                f"another process has held the lock {lock_path} for more than "
                f"{timeout:g} s; if no other sync or generation is running, try again "
                "(or raise the lock timeout)"
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)

"""Positional reads with a stated contract.

``os.pread`` may return fewer bytes than asked for even before the end of a file (a signal,
a network file system, a pipe-like file), and an empty result is its only sign of EOF. Every
caller that wants "these bytes of the file" loops; these two helpers are that loop, written
once. Both read explicit ranges and never "to EOF", so a writer appending meanwhile cannot
make them read more than asked.

Windows has no ``os.pread`` or ``os.pwrite``: :func:`pread` and :func:`pwrite` are those
calls where the platform has them, and elsewhere a seek and a read (or write) under one
process-wide lock, so two threads never move one descriptor's position under each other.
Every positional call of the client goes through them; the portable path is tested on Linux
with ``os.pread`` and ``os.pwrite`` taken away (tests/unit/test_portable.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable

__all__ = [
    "BINARY",
    "MAX_CHUNK",
    "pread",
    "pread_exact",
    "pread_upto",
    "pwrite",
    "sync_file_system",
]

BINARY = getattr(os, "O_BINARY", 0)
"""Add to :func:`os.open` flags: Windows opens a file in text mode (newline translation)
without it; 0 elsewhere."""

_position_lock = threading.Lock()
"""Held around a seek and its read or write where the platform has no positional calls."""


def _seek_read(fd: int, length: int, offset: int) -> bytes:
    with _position_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def _seek_write(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    with _position_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


pread: Callable[[int, int, int], bytes] = getattr(os, "pread", _seek_read)
"""``os.pread(fd, length, offset)``, or a seek and a read where the platform lacks it (the
descriptor's position then moves; nothing of the client relies on it)."""

pwrite: Callable[[int, bytes | bytearray | memoryview, int], int] = getattr(
    os, "pwrite", _seek_write
)
"""``os.pwrite(fd, data, offset)``, or a seek and a write where the platform lacks it."""

MAX_CHUNK = 1024 * 1024
"""Largest single ``os.pread``: it allocates the size it is asked for before it reads, so a
generous ``length`` on a small file must not cost that much memory."""


def pread_upto(fd: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of ``fd``; fewer only if the file ends first.

    The result is shorter than ``length`` exactly when EOF lies inside the range (then it
    holds everything up to EOF, and is empty when ``offset`` is at or past EOF). Short reads
    before EOF are retried. ``length == 0`` returns ``b""`` without a system call.
    ValueError if ``offset`` or ``length`` is negative; ``OSError`` from ``os.pread`` passes
    through. The file position of ``fd`` is not used or moved.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"pread_upto: negative offset ({offset}) or length ({length})")
    pieces: list[bytes] = []
    position, end = offset, offset + length
    while position < end:
        data = pread(fd, min(MAX_CHUNK, end - position), position)
        if not data:
            break
        pieces.append(data)
        position += len(data)
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)


def pread_exact(fd: int, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` of ``fd``, or EOFError if the file ends first.

    As :func:`pread_upto`, but a range that EOF cuts short is an error: the EOFError says
    where the file ended. Use it where a short file means the file changed under the caller.
    """
    data = pread_upto(fd, offset, length)
    if len(data) != length:
        raise EOFError(
            f"file ends at byte {offset + len(data)}, inside the range [{offset}, "
            f"{offset + length}) that was to be read"
        )
    return data


def sync_file_system(path: str) -> bool:
    """Flush every written page of the file system holding ``path`` to its disk (Linux
    ``syncfs``), once for many files instead of one ``fsync`` each; ``False`` where the
    call is missing (then the caller fsyncs file by file)."""
    call = _syncfs()
    if call is None:
        return False
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if call(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)
    return True


def syncfs_available() -> bool:
    """Whether :func:`sync_file_system` can flush a whole file system here (Linux)."""
    return _syncfs() is not None


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call

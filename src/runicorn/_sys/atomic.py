"""Files that become visible only complete: write a unique temp file, flush, rename.

Used by the generator (manifests, its state) and by the sync client (every cached file that
is not extended in place), so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

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


def fsync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse to fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: Document, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    On any failure (including ``KeyboardInterrupt``) the temp file is removed and ``path`` is
    untouched.
    """
    fd, temp_name = tempfile.mkstemp(prefix=temp_prefix_for(path), suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for piece in pieces_of(data):
                handle.write(piece)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    if durable:
        fsync_directory(path.parent)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_path`` (created if missing) for the block.

    The lock file is never deleted: deleting it would let a third process lock a fresh inode
    while a second still waits on the old one.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

"""Hash the tail window of files: the fingerprint that makes append-only sync verifiable.

This pure-Python module is the specification; ``csrc/_native_tailhash.pyx`` is its compiled
twin. The tail hash of a file at a recorded ``size`` is BLAKE3 with a 16-byte digest (32 hex
characters) of the bytes ``[max(0, size - window), size)``. Reads are explicit ranges
(``pread``), never "to EOF", so a writer appending meanwhile cannot change the answer.

Manifests of 0.5.x generators (and the API document's example) carry MD5 of the same window
instead, without naming an algorithm; ``algorithm="md5"`` hashes the way they do, so a
client can verify appends against them too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

from blake3 import blake3

from runicorn._sys.fileio import pread_exact

TAIL_WINDOW = 4096
"""Bytes hashed at the end of a file (manifest header ``tail_hash_window``)."""

DIGEST_BYTES = 16

TAIL_HASH_ALGORITHM = "blake3-128"
"""Ours (manifest header ``tail_hash_algorithm``)."""

LEGACY_TAIL_HASH_ALGORITHM = "md5"
"""What a manifest without ``tail_hash_algorithm`` used: MD5 (32 hex characters too) of the
same window, as 0.5.x generators compute it."""

TAIL_HASH_ALGORITHMS = (TAIL_HASH_ALGORITHM, LEGACY_TAIL_HASH_ALGORITHM)

TailRequest = tuple[str, int, bool]
"""``(path relative to root, size, cut_at_newline)``."""

TailResult = tuple[int, str]
"""``(size, hex digest)``: the size actually hashed up to, and its tail hash."""


def _blake3_128(data: bytes | memoryview) -> str:
    return blake3(data).hexdigest(length=DIGEST_BYTES)


def _md5(data: bytes | memoryview) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def hasher_for(algorithm: str) -> Callable[[bytes | memoryview], str]:
    """The function hashing a window with ``algorithm`` (one of :data:`TAIL_HASH_ALGORITHMS`);
    ``ValueError`` for any other."""
    if algorithm == TAIL_HASH_ALGORITHM:
        return _blake3_128
    if algorithm == LEGACY_TAIL_HASH_ALGORITHM:
        return _md5
    raise ValueError(
        f"unknown tail hash algorithm {algorithm!r}; known: {', '.join(TAIL_HASH_ALGORITHMS)}"
    )


def digest(data: bytes, algorithm: str = TAIL_HASH_ALGORITHM) -> str:
    """The tail hash of a window already in memory."""
    return hasher_for(algorithm)(data)


def _tail_of_open_file(
    fd: int,
    size: int,
    cut_at_newline: bool,
    window: int,
    hasher: Callable[[bytes | memoryview], str],
) -> TailResult | None:
    try:
        end = size
        data: bytes | None = None
        if cut_at_newline:
            end = 0
            pos = size
            while pos > 0:
                start = max(0, pos - window)
                chunk = pread_exact(fd, start, pos - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    if end == size:
                        data = chunk  # the file ends with a complete line: the window is read
                    break
                pos = start
        if data is None:
            start = max(0, end - window)
            data = pread_exact(fd, start, end - start)
    except EOFError:
        return None  # shorter than ``size`` now: no answer for this size
    return end, hasher(data)


def hash_tails(
    root: str,
    requests: Sequence[TailRequest],
    window: int = TAIL_WINDOW,
    algorithm: str = TAIL_HASH_ALGORITHM,
) -> list[TailResult | None]:
    """Tail-hash many files below ``root``; one result per request, in order.

    With ``cut_at_newline`` the size is first moved back to just after the last ``\\n``
    before ``size`` (0 when there is none), so a half-written last line is never recorded.
    A result is ``None`` when the file cannot be opened (vanished, permission, a symbolic
    link) or is now shorter than ``size``. ``algorithm`` is one of
    :data:`TAIL_HASH_ALGORITHMS` (``ValueError`` otherwise).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 byte, got {window}")
    hasher = hasher_for(algorithm)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    results: list[TailResult | None] = []
    for rel_path, size, cut_at_newline in requests:
        if size < 0:
            raise ValueError(f"size of {rel_path!r} must not be negative, got {size}")
        try:
            fd = os.open(os.path.join(root, rel_path), flags)
        except OSError:
            results.append(None)
            continue
        try:
            results.append(_tail_of_open_file(fd, size, cut_at_newline, window, hasher))
        except OSError:
            results.append(None)
        finally:
            os.close(fd)
    return results

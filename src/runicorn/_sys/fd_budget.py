"""How many files this process may still open, for sizing what a transfer keeps open at once.

A transfer holds a temp file open for every file in flight: up to 256 per SFTP channel, so
four workers alone would take a whole default ``ulimit -n`` of 1024, and the files beyond it
would fail with "Too many open files" instead of waiting their turn.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


def _resource() -> Any:
    """The ``resource`` module, ``None`` on Windows (no ``RLIMIT_NOFILE`` there)."""
    try:
        return importlib.import_module("resource")
    except ImportError:
        return None


resource = _resource()

EXTRA_RESERVE = 8
"""Descriptors left for what a sync opens besides its temp files (append spools spilled to
disk, the state database's journal, a log file)."""


def soft_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE``, or ``None`` when it is unlimited or unknown."""
    if resource is None:
        return None
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def directory_handle_share(limit: int) -> int:
    """The part of the limit the cache's kept directory handles may use (an eighth)."""
    return max(1, limit // 8)


def open_descriptors() -> int:
    """Descriptors open now (0 where ``/proc/self/fd`` cannot tell)."""
    try:
        return max(0, len(os.listdir("/proc/self/fd")) - 1)  # the listing holds one itself
    except OSError:
        return 0


def files_in_flight_per_channel(channels: int, depth: int) -> int:
    """At most ``depth`` files per channel, fewer when the open-file limit would not leave
    room for all channels' temp files beside what is open now, the cache's directory handles
    and :data:`EXTRA_RESERVE`; always at least 1."""
    limit = soft_limit()
    if limit is None:
        return depth
    spare = limit - open_descriptors() - directory_handle_share(limit) - EXTRA_RESERVE
    return max(1, min(depth, spare // max(1, channels)))

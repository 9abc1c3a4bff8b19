"""SyncRun: the counters of one sync call, and the stats dict they become.

A sync fills them in three places -- choosing the manifest (:mod:`.client`), reading it
(:mod:`.manifest_fetch`) and bringing files over (:mod:`.transfer`) -- so they live in a
module of their own that all three import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressCallback", "SyncRun"]

ProgressCallback = Callable[[int, int, str], None]
"""``(completed, total, current_file)``: files finished so far, files to transfer."""


@dataclass
class SyncRun:
    """Counters of one sync call (stats are per call)."""

    started: float
    manifest_type: str = ""
    manifest_revision: int | None = None
    bytes_downloaded: int = 0
    files_synced: int = 0
    incremental_count: int = 0
    full_count: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    deleted_count: int = 0
    files_total: int = 0
    bytes_total: int = 0
    skipped: bool = False
    reason: str = ""
    connection_lost: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        result = {
            "files_synced": self.files_synced,
            "bytes_downloaded": self.bytes_downloaded,
            "incremental_count": self.incremental_count,
            "full_count": self.full_count,
            "failed_count": len(self.failed),
            "duration": time.monotonic() - self.started,
            "manifest_revision": self.manifest_revision,
            "skipped": self.skipped,
            "reason": self.reason,
            "manifest_type": self.manifest_type,
            "deleted_count": self.deleted_count,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "failed_files": dict(sorted(self.failed.items())),
        }
        result.update(self.extra)
        return result

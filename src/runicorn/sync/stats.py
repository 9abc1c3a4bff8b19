"""SyncRun: the counters of one sync call, and the stats dict (:class:`SyncStats`) they become.

A sync fills them in three places -- choosing the manifest (:mod:`.client`), reading it
(:mod:`.manifest_fetch`) and bringing files over (:mod:`.transfer`) -- so they live in a
module of their own that all three import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from runicorn.format.models import ManifestFormat

__all__ = ["ProgressCallback", "SyncRun", "SyncStats", "SyncStatsExtra"]

ProgressCallback = Callable[[int, int, str], None]
"""``(completed, total, current_file)``: files finished so far, files to transfer."""


class SyncStatsExtra(TypedDict, total=False):
    """The keys of :class:`SyncStats` that only some syncs report."""

    dry_run: bool
    """``True`` when nothing was written (``dry_run=True``)."""
    vanished_runs: int
    """Cached runs the full manifest no longer lists, kept because deleting was not asked."""
    deletion_refused: str
    """Why the deletion guard refused to delete the runs that left the server."""
    deletion_protected: int
    """Cached runs the full manifest no longer lists but that lie under a path its
    ``problems`` report (unreadable or skipped on the server): never deleted."""
    files_deleted: int
    """With ``delete``: cached files removed because the full manifest no longer lists them
    inside runs it still lists (deleted on the server); never under a ``problems`` path.
    In a dry run, how many would be."""
    stale_manifest: str
    """Why the server's manifest looks stale (generated long ago while it lists runs as
    running): a warning, the sync itself went on."""
    invalid_json_files: dict[str, str]
    """JSON files installed although they do not parse, by path, with what happened."""
    verified: bool
    """``True`` when this sync checked every cached file on disk (the full check), not only
    each run's ``status.json``."""
    delta_from: int
    """The full revision this cache had applied when the sync applied the active manifest
    in place of the newer full one (it lists every change since: ``changes_since``);
    ``manifest_revision`` is the active manifest's, ``delta_to`` the full revision the cache
    now equals or is newer than."""
    delta_to: int
    """See ``delta_from``."""
    runs_unchanged: int
    """Runs of the applied active manifest listed exactly as the cache last applied them
    cleanly: left out of its decoding, diff and state writes (nothing of theirs changed)."""
    older_revision: str
    """Set when the applied full manifest's revision is lower than the one this cache
    applied before: what happened (it is applied, and reported, never silently)."""
    runs_filtered_out: int
    """Runs of the applied manifest left out by the run selection (``projects``,
    ``include``, ``exclude``, ``since``): not fetched, not deleted. Present when a selection
    was given and a manifest was applied."""
    case_twins: dict[str, str]
    """On a case-insensitive client (macOS, Windows): the runs (their prefix, ending in
    ``/``) and files of the applied manifest left out because their paths differ from
    another's only in case or Unicode normalisation, each with the run or file its file
    system would have stored it as (kept: the cached one, else the first listed). Never
    written, never failed; present only when there are any."""


class SyncStats(SyncStatsExtra):
    """What ``sync()`` returns: the API document's keys, then runicorn's own.

    Required keys are present in every result; the keys of :class:`SyncStatsExtra` only
    when they apply. (A ``total=False`` base stands in for ``NotRequired``, which needs
    Python 3.11.)
    """

    files_synced: int
    bytes_downloaded: int
    """Every byte read from the server this call, manifests included."""
    incremental_count: int
    """Append-only files extended in place (after the append-verify)."""
    full_count: int
    """Files fetched whole."""
    failed_count: int
    duration: float
    """Seconds this call took, the jitter included."""
    manifest_revision: int | None
    """The revision applied or found unchanged; ``None`` when no manifest was read."""
    skipped: bool
    """Nothing to do: the manifest's revision is the one last applied."""
    reason: str
    manifest_type: str
    """``full`` or ``active`` (empty when no manifest was read)."""
    deleted_count: int
    files_total: int
    """Files planned for transfer."""
    bytes_total: int
    """Bytes planned for transfer."""
    failed_files: dict[str, str]
    """Why each failed file failed, by path (sorted)."""


def _no_extra() -> SyncStatsExtra:
    return {}


@dataclass
class SyncRun:
    """Counters of one sync call (stats are per call)."""

    started: float
    manifest_type: str = ""
    manifest_revision: int | None = None
    tail_hash_algorithm: str = ManifestFormat.TAIL_HASH_ALGORITHM
    """Of the manifest being applied (:attr:`SyncManifest.tail_hashes_by`): appends are
    verified with it."""
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
    extra: SyncStatsExtra = field(default_factory=_no_extra)

    def stats(self) -> SyncStats:
        return {
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
            **self.extra,
        }

"""MetadataSyncService: one call that brings a cache up to date, whatever the server offers.

``sync_all()`` tries the manifest first. It falls back to the legacy walk only when the
manifest is missing, unreachable (``OSError``) or invalid (``ValueError``) -- never when the
manifest says nothing changed, which is the cheap, common case. Both paths feed the same
:class:`ManifestSyncClient` engine, so the cache they produce is the same.

Concurrency: two ``sync_all()`` calls on one service never overlap. The second caller does
not wait: it returns ``False`` at once (and logs why), because a timer that fires while a
sync is still running has nothing to add -- the running sync already fetches what changed.
Pass ``wait=True`` to queue behind the running sync instead. Across processes, the cache's
own lock (``LocalCacheManager.sync_lock``) serialises writers.

The library never prints: progress is published on :attr:`MetadataSyncService.progress`
(and to an optional ``on_progress`` callback); the CLI renders it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import posixpath
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runicorn.sync.legacy import WalkReport, sync_legacy, walk_remote
from runicorn.sync.selection import RunSelection

if TYPE_CHECKING:
    import paramiko

    from runicorn.core.backend import Backend
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.client import ManifestSyncClient
    from runicorn.sync.stats import SyncStats
    from runicorn.sync.viewer import ViewerNotifier, ViewerReport
    from runicorn.transport.remote import Remote

__all__ = ["MODE_LEGACY", "MODE_MANIFEST", "MetadataSyncService", "SyncProgress"]

logger = logging.getLogger(__name__)

MODE_MANIFEST = "manifest"
MODE_LEGACY = "legacy"

PHASE_IDLE = "idle"
PHASE_MANIFEST = "manifest"
PHASE_WALKING = "walking"
PHASE_TRANSFERRING = "transferring"
PHASE_DONE = "done"
PHASE_FAILED = "failed"


@dataclass
class SyncProgress:
    """A snapshot of the running (or last) sync, for UIs and the CLI's progress bar."""

    phase: str = PHASE_IDLE
    """idle, manifest (reading it), walking (legacy), transferring, done or failed."""
    mode: str | None = None
    """``manifest`` or ``legacy`` once known."""
    synced_files: int = 0
    synced_bytes: int = 0
    total_files: int = 0
    total_bytes: int = 0
    """Bytes to transfer, when the engine reports it (otherwise 0 until the end)."""
    current_file: str = ""
    last_error: str | None = None
    started_at: float | None = None
    warnings: list[str] = field(default_factory=list)


class MetadataSyncService:
    """Keeps one local cache in sync with one remote experiments root.

    ``ssh_session`` and ``sftp_client`` are the caller's connection (the service never
    closes them); with ``remote`` (for example a ``LocalRemote`` over an NFS mount) no SSH
    connection is needed and both may be ``None``.
    """

    def __init__(
        self,
        ssh_session: paramiko.SSHClient | None,
        sftp_client: paramiko.SFTPClient | None,
        remote_root: str,
        cache_manager: LocalCacheManager,
        use_manifest_sync: bool = True,
        manifest_sync_jitter: float = 5.0,
        *,
        backend: Backend | None = None,
        remote: Remote | None = None,
        max_workers: int | None = None,
        delete: bool = False,
        allow_mass_delete: bool = False,
        dry_run: bool = False,
        timeout: float = 30.0,
        on_progress: Callable[[SyncProgress], None] | None = None,
        viewer_url: str | None = None,
        viewer_timeout: float = 10.0,
        verify: bool = False,
        projects: Sequence[str] = (),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        since: float | str | None = None,
        max_manifest_bytes: int | None = None,
        max_manifest_entries: int | None = None,
        legacy_active_only: bool = False,
        legacy_recent_seconds: float | None = None,
        legacy_max_experiments: int | None = None,
        lock_timeout: float | None = 600.0,
        stream: bool | None = None,
        stream_python: str | None = None,
    ) -> None:
        self.ssh_session = ssh_session
        self.sftp_client = sftp_client
        self.remote_root = remote_root
        self.cache_manager = cache_manager
        self.use_manifest_sync = use_manifest_sync
        self.manifest_sync_jitter = manifest_sync_jitter
        self.backend = backend
        self.remote = remote
        self.max_workers = max_workers
        self.delete = delete
        self.allow_mass_delete = allow_mass_delete
        self.dry_run = dry_run
        self.timeout = timeout
        self.stream = stream
        """The compressed file stream over SFTP: on, off, or automatic (``None``);
        :class:`~runicorn.transport.sftp_remote.SftpRemote`."""
        self.stream_python = stream_python
        """The server's interpreter that runs the file stream (``None``: ``python3``)."""
        self.verify = verify
        self.selection = RunSelection.of(projects, include, exclude, since)
        """The runs mirrored (:mod:`runicorn.sync.selection`), by manifest and walk alike."""
        self.max_manifest_bytes = max_manifest_bytes
        """The client's caps on the manifest (``None``: the client's defaults)."""
        self.max_manifest_entries = max_manifest_entries
        self.legacy_selection = _legacy_selection(
            self.selection, legacy_active_only, legacy_recent_seconds, legacy_max_experiments
        )
        """The runs the legacy walk mirrors: :attr:`selection`, narrowed by the 0.4.x
        ``legacy_*`` keywords."""
        self.lock_timeout = lock_timeout
        """Seconds to wait for another sync writing into the cache (``None``: no limit)."""
        self.on_progress = on_progress
        if viewer_url:
            from runicorn.sync.viewer import normalize_viewer_url

            normalize_viewer_url(viewer_url)  # a malformed URL is the caller's error, now
        self.viewer_url = viewer_url
        """An upstream viewer serving the cache, told what each sync changed (see
        :mod:`runicorn.sync.viewer`); ``None``: no viewer is told."""
        self.viewer_timeout = viewer_timeout
        self.last_viewer_report: ViewerReport | None = None
        """What telling the viewer achieved in the last sync (``None``: nothing was sent)."""
        self.progress = SyncProgress()
        self.last_stats: SyncStats | None = None
        self.last_walk: WalkReport | None = None
        self.fallback_reason: str | None = None
        """Why the last sync used the legacy walk (``None`` when it did not)."""
        self._run_lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self._viewer: ViewerNotifier | None = None
        self._last_client: ManifestSyncClient | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._run_lock.locked()

    def sync_all(self, *, wait: bool = False) -> bool:
        """Sync everything; ``True`` when the sync completed and no file failed.

        Returns ``False`` (with ``progress.last_error`` set and the error logged) when both
        the manifest and the legacy walk failed, when files failed, or -- without ``wait`` --
        when another ``sync_all()`` is already running. ``KeyboardInterrupt`` propagates:
        the engine saves state as it goes, so the cache stays consistent.
        """
        if not self._run_lock.acquire(blocking=wait):
            logger.info("a sync of %s is already running; not starting another", self.remote_root)
            return False
        try:
            return self._sync_locked()
        finally:
            self._run_lock.release()

    # -- one sync -----------------------------------------------------------------------

    def _sync_locked(self) -> bool:
        self.last_stats = None
        self.last_walk = None
        self.fallback_reason = None
        self.last_viewer_report = None
        self._reset_progress()
        self._viewer = self._make_viewer()
        self._last_client = None
        try:
            stats = self._run()
        except (KeyboardInterrupt, SystemExit):
            self._update(phase=PHASE_FAILED, last_error="interrupted")
            raise
        except Exception as error:
            message = str(error) or type(error).__name__
            logger.error("sync of %s failed: %s", self.remote_root, message)
            self._update(phase=PHASE_FAILED, last_error=message)
            return False
        self.last_stats = stats
        self._tell_viewer()
        failed = int(stats.get("failed_count", 0) or 0)
        self._update(
            phase=PHASE_DONE if not failed else PHASE_FAILED,
            synced_files=int(stats.get("files_synced", 0) or 0),
            synced_bytes=int(stats.get("bytes_downloaded", 0) or 0),
            current_file="",
            last_error=None if not failed else f"{failed} file(s) failed; the next sync retries",
        )
        return failed == 0

    def _make_viewer(self) -> ViewerNotifier | None:
        if not self.viewer_url or self.dry_run:
            return None
        from runicorn.sync.viewer import ViewerNotifier

        return ViewerNotifier(
            self.viewer_url, self.cache_manager.root_dir, timeout=self.viewer_timeout
        )

    def _tell_viewer(self) -> None:
        """Have the viewer index what the sync added and re-read what it changed (removed
        runs were dropped from its index before their directories went)."""
        viewer, self._viewer = self._viewer, None
        if viewer is None:
            return
        if self._last_client is not None:
            viewer.refresh(self._last_client.last_changes)
        report = viewer.report
        if report.reached or report.problem:
            self.last_viewer_report = report
        if report.problem:
            with self._progress_lock:
                self.progress.warnings.append(f"viewer {report.url}: {report.problem}")

    def _run(self) -> SyncStats:
        if self.use_manifest_sync:
            self._update(phase=PHASE_MANIFEST, mode=MODE_MANIFEST)
            client = self._client(self.remote, delete=self.delete, jitter=self.manifest_sync_jitter)
            try:
                return client.sync(self._on_file)
            except (ValueError, OSError) as error:
                kind = "invalid" if isinstance(error, ValueError) else "missing or unreachable"
                self.fallback_reason = f"manifest is {kind}: {error}"
                logger.warning(
                    # "falling back to legacy sync": the phrase the API document gives.
                    "the manifest of %s is %s (%s); falling back to legacy sync (a walk of "
                    "the server's tree)",
                    self.remote_root,
                    kind,
                    error,
                )
                self._reset_progress()
            finally:
                client.close()
        return self._run_legacy()

    def _run_legacy(self) -> SyncStats:
        self._update(phase=PHASE_WALKING, mode=MODE_LEGACY)
        root = self._absolute_root()
        remote, owned = self._remote(root)
        try:
            report = walk_remote(remote, root, selection=self.legacy_selection)
            self.last_walk = report
            self._update(
                warnings=list(report.warnings),
                total_files=report.manifest.total_files,
                total_bytes=report.manifest.total_bytes,
            )
            delete = self.delete
            if delete and not report.complete:
                logger.warning(
                    "not deleting anything this time: the legacy walk could not read %d "
                    "path(s), so runs missing from it may still exist on the server",
                    len(report.warnings),
                )
                delete = False
            self._update(phase=PHASE_TRANSFERRING)
            client = self._client(
                remote, delete=delete, jitter=0.0, root=root, selection=self.legacy_selection
            )
            try:
                return sync_legacy(
                    client,
                    report,
                    self.cache_manager,
                    progress_callback=self._on_file,
                    refine=not self.dry_run,
                )
            finally:
                client.close()
        finally:
            if owned:
                with contextlib.suppress(Exception):
                    remote.close()

    def _absolute_root(self) -> str:
        """The root as the server names it: a manifest records absolute roots, and the
        engine checks a synthesised one against the root it was asked for."""
        root = self.remote_root
        if posixpath.isabs(root):
            return root
        if self.remote is not None or self.sftp_client is None:
            return os.path.abspath(root)
        return self.sftp_client.normalize(root or ".")

    # -- construction -------------------------------------------------------------------

    def _client(
        self,
        remote: Remote | None,
        *,
        delete: bool,
        jitter: float,
        root: str | None = None,
        selection: RunSelection | None = None,
    ) -> ManifestSyncClient:
        from runicorn.format.models import ManifestFormat
        from runicorn.sync.client import ManifestSyncClient

        client = ManifestSyncClient(
            self.sftp_client,  # None with an explicit remote
            root or self.remote_root,
            self.cache_manager.root_dir,
            jitter,
            backend=self.backend,
            remote=remote,
            cache_manager=self.cache_manager,
            max_workers=self.max_workers,
            delete=delete,
            allow_mass_delete=self.allow_mass_delete,
            dry_run=self.dry_run,
            timeout=self.timeout,
            viewer=self._viewer,
            verify=self.verify,
            selection=self.selection if selection is None else selection,
            max_manifest_bytes=self.max_manifest_bytes or ManifestFormat.MAX_DECOMPRESSED_BYTES,
            max_manifest_entries=self.max_manifest_entries or ManifestFormat.MAX_ENTRIES,
            lock_timeout=self.lock_timeout,
            stream=self.stream,
            stream_python=self.stream_python,
        )
        self._last_client = client
        return client

    def _remote(self, root: str) -> tuple[Remote, bool]:
        """The remote to walk and fetch from, and whether this service made it (and must
        close it): one set of SFTP channels serves both."""
        if self.remote is not None:
            return self.remote, False
        if self.sftp_client is None:
            raise ValueError("MetadataSyncService needs an sftp_client or a remote")
        from runicorn.transport.sftp_remote import SftpRemote

        remote = SftpRemote(
            self.sftp_client,
            root,
            timeout=self.timeout,
            stream=self.stream,
            stream_python=self.stream_python,
        )
        return remote, True

    # -- progress -----------------------------------------------------------------------

    def _reset_progress(self) -> None:
        with self._progress_lock:
            self.progress = SyncProgress(phase=PHASE_IDLE, started_at=time.time())

    def _update(self, **changes: Any) -> None:
        with self._progress_lock:
            for key, value in changes.items():
                setattr(self.progress, key, value)
            if self.on_progress is None:
                return
            snapshot = copy.copy(self.progress)
        self._notify(snapshot)

    def _notify(self, snapshot: SyncProgress) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(snapshot)
            except Exception:  # a broken renderer must not break the sync
                logger.exception("progress callback failed")

    def _on_file(self, completed: int, total: int, current_file: str, *extra: Any) -> None:
        """The engine's ``(completed, total, current_file)`` callback, plus the
        ``(bytes_done, bytes_total)`` it reports to callbacks that ask (``wants_bytes``).
        Called once per file: it sets the fields directly, and snapshots them only when
        there is an ``on_progress`` to hand the snapshot to."""
        with self._progress_lock:
            progress = self.progress
            progress.phase = PHASE_TRANSFERRING
            progress.synced_files = completed
            progress.total_files = total
            progress.current_file = current_file
            if len(extra) >= 2:
                progress.synced_bytes, progress.total_bytes = int(extra[0]), int(extra[1])
            if self.on_progress is None:
                return
            snapshot = copy.copy(progress)
        self._notify(snapshot)

    _on_file.wants_bytes = True  # type: ignore[attr-defined]


LEGACY_ACTIVE_WINDOW = 3600.0
"""Seconds a run counts as active for ``legacy_active_only`` without
``legacy_recent_seconds``: the generator's default active window."""


def _legacy_selection(
    selection: RunSelection,
    active_only: bool,
    recent_seconds: float | None,
    max_experiments: int | None,
) -> RunSelection:
    """The selection of the legacy walk under the keywords of Runicorn 0.4.x's service.

    ``legacy_active_only``: only runs created or updated within ``legacy_recent_seconds``
    (default :data:`LEGACY_ACTIVE_WINDOW`); ``legacy_max_experiments``: at most that many
    runs, the most recently updated first. ``legacy_recent_seconds`` alone selects nothing
    (it is the window of "active"): ignored with a ``DeprecationWarning``. Like the rest of
    the selection, runs left out are neither fetched nor deleted.
    """
    if recent_seconds is not None and not (
        isinstance(recent_seconds, int | float) and 0 < recent_seconds < float("inf")
    ):
        raise ValueError(f"legacy_recent_seconds must be seconds > 0, got {recent_seconds!r}")
    if max_experiments is not None and (
        isinstance(max_experiments, bool)
        or not isinstance(max_experiments, int)
        or max_experiments < 1
    ):
        raise ValueError(f"legacy_max_experiments must be at least 1, got {max_experiments!r}")
    since: float | None = None
    if active_only:
        since = float(recent_seconds) if recent_seconds is not None else LEGACY_ACTIVE_WINDOW
    elif recent_seconds is not None:
        warnings.warn(
            "legacy_recent_seconds has an effect only with legacy_active_only=True (it is the "
            "window of 'active'); ignored. To sync only recent runs, pass since=SECONDS, which "
            "applies to the manifest and the legacy walk alike",
            DeprecationWarning,
            stacklevel=3,
        )
    if since is None and max_experiments is None:
        return selection
    return selection.with_limits(since=since, max_runs=max_experiments)

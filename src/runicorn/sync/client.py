"""ManifestSyncClient: mirror a lab server's runs into a local cache from its manifest.

One sync is: wait a random jitter, learn from a few kilobytes of the manifest whether
anything changed since the last sync (a handful of SFTP requests, whatever the lab's size),
otherwise download and validate the manifest, diff it against the cache state with a sorted
merge (through the backend seam), and fetch what differs -- priority 1 files of every run
first -- over pipelined SFTP channels. The cache state is committed as files land, so a
killed sync resumes where it stopped.

This module holds the client and its decisions, the ones that weigh the server's manifest
against what the cache last applied: which manifest to apply and whether anything changed,
what to delete (the deletion guard), and the state recorded around a sync. The mechanics
live beside it:

* :mod:`.manifest_fetch` finds, reads (header fast path, size caps) and validates the
  server's manifest;
* :mod:`.transfer` turns the diff into fetched, verified (append-verify) and installed
  files, committing the state in batches;
* :mod:`.stats` holds the counters all three fill and the stats dict they become.

Everything the server says is untrusted: manifests are size-capped and validated, and every
destination goes through :meth:`LocalCacheManager.open_parent`, which refuses paths that
could leave the cache and symbolic links inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from runicorn._sys.gcpause import paused_gc
from runicorn.core.backend import Backend, active_backend
from runicorn.format.client_names import is_case_insensitive
from runicorn.format.delta import read_delta
from runicorn.format.layout import DELETED_MARKER, UNKNOWN_STATUS, run_prefix
from runicorn.format.models import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
    ValidationMemo,
    read_header,
    run_digest,
)
from runicorn.sync.cache import LocalCacheManager, RunRecord, tree
from runicorn.sync.cache.manager import same_server
from runicorn.sync.manifest_fetch import (
    ManifestFetcher,
    Probe,
    check_root,
    normalize_root,
)
from runicorn.sync.run_status import EVENTS_FILE, RunChange
from runicorn.sync.selection import RunSelection
from runicorn.sync.stats import ProgressCallback, SyncRun, SyncStats
from runicorn.sync.transfer import FileTransfer, Transfer, WholeFiles, plan
from runicorn.sync.twins import drop_case_twins
from runicorn.sync.viewer import ViewerChanges

if TYPE_CHECKING:
    import paramiko

    from runicorn.core.diff import DiffResult, LocalEntry
    from runicorn.sync.cache import AppliedManifest
    from runicorn.sync.viewer import ViewerNotifier
    from runicorn.sync.watch import CacheWatcher
    from runicorn.transport.remote import Remote

__all__ = ["ManifestSyncClient", "ProgressCallback"]

STATUS_NAME = "status.json"
"""The file of every run the quick local check looks at (see ``_disk_damage``)."""

# The API document names this logger; the client keeps it so that logging configured
# against the document still sees the client's messages.
logger = logging.getLogger("runicorn.remote_storage.manifest_sync")


LOCK_TIMEOUT = 600.0
"""Default seconds a sync waits for another one writing into the same cache: longer than a
cold sync of a large lab usually takes, shorter than a timer's patience."""

MASS_DELETE_FRACTION = 0.5
MASS_DELETE_LIMIT = 100

STALE_MANIFEST_SECONDS = 3600.0
"""A manifest generated longer ago than this while the server has runs ``running`` is
warned about: a running run changes its files, so its manifest should be newer."""

_MODES = ("auto", "full", "active")

FULL_STAMP_ASK_AFTER_SECONDS = 60.0
"""A no-change check without a recorded stamp asks for one (a STAT more), but not again
within this long of a sync that asked and could not keep it (too fresh)."""

FULL_STAMP_SETTLE_SECONDS = 2.0
"""A full manifest's stamp (size, whole-second mtime) is kept for the next no-change check
only once its mtime is this far in the past: by then no other manifest can be written with
the same mtime second (allowing a second of clock difference with the server)."""


class ManifestSyncClient:
    """Syncs one remote experiments root into one local cache directory.

    Tuning knobs (class attributes, settable per instance or globally):

    * ``MAX_WORKERS``: SFTP channels fetching concurrently, each opened on the same SSH
      transport (an ``SFTPClient`` is never shared between threads); ``max_workers=``
      overrides it per client.
    * ``BATCH_SIZE``: finished files per state commit (also at most every 0.5 s; while
      files land faster, at most one commit per 0.05 s unless 8 MiB wait). It bounds what
      a killed sync fetches again when re-run to a fraction of a second's work.
    * ``VERIFY_INTERVAL``: seconds between full checks of the cached files on disk. Every
      sync checks the ``status.json`` of each run recorded running and of every run in a
      directory that moved since the last sync (one ``lstat`` each); every cached file
      (one ``lstat`` each) is checked when ``verify=True``, after an interrupted sync, and
      on the first sync this long after the last full check.
    * ``STALE_MANIFEST_SECONDS``: a manifest older than this while the server lists runs as
      ``running`` is warned about (``stale_manifest`` in the stats).
    """

    MAX_WORKERS = 3
    BATCH_SIZE = 5
    VERIFY_INTERVAL = 24 * 3600.0
    STALE_MANIFEST_SECONDS = STALE_MANIFEST_SECONDS

    def __init__(
        self,
        sftp_client: paramiko.SFTPClient | None,
        remote_root: str,
        cache_dir: Path,
        jitter_max: float = 5.0,
        *,
        backend: Backend | None = None,
        remote: Remote | None = None,
        cache_manager: LocalCacheManager | None = None,
        max_workers: int | None = None,
        delete: bool = False,
        allow_mass_delete: bool = False,
        dry_run: bool = False,
        timeout: float = 30.0,
        max_manifest_bytes: int = ManifestFormat.MAX_DECOMPRESSED_BYTES,
        max_manifest_entries: int = ManifestFormat.MAX_ENTRIES,
        lock_timeout: float | None = LOCK_TIMEOUT,
        manifest_type: str | ManifestType = "auto",
        viewer: ViewerNotifier | None = None,
        verify: bool = False,
        projects: Sequence[str] = (),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        since: float | str | None = None,
        selection: RunSelection | None = None,
        stream: bool | None = None,
        stream_python: str | None = None,
    ) -> None:
        if sftp_client is None and remote is None:
            raise ValueError("pass an sftp_client, or a remote to sync from")
        mode = manifest_type.value if isinstance(manifest_type, ManifestType) else manifest_type
        if mode not in _MODES:
            raise ValueError(f"manifest_type must be one of {_MODES}, got {manifest_type!r}")
        if jitter_max < 0:
            raise ValueError(f"jitter_max must be >= 0, got {jitter_max}")
        if max_manifest_bytes < 1 or max_manifest_entries < 1:
            raise ValueError(
                "max_manifest_bytes and max_manifest_entries must be at least 1, got "
                f"{max_manifest_bytes} and {max_manifest_entries}"
            )
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.sftp_client = sftp_client
        self.remote_root = remote_root
        self.cache_dir = Path(cache_dir)
        self.jitter_max = jitter_max
        self.backend = backend or active_backend()
        self._active_memo = ValidationMemo()
        self.cache = cache_manager or LocalCacheManager(self.cache_dir)
        if cache_manager is not None and cache_manager.root_dir != Path(
            os.path.abspath(self.cache_dir)
        ):
            raise ValueError(
                f"cache_manager manages {cache_manager.root_dir}, not cache_dir {self.cache_dir}"
            )
        self.max_workers = max_workers
        self.stream = stream
        """Fetch through the compressed file stream: on, off, or automatic (``None``), for
        the SFTP remote this client builds (:mod:`runicorn.transport.file_stream`)."""
        self.stream_python = stream_python
        """The server's interpreter that runs the file stream (``None``: ``python3``)."""
        self.delete = delete
        self.allow_mass_delete = allow_mass_delete
        self.dry_run = dry_run
        self.timeout = timeout
        self.max_manifest_bytes = max_manifest_bytes
        self.max_manifest_entries = max_manifest_entries
        self.lock_timeout = lock_timeout
        """Seconds to wait for another sync writing into the same cache (``None``: no
        limit); then :class:`~runicorn.sync.cache.CacheError`."""
        self.manifest_type = mode
        self.viewer = viewer
        self.last_changes = ViewerChanges()
        """Runs the last sync added, changed and removed (what a viewer is told)."""
        self.last_run_changes: tuple[RunChange, ...] = ()
        """Every run the last sync call added, changed (a file landed or failed) or removed,
        with what moved: what a live view shows (empty when nothing changed)."""
        self.verify = verify
        narrowed = RunSelection.of(projects, include, exclude, since)
        if selection is not None and not narrowed.is_everything:
            raise ValueError("pass a selection, or projects/include/exclude/since, not both")
        self.selection = selection if selection is not None else narrowed
        """The runs this client mirrors (:mod:`runicorn.sync.selection`); others are never
        fetched nor deleted."""
        self._full_check = False
        self._delta_target: tuple[int, str, int] | None = None
        """Full revision, snapshot and vanished count to record when the active manifest
        being applied stands in for the full one (:meth:`_check_delta`)."""
        self._active_seen: Probe | Literal[False] | None = False
        """The active manifest's first bytes as this sync's first round trip found them
        (``None``: not there; ``False``: not asked), for :meth:`_adopt_active`."""
        self._damage: set[str] | None = None
        self.pushed_active: bytes | None = None
        """Set by a watch for one pass: the active manifest's ``.gz`` as the server pushed it,
        read instead of the server's copy when it is not older than the one applied."""
        self._full_stamp: tuple[int, int] | None = None
        """Size and mtime of the full manifest's ``.gz`` as this sync first saw them."""
        self._full_stamp_of: str | None = None
        """The snapshot this sync found that full manifest to be (or applied in its place)."""
        self._remote = remote
        self._remote_id: str | None = None
        self._owns_remote = remote is None
        self._busy = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: CacheWatcher | None = None

    # -- the remote ------------------------------------------------------------------------

    @property
    def remote(self) -> Remote:
        """The :class:`Remote` this client reads from (built from ``sftp_client`` on first use)."""
        if self._remote is None:
            from runicorn.transport.sftp_remote import SftpRemote  # late: importing stays cheap

            if self.sftp_client is None:
                raise ValueError("pass an sftp_client, or a remote to sync from")
            self._remote = SftpRemote(
                self.sftp_client,
                self.remote_root,
                timeout=self.timeout,
                stream=self.stream,
                stream_python=self.stream_python,
            )
        return self._remote

    @property
    def remote_id(self) -> str:
        """Who the cache state is about: host and root of the server (spec: host + root).

        Found once from the SSH connection and kept: after the connection dropped it can
        no longer be asked, and a reconnection (:meth:`use_sftp_client`) reaches the same
        server."""
        if self._remote_id is None:
            found, certain = self._find_remote_id()
            if not certain:
                return found
            self._remote_id = found
        return self._remote_id

    def _find_remote_id(self) -> tuple[str, bool]:
        """The remote id, and whether it came from a live connection or an explicit remote
        (else it is the ``file://`` stand-in, not worth keeping)."""
        explicit = getattr(self._remote, "remote_id", None)
        if isinstance(explicit, str) and explicit:
            return explicit, True
        root = normalize_root(self.remote_root)
        if self.sftp_client is not None:
            with contextlib.suppress(Exception):
                channel = self.sftp_client.get_channel()
                if channel is not None:
                    transport = channel.get_transport()
                    peer = transport.getpeername()
                    # ``hostname`` is set by paramiko's Transport, though its stubs omit it.
                    host = getattr(transport, "hostname", None) or peer[0]
                    user = transport.get_username()
                    return f"sftp://{user}@{host}:{peer[1]}/{root.lstrip('/')}", True
        return f"file://{os.path.abspath(self.remote_root)}", self.sftp_client is None

    def use_sftp_client(self, sftp_client: paramiko.SFTPClient) -> None:
        """Read from ``sftp_client`` from now on (a fresh session after the old one dropped);
        the remote built on the old one is closed."""
        if not self._owns_remote:
            raise ValueError("this client reads from a remote it was given; replace that")
        with self._busy:
            if self._remote is not None:
                with contextlib.suppress(Exception):
                    self._remote.close()
                self._remote = None
            self.sftp_client = sftp_client

    def close(self) -> None:
        """Close the remote if this client built it, and the state database."""
        if self._owns_remote and self._remote is not None:
            with contextlib.suppress(Exception):
                self._remote.close()
            self._remote = None
        self.cache.close()

    # -- public API ------------------------------------------------------------------------

    def sync(self, progress_callback: ProgressCallback | None = None) -> SyncStats:
        """Bring the cache up to date with the server's manifest; returns this call's stats.

        Raises ``OSError`` (``IOError``) when no manifest can be read and ``ValueError``
        when the manifest fails validation. Per-file problems do not raise: they are
        counted in ``failed_count``, listed in ``failed_files`` and retried next time.
        """
        run = SyncRun(started=time.monotonic())
        if self.jitter_max > 0:
            time.sleep(random.uniform(0, self.jitter_max))
        with self._busy, self._locked():
            self.last_run_changes = ()
            self._delta_target = None
            self._full_stamp = self._full_stamp_of = None
            self._active_seen = False
            remote_id = self.remote_id
            self._claim(remote_id)
            self._start_disk_check(full=None)
            full_state = self.cache.applied_manifest(remote_id, ManifestType.FULL.value)
            if full_state is not None and (
                self.cache.selection_applied(remote_id) != self.selection.fingerprint
            ):
                # Applied under another selection: runs it left out may be wanted now, so
                # the whole manifest is weighed again (the no-change check cannot tell).
                full_state = None
            if full_state is None and not self.dry_run:
                # A first sync fetches everything: open the worker channels while the
                # manifest downloads, not after.
                warm_up = getattr(self.remote, "warm_up", None)
                if warm_up is not None:
                    warm_up(self.max_workers or self.MAX_WORKERS)
            if full_state is None or self.manifest_type != "active":
                manifest = self._check_full(run, remote_id, full_state)
            else:
                manifest = self._check_active(run, remote_id, forced=True)
                if manifest is None and not run.skipped:
                    logger.info("no active manifest on the server; using the full manifest")
                    manifest = self._check_full(run, remote_id, full_state)
            if manifest is None:
                if not self.dry_run:
                    if self._damage is not None:  # the local check ran: what it saw holds
                        self.cache.stamp_containers()
                    self.cache.save_remote_sync(remote_id, "unchanged")
                    self._record_full_stamp(remote_id)
                    if self.viewer is not None:
                        self._unhide({key[2] for key in self.cache.runs_of_remote(remote_id)})
                self._warn_if_stale(run, remote_id, None)
                return run.stats()
            self._apply(manifest, run, progress_callback, remote_id, record_header=True)
            self._record_full_stamp(remote_id)
            # What is left needs the manifest's header and its runs' statuses, not their
            # files: the bulk of a large lab's manifest is let go before the active
            # manifest is read beside it (the manifest is this call's own).
            for exp in manifest.experiments:
                exp.files = []
            if (
                manifest.manifest_type is ManifestType.FULL
                and self.manifest_type == "auto"
                and not self.dry_run
                and not run.failed
            ):
                self._adopt_active(run, remote_id, manifest)
            self._warn_if_stale(run, remote_id, manifest)
        return run.stats()

    def _warn_if_stale(self, run: SyncRun, remote_id: str, manifest: SyncManifest | None) -> None:
        """Warn (log and ``stale_manifest``) when the newest manifest known from this server
        is older than :data:`STALE_MANIFEST_SECONDS` while runs there are ``running``: the
        generator has probably stopped, and the cache silently stops following the runs.
        ``manifest``: the one just applied; ``None`` when the revision was unchanged."""
        generated = [manifest.generated_at] if manifest is not None else []
        for manifest_type in (ManifestType.FULL, ManifestType.ACTIVE):
            state = self.cache.applied_manifest(remote_id, manifest_type.value)
            if state is not None:
                generated.append(state.generated_at)
        if not generated:
            return
        age = time.time() - max(generated)
        if age <= self.STALE_MANIFEST_SECONDS:
            return
        if manifest is not None:
            running = sum(exp.status == "running" for exp in manifest.experiments)
        else:  # one count, not every cached run with its files' sizes
            running = self.cache.running_run_count(remote_id)
        if not running:
            return
        message = (
            f"the server's newest manifest was generated {age / 3600:.1f} h ago, yet it lists "
            f"{running} run(s) as running: is generate-manifest still scheduled there (cron, "
            "timer or --watch)? (A run that died without updating its status.json looks "
            "running too.)"
        )
        logger.warning("%s", message)
        run.extra["stale_manifest"] = message

    def watch(
        self,
        *,
        interval: float = 1.7,
        full_interval: float = 30.0,
        on_sync: Callable[[SyncStats], None] | None = None,
        on_error: Callable[[BaseException, float], None] | None = None,
        reconnect: Callable[[], paramiko.SFTPClient] | None = None,
        push: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """Sync, then keep the cache fresh until :meth:`stop_watch` (from any thread).

        Over SSH the server is asked to push its publications (a small ``python3`` command on
        an exec channel; ``push=False``, or ``RUNICORN_WATCH_PUSH=0`` when ``push`` is
        ``None``, turns it off); where it cannot, every ``interval`` seconds the active
        manifest is probed and applied when it moved. Every ``full_interval`` seconds the
        full one is checked too (new and removed runs, anything between two active
        manifests). ``on_sync`` gets the stats of every pass
        (``skipped`` when nothing changed); ``on_error`` gets each failed pass's error and
        the seconds until the next attempt (1 s, doubling to 30 s); ``reconnect`` returns a
        fresh SFTP session after a connection error; ``on_progress`` is each pass's
        ``progress_callback`` (as of :meth:`sync`). A failed pass never raises; see
        :mod:`runicorn.sync.watch`.
        """
        from runicorn.sync.watch import CacheWatcher  # late: a plain sync never needs it

        watcher = CacheWatcher(
            self,
            interval=interval,
            full_interval=full_interval,
            on_sync=on_sync,
            on_error=on_error,
            reconnect=reconnect,
            stop_event=self._watch_stop,
            push=push,
            on_progress=on_progress,
        )
        self._watcher = watcher
        try:
            watcher.run()
        finally:
            self._watcher = None
            self._watch_stop.clear()

    def stop_watch(self) -> None:
        """End :meth:`watch` once its pass in progress is over. Safe from any thread and
        from a signal handler; called before :meth:`watch` starts, that watch returns at
        once."""
        self._watch_stop.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.stop()  # also ends its wait for the server's next change

    def sync_with_manifest(
        self, manifest: SyncManifest, progress_callback: ProgressCallback | None = None
    ) -> SyncStats:
        """Apply a manifest built elsewhere (the legacy walk): same diff, transfer and state.

        The manifest is validated again (``ValueError``); its revision is not remembered
        for the no-change check, since a synthesised manifest has none worth trusting.
        """
        run = SyncRun(started=time.monotonic())
        checked = SyncManifest.from_dict(manifest.to_dict(), source="synthesised manifest")
        with self._busy, self._locked():
            self.last_run_changes = ()
            remote_id = self.remote_id
            self._claim(remote_id)
            # The legacy walk lists every server file anyway: checking every cached one is
            # in proportion.
            self._start_disk_check(full=True)
            self._apply(checked, run, progress_callback, remote_id, record_header=False)
        return run.stats()

    # -- choosing the manifest --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.dry_run:
            yield
            return
        with self.cache.sync_lock(self.lock_timeout):
            yield

    def _claim(self, remote_id: str) -> None:
        """Refuse (``CacheOwnerError``) a cache that mirrors another server or root; a dry
        run checks without recording. Without a live connection to ask (the sync then fails
        on it) there is nothing certain to check."""
        if self._remote_id is None and self.sftp_client is not None:
            return
        if self.dry_run:
            recorded = self.cache.mirrored_remote()
            if recorded is not None and not same_server(recorded, remote_id):
                self.cache.claim(remote_id)  # raises, with the message
            return
        self.cache.claim(remote_id)

    def _is_clean(self, remote_id: str, run: SyncRun) -> bool:
        """Whether nothing is pending locally: no failures, no interrupted sync, and nothing
        damaged on disk as far as this sync checks (:meth:`_disk_damage`)."""
        return (
            not self.cache.failed_files()
            and not self.cache.is_dirty()
            and not self.cache.recycled_runs()
            and not self._disk_damage(run)
        )

    # -- what local damage is looked for --------------------------------------------------------

    def _start_disk_check(self, *, full: bool | None) -> None:
        """Decide how this sync checks the cached files on disk (``None``: by the rules)."""
        self._damage = None
        if full is None:
            full = self.verify or self.cache.is_dirty()
            if not full:
                when = self.cache.verified_at()
                full = when is None or not 0 <= time.time() - when < self.VERIFY_INTERVAL
        self._full_check = full

    def _disk_damage(self, run: SyncRun, local: list[LocalEntry] | None = None) -> set[str]:
        """Recorded files missing or changed on disk, found once per sync.

        The full check lstats every recorded file. The quick one
        (:meth:`LocalCacheManager.damaged_runs`) lstats the ``status.json`` of the runs
        that could have changed locally -- those recorded running, and every run of a run
        container whose mtime moved (a run directory removed, moved away or put back) --
        and fully checks only the runs where that found something. ``local`` is the
        recorded files when the caller has them already.
        """
        if self._damage is not None:
            return self._damage
        if self._full_check:
            damage = self.cache.damaged_files(local)
            run.extra["verified"] = True
            if not self.dry_run:
                self.cache.set_verified_at(time.time())
        else:
            damage = self.cache.damaged_runs()
            if damage:
                runs = {path[: -len(STATUS_NAME)] for path in damage}
                entries = local if local is not None else self.cache.file_entries_under(runs)
                damage |= self.cache.damaged_under(entries, runs)
        self._damage = damage
        return damage

    def _manifests(self) -> ManifestFetcher:
        """Reads this server's manifests, with the client's current settings."""
        return ManifestFetcher(
            lambda: self.remote,
            self.remote_root,
            self.max_manifest_bytes,
            self.max_manifest_entries,
            self._active_memo,
        )

    def _check_full(
        self, run: SyncRun, remote_id: str, state: AppliedManifest | None
    ) -> SyncManifest | None:
        """The full manifest to apply, or ``None`` after a cheap no-change check.

        The check first asks for the size and mtime of the full manifest's ``.gz`` (one STAT)
        beside the active manifest's first bytes: when they are what this cache recorded
        with the full manifest it applied (:meth:`_record_full_stamp`), the full manifest is
        that one and its header is not read. Otherwise its header decides, as it always did.
        """
        fetcher = self._manifests()
        probe = None
        deletions_pending = self.delete and state is not None and state.vanished > 0
        if (
            state is not None
            and state.clean
            and not deletions_pending
            and self._is_clean(remote_id, run)
        ):
            # The active manifest is probed in the same round trip, in case it is needed.
            also_active = self.manifest_type == "auto"
            active_probe: Probe | Literal[False] | None = False
            if also_active:  # a watch's pushed copy saves reading the server's
                active_probe = self._pushed_probe(
                    run,
                    self.cache.applied_manifest(remote_id, ManifestType.ACTIVE.value),
                    clean=True,
                )
            active_wanted = [(ManifestType.ACTIVE, True)] * (also_active and active_probe is False)
            recorded = self.cache.full_manifest_stamp(remote_id)
            if isinstance(recorded, tuple) and recorded[0] == state.snapshot_id:
                found = fetcher.probe_many(active_wanted, run, stamp_full=True)
                self._full_stamp = fetcher.full_stamp
                if active_wanted:
                    active_probe = found[0]
                elif not also_active:
                    active_probe = None
                if fetcher.full_stamp is not None and fetcher.full_stamp == recorded[1:]:
                    return self._full_unchanged(run, remote_id, state, active_probe)
            probes = fetcher.probe_many(
                [(ManifestType.FULL, False)] + (active_wanted if active_probe is False else []),
                run,
                # one STAT more, at most once a minute while none can be kept
                stamp_full=self._full_stamp is None
                and not (
                    isinstance(recorded, float)
                    and 0 <= time.time() - recorded < FULL_STAMP_ASK_AFTER_SECONDS
                ),
            )
            if self._full_stamp is None:
                self._full_stamp = fetcher.full_stamp
            if active_probe is False:
                active_probe = probes[1] if also_active else None
            self._active_seen = active_probe
            probe = probes[0]
            if probe is None:
                raise OSError(fetcher.missing_message(ManifestType.FULL))
            header = probe.header
            if header is not None and (
                header["manifest_type"],
                header["revision"],
                header["snapshot_id"],
            ) == (ManifestType.FULL.value, state.revision, state.snapshot_id):
                self._full_stamp_of = state.snapshot_id
                return self._full_unchanged(run, remote_id, state, active_probe)
            if also_active and header is not None and not self.delete and not self._full_check:
                delta = self._check_delta(run, remote_id, state, header, active_probe)
                if delta is not None:
                    self._full_stamp_of = str(header["snapshot_id"])
                    return delta
        else:
            # A first or unclean sync needs the whole manifest anyway; a small one arrives
            # with this first READ (two round trips, no FSTAT, nobody waits for the CLOSE).
            probe = fetcher.probe_many([(ManifestType.FULL, False)], run, stamp_full=True)[0]
            self._full_stamp = fetcher.full_stamp
        manifest = fetcher.download(ManifestType.FULL, run, probe)
        self._full_stamp_of = manifest.snapshot_id
        if state is not None and manifest.revision < state.revision:
            message = (
                f"the server's full manifest has revision {manifest.revision}, older than "
                f"revision {state.revision} this cache applied last (a restored backup, or "
                "the generator's state lost?); applying it, since it is what the server says "
                "now"
            )
            logger.warning(message)
            run.extra["older_revision"] = message
        return manifest

    def _full_unchanged(
        self,
        run: SyncRun,
        remote_id: str,
        state: AppliedManifest,
        active_probe: Probe | Literal[False] | None,
    ) -> SyncManifest | None:
        """The full manifest is the one applied last: the active one may still have moved
        (``auto``); otherwise nothing changed."""
        run.manifest_type = ManifestType.FULL.value
        run.manifest_revision = state.revision
        if self.manifest_type == "auto":
            active = self._check_active(run, remote_id, forced=False, probe=active_probe)
            if active is not None:
                return active
            if run.manifest_type == ManifestType.ACTIVE.value:
                return None  # the active check decided (stale or unchanged)
        run.skipped = True
        run.reason = f"manifest revision {state.revision} unchanged"
        return None

    def _adopt_active(self, run: SyncRun, remote_id: str, full: SyncManifest) -> None:
        """After a full manifest was applied, record the active manifest published beside it
        as applied too when it lists nothing the cache does not now hold exactly so (every
        run left out by its digest) or is older: the next sync then finds it unchanged
        instead of reading it. Anything else is left for the next sync to apply.

        The active manifest as the first round trip found it serves as well as one read
        now: one published since is another revision, which the next sync reads."""
        fetcher = self._manifests()
        try:
            probe = self._active_seen
            if probe is False:
                probe = fetcher.probe_many([(ManifestType.ACTIVE, True)], run)[0]
            if probe is None:
                return
            state = self.cache.applied_manifest(remote_id, ManifestType.ACTIVE.value)
            header = probe.header
            if (
                state is not None
                and state.clean
                and header is not None
                and (header["revision"], header["snapshot_id"])
                == (state.revision, state.snapshot_id)
            ):
                return
            active = fetcher.download(
                ManifestType.ACTIVE, run, probe, self.cache.run_digests(remote_id)
            )
            check_root(active, self.remote_root, local=self.sftp_client is None)
        except (OSError, ValueError) as error:
            logger.debug("active manifest not adopted after the full one: %s", error)
            return
        if active.generated_at >= full.generated_at and (active.experiments or active.skipped):
            return
        self.cache.save_applied_manifest(
            remote_id,
            ManifestType.ACTIVE.value,
            active.revision,
            active.snapshot_id,
            active.generated_at,
            clean=True,
        )

    def _record_full_stamp(self, remote_id: str) -> None:
        """Remember the full manifest's size and mtime with the snapshot this sync found it
        to be, for the next no-change check. Taken before its header was read, the stamp
        can only be older than the snapshot: a manifest replaced in between shows another
        stamp next time and its header is read then. A stamp whose mtime second may not be
        over yet (within 2 s of now: a manifest replaced within the same second, at the same
        size, would look the same) is not kept."""
        stamp, snapshot_id = self._full_stamp, self._full_stamp_of
        if self.dry_run or stamp is None or snapshot_id is None:
            return
        if stamp[1] > time.time() - FULL_STAMP_SETTLE_SECONDS:
            self.cache.save_full_manifest_stamp(remote_id, time.time())
        else:
            self.cache.save_full_manifest_stamp(remote_id, (snapshot_id, *stamp))

    def _pushed_probe(
        self, run: SyncRun, state: AppliedManifest | None, *, clean: bool
    ) -> Probe | Literal[False]:
        """:attr:`pushed_active` as a probe of the active manifest; ``False`` when there is
        none, or it is unreadable or older than the active manifest applied (``state``):
        then the server's copy is read.

        A pushed delta (:mod:`runicorn.format.delta`) stands for the whole active manifest
        only when ``state`` is its base, applied cleanly, and nothing is pending locally
        (``clean``): its probe is then the delta's manifest, which lists the runs changed
        since the base. Otherwise the whole manifest is read."""
        data = self.pushed_active
        if data is None:
            return False
        fetcher = self._manifests()
        try:
            delta = read_delta(data, self.max_manifest_bytes)
        except ValueError as error:
            logger.info("pushed delta unusable (%s); reading the active manifest", error)
            return False
        if delta is None:
            probe = fetcher.pushed_probe(ManifestType.ACTIVE, data)
        else:
            base = delta[:2]
            if not clean or state is None or not state.clean:
                return False
            if base != (state.revision, state.snapshot_id):
                logger.debug(
                    "pushed delta from active revision %d, not %d; reading the whole manifest",
                    base[0],
                    state.revision,
                )
                return False
            path = fetcher.candidates(ManifestType.ACTIVE)[1][0]
            probe = Probe(path, False, delta[2], True, read_header(delta[2]))
            logger.debug("applying the pushed delta from active revision %d", base[0])
        revision = None if probe.header is None else probe.header.get("revision")
        if not isinstance(revision, int) or (state is not None and revision < state.revision):
            return False
        run.bytes_downloaded += len(data)
        return probe

    def _check_delta(
        self,
        run: SyncRun,
        remote_id: str,
        state: AppliedManifest,
        header: dict[str, Any],
        probe: Probe | Literal[False] | None,
    ) -> SyncManifest | None:
        """The active manifest, when it can stand in for the full one that moved on: it
        names the full manifest this cache last applied and, last, the one now published
        (``changes_since``), so it lists every run that differs from the cache but those
        removed. ``None`` (the full manifest is read) otherwise. Never with ``delete``
        (removals are in the full manifest only) nor on a full check of the cache."""
        if not probe:
            return None
        try:
            manifest = self._manifests().download(
                ManifestType.ACTIVE, run, probe, self._known_runs(remote_id, run)
            )
        except (OSError, ValueError) as error:
            logger.info("active manifest unusable (%s); reading the full manifest", error)
            return None
        named = manifest.changes_since or []
        if (
            state.snapshot_id not in named
            or named[-1] != header["snapshot_id"]
            or manifest.generated_at < state.generated_at
        ):
            logger.info(
                "active manifest revision %d does not cover full revisions %d to %d; "
                "reading the full manifest",
                manifest.revision,
                state.revision,
                header["revision"],
            )
            return None
        run.extra["delta_from"] = state.revision
        run.extra["delta_to"] = int(header["revision"])
        self._delta_target = (int(header["revision"]), str(header["snapshot_id"]), state.vanished)
        return manifest

    def _known_runs(self, remote_id: str, run: SyncRun) -> dict[str, bytes] | None:
        """The runs the cache holds exactly as a manifest applied cleanly listed them (by
        the digest of their JSON), for leaving them out of an active manifest's decoding:
        only while nothing is pending locally, so that what the records say is on disk."""
        if not self._is_clean(remote_id, run):
            return None
        return self.cache.run_digests(remote_id)

    def _check_active(
        self,
        run: SyncRun,
        remote_id: str,
        *,
        forced: bool,
        probe: Probe | Literal[False] | None = False,
    ) -> SyncManifest | None:
        """The active manifest when it moved since last applied; ``None`` when unchanged,
        absent (auto mode probes only the ``.gz`` the generator always writes) or stale.
        ``probe``: what probing it found already (``None``: absent); not given: probe now."""
        state = self.cache.applied_manifest(remote_id, ManifestType.ACTIVE.value)
        clean = state is not None and state.clean and (not forced or self._is_clean(remote_id, run))
        if probe is False:
            probe = self._pushed_probe(run, state, clean=clean)
        if probe is False:
            probe = self._manifests().probe_many([(ManifestType.ACTIVE, not forced)], run)[0]
        if probe is None:
            return None
        header = probe.header
        if (
            clean
            and state is not None  # (clean says so; for the type checker)
            and header is not None
            and (header["manifest_type"], header["revision"], header["snapshot_id"])
            == (ManifestType.ACTIVE.value, state.revision, state.snapshot_id)
        ):
            if forced:
                run.manifest_type = ManifestType.ACTIVE.value
                run.manifest_revision = state.revision
                run.skipped = True
                run.reason = f"active manifest revision {state.revision} unchanged"
            return None
        manifest = self._manifests().download(
            ManifestType.ACTIVE, run, probe, self._known_runs(remote_id, run) if clean else None
        )
        full = self.cache.applied_manifest(remote_id, ManifestType.FULL.value)
        if full is not None and manifest.generated_at < full.generated_at:
            # Older than the full manifest already applied: its files may be older too.
            if not self.dry_run:
                self.cache.save_applied_manifest(
                    remote_id,
                    ManifestType.ACTIVE.value,
                    manifest.revision,
                    manifest.snapshot_id,
                    manifest.generated_at,
                    clean=True,
                )
            run.manifest_type = ManifestType.ACTIVE.value
            run.manifest_revision = manifest.revision
            run.skipped = True
            run.reason = (
                f"active manifest revision {manifest.revision} is older than the full "
                "manifest already applied; nothing to do"
            )
            return None
        return manifest

    # -- applying a manifest -------------------------------------------------------------------

    # A large lab's manifest is millions of live objects, and each full pass of the cyclic
    # collector walks them all (some seconds at 100,000 runs); what the apply builds holds
    # no cycles that need collecting before it ends.
    @paused_gc()
    def _apply(
        self,
        manifest: SyncManifest,
        run: SyncRun,
        progress: ProgressCallback | None,
        remote_id: str,
        *,
        record_header: bool,
    ) -> None:
        check_root(manifest, self.remote_root, local=self.sftp_client is None)
        is_full = manifest.manifest_type is ManifestType.FULL
        served = manifest
        manifest, left_out = self.selection.restrict(served)
        if not self.selection.is_everything:
            run.extra["runs_filtered_out"] = left_out
        if is_case_insensitive(tree.CLIENT_PLATFORM):
            manifest, twins = drop_case_twins(
                manifest,
                lambda: [run_prefix(*key) for key in self.cache.runs_of_remote(remote_id)],
                lambda prefixes: [row[0] for row in self.cache.file_entries_under(prefixes)],
                tree.CLIENT_PLATFORM,
            )
            if twins:
                run.extra["case_twins"] = twins
        run.manifest_type = manifest.manifest_type.value
        run.manifest_revision = manifest.revision
        run.tail_hash_algorithm = manifest.tail_hashes_by
        entries = sorted(manifest.iter_files(), key=lambda entry: entry.path)
        if not self.dry_run and self._undo_viewer_deletions(manifest):
            self._damage = None  # runs moved back: what the local check found may be back
        if is_full or self._full_check:
            local = self.cache.file_entries()
            damaged = self._disk_damage(run, local)
        else:
            # An active manifest's runs are a few of the cache's: only their files can be
            # new, grown or replaced, so only theirs are read (a watch applies one every
            # publication). The quick disk check reads every file only when it found damage.
            local = self.cache.file_entries_under(exp.prefix for exp in manifest.experiments)
            damaged = self._disk_damage(run)
        if damaged:
            logger.info(
                "%d cached file(s) missing or changed locally; fetching them again", len(damaged)
            )
            local = [row for row in local if row[0] not in damaged]
        if local:
            diff: DiffResult | None = self.backend.diff_entries(
                [(e.path, e.size, e.mtime, e.is_append_only, e.tail_hash) for e in entries],
                local,
            )
        else:
            # Nothing cached (a cold sync): every file is new, and a merge with nothing
            # would only cost a tuple per file of the lab. The order is still checked.
            _check_order(entries)
            diff = None
        # Sizes of the cached copies of changed files only, not a dict of every file.
        changed = (
            {entries[i].path for i in (*diff.replaced, *diff.grown)} if diff is not None else set()
        )
        local_sizes = {row[0]: row[1] for row in local if row[0] in changed}
        unlisted = (
            self._files_to_delete(
                manifest, served, [local[i][0] for i in diff.vanished] if diff is not None else []
            )
            if is_full
            else []
        )
        del local, changed
        transfers = plan(entries, diff, local_sizes, self.cache)  # priority, then path
        del diff, local_sizes  # a cold sync's diff lists every file: not held while it runs
        run.files_total = len(transfers)
        run.bytes_total = (
            transfers.total_bytes
            if isinstance(transfers, WholeFiles)
            else sum(t.length for t in transfers)
        )
        vanished, gone = self._runs_to_delete(served, remote_id, run) if is_full else ([], [])

        if self.dry_run:
            run.incremental_count = sum(1 for t in transfers if t.append)
            run.full_count = len(transfers) - run.incremental_count
            run.deleted_count = len(gone)
            run.extra["dry_run"] = True
            if self.delete:
                run.extra["files_deleted"] = len(unlisted)
            run.reason = (
                f"dry run: would fetch {run.files_total} file(s), {run.bytes_total} bytes"
                + (f", delete {len(gone)} run(s)" if gone else "")
                + (
                    f", delete {len(unlisted)} file(s) of listed runs"
                    if unlisted and self.delete
                    else ""
                )
            )
            return

        if self.cache.is_dirty():
            self.cache.clean_temp_files()
        self.cache.set_dirty(True)
        failed = self.cache.failed_files(remote_id) if is_full else []
        if failed:
            listed = {entry.path for entry in entries}
            self.cache.clear_failures(f.path for f in failed if f.path not in listed)
            del listed
        del entries, failed  # the transfers hold the entries still needed
        now = time.time()
        if is_full:
            cached_ids = {key[2] for key in self.cache.runs_of_remote(remote_id)}
        else:  # only whether each listed run is new matters
            cached_ids = self.cache.cached_run_ids(
                remote_id, (exp.run_id for exp in manifest.experiments)
            )
        self.cache.save_runs(
            remote_id, [self._run_record(exp, None) for exp in manifest.experiments]
        )
        self.cache.save_progress(remote_id=remote_id, forget=sorted(damaged))

        # What the end of the sync needs of every run (its digest, and for a cold plan
        # which runs its files land in) is worked out while the files are copied: the copy
        # holds no GIL and leaves this thread waiting most of the time, so that Python work
        # costs no wall time there, where after the last file it would be serial.
        with _Meanwhile(_digests_and_tally, manifest.experiments, transfers) as meanwhile:
            self._transfer(transfers, run, progress, remote_id)
        digests, moved = meanwhile.result()
        if moved is None:
            moved = _Landed(manifest.experiments, transfers)
        moved.settle(run.failed, transfers)

        if gone and self.viewer is not None:
            # Only while the directories exist can the viewer drop them from its index.
            self.viewer.forget_runs(run_id for _project, _name, run_id in gone)
        if unlisted and self.delete:
            self._delete_files(unlisted, remote_id, run)
            unlisted = []
        elif unlisted:
            logger.info(
                "%d cached file(s) of listed runs are no longer on the server; kept "
                "(delete=True removes them)",
                len(unlisted),
            )
        for project, name, run_id in gone:
            self.cache.remove_run(project, name, run_id)
            logger.info(
                "removed run %s/%s/%s: the server no longer lists it", project, name, run_id
            )
            run.deleted_count += 1
        # every directory prefix of a failed file: a run failed when its prefix is one
        failed_dirs = {path[: end + 1] for path in run.failed for end in _slashes(path)}
        self.cache.save_runs(
            remote_id,
            [
                self._run_record(exp, None if exp.prefix in failed_dirs else now)
                for exp in manifest.experiments
            ],
        )
        self._save_digests(manifest, remote_id, failed_dirs, digests, is_full=is_full)
        if manifest.unchanged:
            run.extra["runs_unchanged"] = len(manifest.unchanged)
        self.last_changes = self._changes(manifest, moved, cached_ids, gone)
        self.last_run_changes = self._run_changes(manifest, moved, cached_ids, gone)
        # A twin left out keeps the manifest pending: the next sync weighs it again, and
        # fetches the twin once the cached one it would land on is gone.
        clean = not run.failed and "case_twins" not in run.extra
        if is_full:
            self.cache.save_selection_applied(remote_id, self.selection.fingerprint)
        if record_header:
            self.cache.save_applied_manifest(
                remote_id,
                run.manifest_type,
                manifest.revision,
                manifest.snapshot_id,
                manifest.generated_at,
                clean=clean,
                # runs and files a later sync with ``delete`` would remove
                vanished=len(vanished) - run.deleted_count + len(unlisted),
            )
            if self._delta_target is not None:
                # the cache now holds all the newest full manifest lists (and newer)
                revision, snapshot_id, still_vanished = self._delta_target
                self.cache.save_applied_manifest(
                    remote_id,
                    ManifestType.FULL.value,
                    revision,
                    snapshot_id,
                    manifest.generated_at,
                    clean=clean,
                    vanished=still_vanished,
                )
        self.cache.save_remote_sync(remote_id, "ok" if clean else "partial")
        self.cache.stamp_containers()
        self.cache.set_dirty(False)
        if not run.reason and self._delta_target is not None:
            run.reason = (
                f"applied active manifest revision {manifest.revision} in place of full "
                f"revision {self._delta_target[0]} (every change since full revision "
                f"{run.extra.get('delta_from')}): {run.files_synced} file(s) synced, "
                f"{len(run.failed)} failed"
            )
        if not run.reason:
            run.reason = (
                f"applied {run.manifest_type} manifest revision {manifest.revision}: "
                f"{run.files_synced} file(s) synced, {len(run.failed)} failed"
            )
        logger.info("%s", run.reason)

    def _save_digests(
        self,
        manifest: SyncManifest,
        remote_id: str,
        failed_dirs: set[str],
        digests: bytearray,
        *,
        is_full: bool,
    ) -> None:
        """Remember the JSON digest of each run this sync applied cleanly, so a later active
        manifest listing it unchanged need not be decoded for it (:meth:`_known_runs`). A
        full manifest replaces them all; a run with a failed file is forgotten.
        ``digests``: each run's, in the manifest's order (:func:`_digests_and_tally`)."""
        applied = {}
        failed = []
        for index, exp in enumerate(manifest.experiments):
            if exp.prefix in failed_dirs:
                failed.append(exp.prefix)
            else:
                start = index * _DIGEST_BYTES
                applied[exp.prefix] = bytes(digests[start : start + _DIGEST_BYTES])
        self.cache.save_run_digests(remote_id, applied, forget=failed, replace_all=is_full)

    @staticmethod
    def _changes(
        manifest: SyncManifest,
        moved: _Landed,
        cached_ids: set[str],
        gone: list[tuple[str, str, str]],
    ) -> ViewerChanges:
        """Runs this sync added, changed (some file landed) and removed, by id; ``moved``:
        what landed in each run (settled)."""
        added = {exp.run_id for exp in manifest.experiments} - cached_ids
        landed = moved.files
        changed = {exp.run_id for index, exp in enumerate(manifest.experiments) if landed[index]}
        removed = [run_id for _project, _name, run_id in gone]
        return ViewerChanges(
            added=tuple(sorted(added)),
            changed=tuple(sorted(changed - added)),
            removed=tuple(sorted(removed)),
        )

    @staticmethod
    def _run_changes(
        manifest: SyncManifest,
        moved: _Landed,
        cached_ids: set[str],
        gone: list[tuple[str, str, str]],
    ) -> tuple[RunChange, ...]:
        """Every run this sync added, changed or removed, with its files and bytes."""
        changes: list[RunChange] = []
        for index, exp in enumerate(manifest.experiments):
            added = exp.run_id not in cached_ids
            files, failed = moved.files[index], moved.failed[index]
            if not files and not failed and not added:
                continue
            size, events = moved.bytes[index], moved.events[index]
            changes.append(
                RunChange(
                    exp.project,
                    exp.name,
                    exp.run_id,
                    exp.prefix,
                    exp.status,
                    "added" if added else "changed",
                    files=files,
                    bytes=size,
                    failed=failed,
                    events=bool(events),
                )
            )
        changes.extend(
            RunChange(p, n, r, run_prefix(p, n, r), UNKNOWN_STATUS, "removed") for p, n, r in gone
        )
        return tuple(changes)

    def _undo_viewer_deletions(self, manifest: SyncManifest) -> bool:
        """Put runs the upstream viewer moved to its recycle bin back where the server has
        them: the cache is a mirror, and a run in both places would be two copies of one run.

        The directory is moved back as it is (nothing is fetched again), still carrying the
        viewer's ``.deleted`` marker, so the viewer, whose index still holds the run as
        deleted, can restore it: this sync's viewer is asked to at once; without one, the
        run is remembered and the next sync with a viewer asks (or the user restores it in
        the viewer's recycle bin). Runs the server no longer lists stay in the bin. ``True``
        when a run was put back.
        """
        listed = {exp.run_id for exp in manifest.experiments}
        put_back = sorted(set(self.cache.recycled_runs()) & listed)
        for run_id in put_back:
            self.cache.put_back(run_id)
            logger.info(
                "run %s was in the viewer's recycle bin; put it back (the server still has it)",
                run_id,
            )
        if put_back:
            self.cache.set_viewer_hidden_runs(self.cache.viewer_hidden_runs() | set(put_back))
        self._unhide(listed)
        return bool(put_back)

    def _unhide(self, listed: set[str]) -> None:
        """Have this sync's viewer restore the runs put back from its recycle bin that it
        still hides; forget those that left the server or were restored meanwhile."""
        hidden = self.cache.viewer_hidden_runs()
        if not hidden:
            return
        by_id = {run.run_id: run for run in self.cache.list_runs()}
        pending = {
            run_id
            for run_id in hidden & listed
            if run_id in by_id and (by_id[run_id].path / DELETED_MARKER).exists()
        }
        if pending and self.viewer is not None:
            pending -= set(self.viewer.restore_runs(pending))
        if pending != hidden:
            self.cache.set_viewer_hidden_runs(pending)

    @staticmethod
    def _run_record(exp: ExperimentEntry, last_synced: float | None) -> RunRecord:
        return RunRecord(
            project=exp.project,
            name=exp.name,
            run_id=exp.run_id,
            status=exp.status,
            created_at=exp.created_at,
            updated_at=exp.updated_at,
            tags=tuple(exp.tags) if exp.tags else None,
            last_synced=last_synced,
        )

    def _transfer(
        self,
        transfers: Sequence[Transfer],
        run: SyncRun,
        progress: ProgressCallback | None,
        remote_id: str,
    ) -> None:
        """Fetch, verify and install every planned file (:class:`FileTransfer`) with this
        client's cache, backend, remote and tuning knobs; the one seam to the transfer."""
        FileTransfer(
            self.cache,
            self.backend,
            lambda: self.remote,
            workers=self.max_workers or self.MAX_WORKERS,
            batch_size=self.BATCH_SIZE,
        ).transfer(transfers, run, progress, remote_id)

    @staticmethod
    def _files_to_delete(
        manifest: SyncManifest, served: SyncManifest, unlisted: list[str]
    ) -> list[str]:
        """Cached files of runs the manifest lists that it no longer lists itself: deleted on
        the server inside a run that stays. Never a file of a run outside the selection or
        no longer listed (the run deletion decides those), nor one where the server
        reports a problem or the reader skipped a name (it may exist there unseen)."""
        prefixes = {exp.prefix for exp in manifest.experiments}
        found = []
        for path in unlisted:
            slash = path.find("/")
            while slash != -1 and path[: slash + 1] not in prefixes:
                slash = path.find("/", slash + 1)
            if slash != -1 and not served.protects(path):
                found.append(path)
        return found

    def _delete_files(self, paths: list[str], remote_id: str, run: SyncRun) -> None:
        """Remove these cached files (never through a link) and forget their records."""
        removed = []
        for path in paths:
            try:
                self.cache.remove_file(path)
            except OSError as error:
                logger.warning("could not delete %s from the cache: %s", path, error)
                continue
            removed.append(path)
        self.cache.save_progress(remote_id=remote_id, forget=removed)
        run.extra["files_deleted"] = len(removed)
        if removed:
            logger.info(
                "removed %d file(s) the server deleted inside runs it still lists", len(removed)
            )

    def _runs_to_delete(
        self, manifest: SyncManifest, remote_id: str, run: SyncRun
    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Runs of this remote the full manifest no longer lists, and those of them to
        delete: all when deleting is asked and safe (spec 3.10), else none (logged, and
        the reason reported)."""
        cached = self._selected_cached_runs(remote_id)
        if not cached:  # a first sync: nothing to weigh (no set of every listed run)
            return [], []
        listed = {(exp.project, exp.name, exp.run_id) for exp in manifest.experiments}
        gone = [key for key in cached if key not in listed]
        if gone and manifest.problem_paths():
            # the server could not read (or this client skipped) what lies there: the run
            # may well still be on the server, so it is never deleted
            unseen = [key for key in gone if manifest.protects(run_prefix(*key)[:-1])]
            if unseen:
                logger.warning(
                    "%d cached run(s) lie where the server's manifest reports problems "
                    "(unreadable or skipped there: %s); kept",
                    len(unseen),
                    ", ".join(path for path, _ in manifest.problem_paths()[:5]),
                )
                run.extra["deletion_protected"] = len(unseen)
                gone = [key for key in gone if key not in set(unseen)]
        if not gone:
            return [], []
        refusal = ""
        if not self.delete:
            logger.info(
                "%d cached run(s) are no longer on the server; kept (delete=True removes them)",
                len(gone),
            )
            run.extra["vanished_runs"] = len(gone)
            return gone, []
        if not listed:
            refusal = (
                f"the manifest lists no runs while the cache holds {len(cached)}; refusing to "
                "delete anything (an empty or truncated manifest?)"
            )
        elif not self.allow_mass_delete and (
            len(gone) > MASS_DELETE_FRACTION * len(cached) or len(gone) > MASS_DELETE_LIMIT
        ):
            refusal = (
                f"{len(gone)} of {len(cached)} cached runs would be deleted; refusing a mass "
                "deletion (pass allow_mass_delete=True / --allow-mass-delete if intended)"
            )
        if refusal:
            logger.warning("%s", refusal)
            run.extra["deletion_refused"] = refusal
            run.reason = refusal
            return gone, []
        return gone, gone

    def _selected_cached_runs(self, remote_id: str) -> list[tuple[str, str, str]]:
        """This remote's cached runs inside the selection: only they may ever be deleted.

        The time window is weighed on what the cache recorded of each run; ``max_runs``
        ranks the manifest's runs only, so it never keeps a vanished run out.
        """
        cached = self.cache.runs_of_remote(remote_id)
        selection = self.selection
        if selection.is_everything:
            return cached
        if selection.since is None:
            return [key for key in cached if selection.selects_key(*key)]
        now = time.time()
        return [
            (run.project, run.name, run.run_id)
            for run in self.cache.list_runs()
            if run.remote_id == remote_id
            and selection.selects(
                run.project, run.name, run.run_id, run.created_at, run.updated_at, now
            )
        ]


class _Meanwhile:
    """``work(*args)`` on a thread of its own while the ``with`` block runs; its result (or
    its exception) from :meth:`result` after the block."""

    def __init__(self, work: Callable[..., Any], *args: Any) -> None:
        self._work = work
        self._args = args
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="runicorn-meanwhile", daemon=True)

    def _run(self) -> None:
        try:
            self._result = self._work(*self._args)
        except BaseException as error:  # handed to the caller by result()
            self._error = error

    def __enter__(self) -> _Meanwhile:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join()

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


_DIGEST_BYTES = 16
"""The size of a :func:`run_digest`."""


def _digests_and_tally(
    experiments: list[ExperimentEntry], transfers: Sequence[Transfer]
) -> tuple[bytearray, _Landed | None]:
    """Each run's digest (:func:`run_digest`), one after the other in the manifest's
    order, and for a cold plan (a :class:`WholeFiles`, whose entries never change) what its
    files bring to each run; a plan of transfers is tallied after the transfer, which may
    still change it."""
    digests = bytearray()
    for exp in experiments:
        digests += run_digest(orjson.dumps(exp.to_dict()))
    if len(digests) != _DIGEST_BYTES * len(experiments):
        raise AssertionError("a run digest is not of its documented size")
    if not isinstance(transfers, WholeFiles):
        return digests, None
    return digests, _Landed(experiments, transfers)


def _planned(transfers: Sequence[Transfer]) -> Iterator[tuple[str, int]]:
    """Each planned file's path and the bytes it moves, with no :class:`Transfer` made for
    a cold plan."""
    if isinstance(transfers, WholeFiles):
        return ((entry.path, entry.size) for entry in transfers.entries)
    return ((transfer.entry.path, transfer.length) for transfer in transfers)


class _Landed:
    """What the planned files bring to each run, by the run's position in the manifest: a
    file counts toward the run whose directory most nearly encloses it. Every file counts
    as landed until :meth:`settle` moves the failed ones. A few bytes per run, not an
    object: a cold sync of 100,000 runs tallies them all.
    """

    __slots__ = ("bytes", "events", "failed", "files", "position")

    def __init__(self, experiments: list[ExperimentEntry], transfers: Sequence[Transfer]):
        self.position = {exp.prefix: index for index, exp in enumerate(experiments)}
        zeros = bytes(8 * len(experiments))
        self.files = array("q", zeros)
        # Python ints: a manifest may list files of up to 2**63 - 1 bytes, and a run several.
        self.bytes = [0] * len(experiments)
        self.failed = array("q", zeros)
        self.events = bytearray(len(experiments))
        """1 where the run's ``events.jsonl`` is among its files (and has not failed)."""
        for path, length in _planned(transfers):
            found = self._run_of(path)
            if found is None:
                continue
            index, start = found
            self.files[index] += 1
            self.bytes[index] += length
            if path[start:] == EVENTS_FILE:
                self.events[index] = 1

    def _run_of(self, path: str) -> tuple[int, int] | None:
        """The position of the nearest run enclosing ``path`` and the length of its
        prefix, or ``None``."""
        position = self.position
        cut = path.rfind("/")
        while cut > 0:
            index = position.get(path[: cut + 1])
            if index is not None:
                return index, cut + 1
            cut = path.rfind("/", 0, cut)
        return None

    def settle(self, failed: dict[str, str], transfers: Sequence[Transfer]) -> None:
        """Move the files that failed from landed to failed (every failed file was
        planned)."""
        if not failed:
            return
        for path, length in _planned(transfers):
            if path not in failed:
                continue
            found = self._run_of(path)
            if found is None:
                continue
            index, start = found
            self.files[index] -= 1
            self.bytes[index] -= length
            self.failed[index] += 1
            if path[start:] == EVENTS_FILE:
                self.events[index] = 0


def _check_order(entries: Sequence[FileEntry]) -> None:
    """What the diff checks of the manifest's side, for a sync that needs no diff:
    ``ValueError`` unless the paths are strictly ascending (no path listed twice)."""
    for index in range(1, len(entries)):
        if not entries[index - 1].path < entries[index].path:
            raise ValueError(
                "remote entries must be sorted by path without duplicates: entry "
                f"{index} {entries[index].path!r} follows {entries[index - 1].path!r}"
            )


def _slashes(path: str) -> Iterator[int]:
    """The index of every ``/`` in ``path``."""
    end = path.find("/")
    while end >= 0:
        yield end
        end = path.find("/", end + 1)

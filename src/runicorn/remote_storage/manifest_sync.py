"""ManifestSyncClient: mirror a lab server's runs into a local cache from its manifest.

One sync is: wait a random jitter, learn from a few kilobytes of the manifest whether
anything changed since the last sync (a handful of SFTP requests, whatever the lab's size),
otherwise download and validate the manifest, diff it against the cache state with a sorted
merge (through the backend seam), and fetch what differs -- priority 1 files of every run
first -- over pipelined SFTP channels. The cache state is committed as files land, so a
killed sync resumes where it stopped.

How a file is brought up to date:

* new or changed files are written to a temp file beside their destination (named with
  :data:`runicorn.atomic.TEMP_PREFIX`), given the manifest's mtime and renamed into place:
  a reader sees the old file or the new one, never a mix;
* append-only logs that grew are extended in place, as ``rsync --append-verify`` would
  (spec 3.6): the bytes before the cached end must still match the server -- checked by the
  manifest's tail hash where its 4 KiB window reaches them, by fetching them again (up to
  4 KiB) where it does not -- and only then are the new bytes appended (viewers tail these
  files, so they are never replaced); the tail hash is checked again on disk afterwards.
  Any mismatch, or a remote file shorter than the local copy, means a full re-download.

Everything the server says is untrusted: manifests are size-capped and validated, and every
destination goes through :meth:`LocalCacheManager.open_parent`, which refuses paths that
could leave the cache and symbolic links inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import random
import secrets
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from runicorn.atomic import TEMP_PREFIX
from runicorn.core.backend import Backend, active_backend
from runicorn.core.tailhash import TAIL_WINDOW, digest
from runicorn.layout import MANIFEST_DIRNAME
from runicorn.manifest.models import (
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
    read_header,
)
from runicorn.remote_storage.cache_manager import FileRecord, LocalCacheManager, RunRecord

if TYPE_CHECKING:
    import paramiko

__all__ = ["ManifestSyncClient", "ProgressCallback"]

logger = logging.getLogger("runicorn.remote_storage.manifest_sync")

ProgressCallback = Callable[[int, int, str], None]
"""``(completed, total, current_file)``: files finished so far, files to transfer."""

PREFIX_BYTES = 255 * 1024
"""How much of a manifest the no-change check reads: its header comes first, and this is one
READ (OpenSSH's clamp), so a manifest up to this size (a gzip manifest of ~1,000 runs) arrives
whole with the check and is not downloaded again when it changed."""
COMMIT_INTERVAL = 0.5
"""Seconds between state commits at most, however slowly files land."""
MASS_DELETE_FRACTION = 0.5
MASS_DELETE_LIMIT = 100
JSON_CHECK_MAX_BYTES = 64 * 1024 * 1024
"""JSON metadata files up to this size are parsed after download (truncation check)."""
JSON_ACCEPT_AFTER_ATTEMPTS = 3
"""A JSON file still unparsable after this many syncs is installed as is, with a warning:
the server's copy is broken for good, not being rewritten."""
TRUNCATED_JSON = "truncated JSON on server (being rewritten)"
HASHED_VERIFY_BYTES = 512
"""Cached bytes (before the local end) an append must verify when the manifest has a tail
hash: by that hash where its window reaches them, by a fetched overlap otherwise."""
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
"""Appended bytes are held until verified; beyond this they spill to an unnamed temp file."""

_MODES = ("auto", "full", "active")
_FILE_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _transfer_api() -> Any:
    """The transfer engine (``Remote``, ``FetchJob``, ``SftpRemote``): the one place this
    client depends on it, imported late so importing the client stays cheap."""
    from runicorn.remote_storage import remote

    return remote


# --------------------------------------------------------------------------- helpers


def _ns(mtime: float) -> int:
    return round(mtime * 1_000_000_000)


def _reason(error: BaseException, entry: FileEntry | None = None) -> str:
    """A short, user-facing reason for a failed file."""
    if isinstance(error, FileNotFoundError):
        return "vanished on the server"
    if isinstance(error, PermissionError):
        return "permission denied on the server"
    if type(error).__name__ == "ShrunkError":
        return f"shrank on the server while it was read ({error})"
    if isinstance(error, ConnectionError | TimeoutError | EOFError):
        return f"connection lost ({error or type(error).__name__})"
    if isinstance(error, ValueError):
        return f"refused: {error}"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _is_connection_error(error: BaseException | None) -> bool:
    """The link failed (not the file): the engine fails the remaining jobs the same way."""
    if type(error).__name__ == "ShrunkError":
        return False
    return isinstance(error, ConnectionError | TimeoutError | EOFError)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _normalize_root(root: str) -> str:
    root = root.strip()
    if root in ("~", "."):
        return ""
    if root.startswith("~/"):
        root = root[2:]
    return posixpath.normpath(root) if root else ""


@dataclass
class _Probe:
    """The first bytes of one published manifest file."""

    path: str
    gz: bool
    data: bytes
    complete: bool
    header: dict[str, Any] | None


def _header_of(data: bytes, gz: bool) -> dict[str, Any] | None:
    """Header fields from a (possibly gzip) manifest prefix, or ``None`` if not there."""
    if gz:
        try:
            data = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, 256 * 1024)
        except zlib.error:
            return None
    return read_header(data)


@dataclass(eq=False)
class _Transfer:
    """One file being fetched: where its bytes go while they arrive (worker threads) and
    what the main thread must check before they become visible."""

    entry: FileEntry
    append: bool
    cache: LocalCacheManager
    local_size: int = 0
    overlap: int = 0
    temp_name: str | None = None
    fd: int = -1
    spool: Any = None
    error: BaseException | None = None
    received: int = 0

    @property
    def offset(self) -> int:
        return self.local_size - self.overlap if self.append else 0

    @property
    def length(self) -> int:
        return self.entry.size - self.offset

    def open_target(self) -> None:
        """Create the temp file (full fetch) or the spool (append); idempotent."""
        if self.append:
            if self.spool is None:
                # Spills (unnamed) into the cache's state dir: same disk as the cache.
                self.spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in discard)
                    max_size=SPOOL_MEMORY_BYTES, dir=self.cache.state_dir
                )
            return
        if self.fd >= 0:
            return
        dir_fd, _name = self.cache.open_parent(self.entry.path, create=True)
        try:
            for _attempt in range(8):
                name = f"{TEMP_PREFIX}{secrets.token_hex(8)}.part"
                try:
                    self.fd = os.open(
                        name,
                        os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS,
                        0o644,
                        dir_fd=dir_fd,
                    )
                except FileExistsError:
                    continue
                self.temp_name = name
                return
            raise FileExistsError(f"cannot create a temp file beside {self.entry.path}")
        finally:
            os.close(dir_fd)

    def sink(self, offset: int, data: bytes) -> None:
        """Called by the transfer engine with consecutive chunks (worker thread)."""
        if self.error is not None:
            return
        try:
            if offset != self.offset + self.received:
                raise ValueError(f"chunk at offset {offset} arrived out of order")
            if self.received + len(data) > self.length:
                raise ValueError("the transfer delivered more bytes than the manifest lists")
            self.open_target()
            if self.append:
                self.spool.write(data)
            else:
                _write_all(self.fd, data, self.received)
            self.received += len(data)
        except Exception as error:  # remembered, and raised so the engine drops the job
            self.error = error
            raise

    def discard(self) -> None:
        """Close and remove whatever this transfer created; its file stays as it was."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.temp_name is not None:
            with contextlib.suppress(OSError, ValueError):
                dir_fd, _name = self.cache.open_parent(self.entry.path, create=False)
                try:
                    os.unlink(self.temp_name, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            self.temp_name = None


class _Redo(Exception):
    """The append-verify failed: the file must be fetched whole."""


@dataclass
class _Run:
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


# --------------------------------------------------------------------------- client


class ManifestSyncClient:
    """Syncs one remote experiments root into one local cache directory.

    Tuning knobs (class attributes, settable per instance or globally):

    * ``MAX_WORKERS``: SFTP channels fetching concurrently, each opened on the same SSH
      transport (an ``SFTPClient`` is never shared between threads); ``max_workers=``
      overrides it per client.
    * ``BATCH_SIZE``: finished files per state commit (also at most every 0.5 s). It bounds
      what a killed sync fetches again when re-run; commits are cheap (SQLite WAL).
    """

    MAX_WORKERS = 3
    BATCH_SIZE = 5

    def __init__(
        self,
        sftp_client: paramiko.SFTPClient | None,
        remote_root: str,
        cache_dir: Path,
        jitter_max: float = 5.0,
        *,
        backend: Backend | None = None,
        remote: Any = None,
        cache_manager: LocalCacheManager | None = None,
        max_workers: int | None = None,
        delete: bool = False,
        allow_mass_delete: bool = False,
        dry_run: bool = False,
        timeout: float = 30.0,
        max_manifest_bytes: int = ManifestFormat.MAX_DECOMPRESSED_BYTES,
        manifest_type: str | ManifestType = "auto",
    ) -> None:
        if sftp_client is None and remote is None:
            raise ValueError("pass an sftp_client, or a remote to sync from")
        mode = manifest_type.value if isinstance(manifest_type, ManifestType) else manifest_type
        if mode not in _MODES:
            raise ValueError(f"manifest_type must be one of {_MODES}, got {manifest_type!r}")
        if jitter_max < 0:
            raise ValueError(f"jitter_max must be >= 0, got {jitter_max}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.sftp_client = sftp_client
        self.remote_root = remote_root
        self.cache_dir = Path(cache_dir)
        self.jitter_max = jitter_max
        self.backend = backend or active_backend()
        self.cache = cache_manager or LocalCacheManager(self.cache_dir)
        if cache_manager is not None and cache_manager.root_dir != Path(
            os.path.abspath(self.cache_dir)
        ):
            raise ValueError(
                f"cache_manager manages {cache_manager.root_dir}, not cache_dir {self.cache_dir}"
            )
        self.max_workers = max_workers
        self.delete = delete
        self.allow_mass_delete = allow_mass_delete
        self.dry_run = dry_run
        self.timeout = timeout
        self.max_manifest_bytes = max_manifest_bytes
        self.manifest_type = mode
        self._remote = remote
        self._owns_remote = remote is None
        self._busy = threading.Lock()

    # -- the remote ------------------------------------------------------------------------

    @property
    def remote(self) -> Any:
        """The :class:`Remote` this client reads from (built from ``sftp_client`` on first use)."""
        if self._remote is None:
            api = _transfer_api()
            self._remote = api.SftpRemote(self.sftp_client, self.remote_root, timeout=self.timeout)
        return self._remote

    @property
    def remote_id(self) -> str:
        """Who the cache state is about: host and root of the server (spec: host + root)."""
        explicit = getattr(self._remote, "remote_id", None)
        if isinstance(explicit, str) and explicit:
            return explicit
        root = _normalize_root(self.remote_root)
        if self.sftp_client is not None:
            with contextlib.suppress(Exception):
                transport = self.sftp_client.get_channel().get_transport()
                peer = transport.getpeername()
                host = transport.hostname or peer[0]
                return f"sftp://{transport.get_username()}@{host}:{peer[1]}/{root.lstrip('/')}"
        return f"file://{os.path.abspath(self.remote_root)}"

    def close(self) -> None:
        """Close the remote if this client built it, and the state database."""
        if self._owns_remote and self._remote is not None:
            with contextlib.suppress(Exception):
                self._remote.close()
            self._remote = None
        self.cache.close()

    # -- public API ------------------------------------------------------------------------

    def sync(self, progress_callback: ProgressCallback | None = None) -> dict[str, Any]:
        """Bring the cache up to date with the server's manifest; returns this call's stats.

        Raises ``OSError`` (``IOError``) when no manifest can be read and ``ValueError``
        when the manifest fails validation. Per-file problems do not raise: they are
        counted in ``failed_count``, listed in ``failed_files`` and retried next time.
        """
        run = _Run(started=time.monotonic())
        if self.jitter_max > 0:
            time.sleep(random.uniform(0, self.jitter_max))
        with self._busy, self._locked():
            remote_id = self.remote_id
            full_state = self.cache.applied_manifest(remote_id, ManifestType.FULL.value)
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
                    self.cache.save_remote_sync(remote_id, "unchanged")
                return run.stats()
            self._apply(manifest, run, progress_callback, remote_id, record_header=True)
        return run.stats()

    def sync_with_manifest(
        self, manifest: SyncManifest, progress_callback: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Apply a manifest built elsewhere (the legacy walk): same diff, transfer and state.

        The manifest is validated again (``ValueError``); its revision is not remembered
        for the no-change check, since a synthesised manifest has none worth trusting.
        """
        run = _Run(started=time.monotonic())
        checked = SyncManifest.from_dict(manifest.to_dict(), source="synthesised manifest")
        with self._busy, self._locked():
            self._apply(checked, run, progress_callback, self.remote_id, record_header=False)
        return run.stats()

    # -- choosing the manifest --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.dry_run:
            yield
            return
        with self.cache.sync_lock():
            yield

    def _is_clean(self, remote_id: str) -> bool:
        """Whether nothing is pending locally: no failures, no interrupted sync, and every
        recorded file on disk with its recorded size (one lstat each)."""
        return (
            not self.cache.failed_files()
            and not self.cache.is_dirty()
            and not self.cache.damaged_files()
        )

    def _check_full(self, run: _Run, remote_id: str, state: Any) -> SyncManifest | None:
        """The full manifest to apply, or ``None`` after a cheap no-change check."""
        probe = None
        deletions_pending = self.delete and state is not None and state.vanished > 0
        if (
            state is not None
            and state.clean
            and not deletions_pending
            and self._is_clean(remote_id)
        ):
            # The active manifest is probed in the same round trip, in case it is needed.
            also_active = self.manifest_type == "auto"
            probes = self._probe_many(
                [(ManifestType.FULL, False)] + [(ManifestType.ACTIVE, True)] * also_active, run
            )
            probe = probes[0]
            if probe is None:
                raise OSError(self._missing_message(ManifestType.FULL))
            header = probe.header
            if header is not None and (
                header["manifest_type"],
                header["revision"],
                header["snapshot_id"],
            ) == (ManifestType.FULL.value, state.revision, state.snapshot_id):
                run.manifest_type = ManifestType.FULL.value
                run.manifest_revision = state.revision
                if also_active:
                    active = self._check_active(run, remote_id, forced=False, probe=probes[1])
                    if active is not None:
                        return active
                    if run.manifest_type == ManifestType.ACTIVE.value:
                        return None  # the active check decided (stale or unchanged)
                run.skipped = True
                run.reason = f"manifest revision {state.revision} unchanged"
                return None
        else:
            # A first or unclean sync needs the whole manifest anyway; a small one arrives
            # with this first READ (two round trips, no FSTAT, nobody waits for the CLOSE).
            probe = self._probe_many([(ManifestType.FULL, False)], run)[0]
        return self._download(ManifestType.FULL, run, probe)

    def _check_active(
        self, run: _Run, remote_id: str, *, forced: bool, probe: Any = False
    ) -> SyncManifest | None:
        """The active manifest when it moved since last applied; ``None`` when unchanged,
        absent (auto mode probes only the ``.gz`` the generator always writes) or stale.
        ``probe``: what probing it found already (``None``: absent); not given: probe now."""
        state = self.cache.applied_manifest(remote_id, ManifestType.ACTIVE.value)
        clean = state is not None and state.clean and (not forced or self._is_clean(remote_id))
        if probe is False:
            probe = self._probe_many([(ManifestType.ACTIVE, not forced)], run)[0]
        if probe is None:
            return None
        header = probe.header
        if (
            clean
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
        manifest = self._download(ManifestType.ACTIVE, run, probe)
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

    def _candidates(self, manifest_type: ManifestType) -> list[tuple[str, bool]]:
        base = f"{MANIFEST_DIRNAME}/{manifest_type.filename}"
        return [(base + ManifestFormat.GZIP_SUFFIX, True), (base, False)]

    def _where(self, path: str) -> str:
        return f"{self.remote_root.rstrip('/')}/{path}"

    def _missing_message(self, manifest_type: ManifestType) -> str:
        return (
            f"no {manifest_type.value} manifest at "
            f"{self._where(MANIFEST_DIRNAME + '/' + manifest_type.filename)}(.gz); generate "
            f"one on the server with `runicorn generate-manifest --root {self.remote_root}`"
        )

    def _probe_many(
        self, wanted: Sequence[tuple[ManifestType, bool]], run: _Run
    ) -> list[_Probe | None]:
        """Read the first :data:`PREFIX_BYTES` of each published manifest in ``wanted``
        (type, gz only), all ``.gz`` candidates in one pipeline: OPEN, READ and a CLOSE
        nobody waits for, two round trips however many. A missing ``.gz`` is followed by
        its plain ``.json`` unless gz only. ``None`` for a type with no manifest published."""
        found: list[_Probe | None] = [None] * len(wanted)
        rounds = [
            [(i, *self._candidates(kind)[0]) for i, (kind, _) in enumerate(wanted)],
            [
                (i, *self._candidates(kind)[1])
                for i, (kind, gz_only) in enumerate(wanted)
                if not gz_only
            ],
        ]
        for candidates in rounds:
            todo = [(i, path, gz) for i, path, gz in candidates if found[i] is None]
            if not todo:
                continue
            results = self._read_prefixes([path for _, path, _ in todo])
            for (i, path, gz), data in zip(todo, results, strict=True):
                if isinstance(data, FileNotFoundError):
                    continue
                if isinstance(data, BaseException):
                    where = self._where(path)
                    raise OSError(f"cannot read the manifest {where}: {data}") from data
                run.bytes_downloaded += len(data)
                complete = len(data) < PREFIX_BYTES
                found[i] = _Probe(path, gz, data, complete, _header_of(data, gz))
            if all(probe is not None for probe in found):
                break
        return found

    def _read_prefixes(self, paths: list[str]) -> list[bytes | BaseException]:
        """The remote's pipelined ``read_prefixes`` where it has one, else one at a time."""
        reader = getattr(self.remote, "read_prefixes", None)
        if reader is not None:
            try:
                return list(reader(paths, PREFIX_BYTES))
            except OSError as error:  # the channel failed: every read failed
                return [error] * len(paths)
        results: list[bytes | BaseException] = []
        for path in paths:
            try:
                results.append(self.remote.read_prefix(path, PREFIX_BYTES))
            except OSError as error:
                results.append(error)
        return results

    def _download(
        self, manifest_type: ManifestType, run: _Run, probe: _Probe | None
    ) -> SyncManifest:
        """Read, decompress (capped) and validate the whole manifest."""
        candidates = self._candidates(manifest_type)
        if probe is not None:
            candidates = candidates[[path for path, _ in candidates].index(probe.path) :]
        for path, gz in candidates:
            where = self._where(path)
            if probe is not None and probe.path == path and probe.complete:
                data = probe.data
            else:
                try:
                    data = self.remote.read_file(path, self.max_manifest_bytes)
                except FileNotFoundError:
                    continue
                except ValueError as error:
                    raise ValueError(f"manifest {where}: {error}") from error
                except OSError as error:
                    raise OSError(f"cannot read the manifest {where}: {error}") from error
                run.bytes_downloaded += len(data)
            if len(data) > self.max_manifest_bytes:
                raise ValueError(
                    f"manifest {where} is larger than {self.max_manifest_bytes} bytes; "
                    "refusing it (raise max_manifest_bytes for a lab this large)"
                )
            if gz:
                manifest = SyncManifest.from_gzip(
                    data, source=f"manifest {where}", max_decompressed=self.max_manifest_bytes
                )
            else:
                manifest = SyncManifest.from_json(data, source=f"manifest {where}")
            if manifest.manifest_type is not manifest_type:
                raise ValueError(
                    f"manifest {where} says it is a {manifest.manifest_type.value} manifest, "
                    f"not {manifest_type.value}; regenerate it on the server"
                )
            return manifest
        raise OSError(self._missing_message(manifest_type))

    def _check_root(self, manifest: SyncManifest) -> None:
        """The manifest must describe the root we asked for (a copied or misplaced manifest
        would otherwise mirror, or delete, the wrong runs)."""
        asked = _normalize_root(self.remote_root)
        published = posixpath.normpath(manifest.remote_root) if manifest.remote_root else ""
        if self.sftp_client is None and not posixpath.isabs(asked):
            asked = os.path.abspath(self.remote_root)
        if posixpath.isabs(asked):
            matches = asked == published
        else:
            # Relative to the login directory: the server's absolute path must end with it.
            matches = not asked or published.endswith("/" + asked)
        if not matches:
            raise ValueError(
                f"the manifest describes remote_root {manifest.remote_root!r}, not "
                f"{self.remote_root!r}; regenerate it with `runicorn generate-manifest --root "
                f"{self.remote_root}` or sync the root it names"
            )

    # -- applying a manifest -------------------------------------------------------------------

    def _apply(
        self,
        manifest: SyncManifest,
        run: _Run,
        progress: ProgressCallback | None,
        remote_id: str,
        *,
        record_header: bool,
    ) -> None:
        self._check_root(manifest)
        is_full = manifest.manifest_type is ManifestType.FULL
        run.manifest_type = manifest.manifest_type.value
        run.manifest_revision = manifest.revision
        entries = sorted(manifest.iter_files(), key=lambda entry: entry.path)
        local = self.cache.file_entries()
        damaged = self.cache.damaged_files(local)
        if damaged:
            logger.info(
                "%d cached file(s) missing or changed locally; fetching them again", len(damaged)
            )
            local = [row for row in local if row[0] not in damaged]
        diff = self.backend.diff_entries(
            [(e.path, e.size, e.mtime, e.is_append_only, e.tail_hash) for e in entries], local
        )
        local_sizes = {row[0]: row[1] for row in local}
        transfers = self._plan(entries, diff, local_sizes)
        transfers.sort(key=lambda t: (t.entry.priority, t.entry.path))
        run.files_total = len(transfers)
        run.bytes_total = sum(t.length for t in transfers)
        vanished, gone = self._runs_to_delete(manifest, remote_id, run) if is_full else ([], [])

        if self.dry_run:
            run.incremental_count = sum(1 for t in transfers if t.append)
            run.full_count = len(transfers) - run.incremental_count
            run.deleted_count = len(gone)
            run.extra["dry_run"] = True
            run.reason = (
                f"dry run: would fetch {run.files_total} file(s), {run.bytes_total} bytes"
                + (f", delete {len(gone)} run(s)" if gone else "")
            )
            return

        if self.cache.is_dirty():
            self.cache.clean_temp_files()
        self.cache.set_dirty(True)
        if is_full:
            listed = {entry.path for entry in entries}
            self.cache.clear_failures(
                f.path for f in self.cache.failed_files(remote_id) if f.path not in listed
            )
        now = time.time()
        self.cache.save_runs(
            remote_id, [self._run_record(exp, None) for exp in manifest.experiments]
        )
        self.cache.save_progress(remote_id=remote_id, forget=sorted(damaged))

        self._transfer(transfers, run, progress, remote_id)

        for project, name, run_id in gone:
            self.cache.remove_run(project, name, run_id)
            logger.info(
                "removed run %s/%s/%s: the server no longer lists it", project, name, run_id
            )
            run.deleted_count += 1
        failed_runs = {tuple(path.split("/", 4)[:4]) for path in run.failed}
        self.cache.save_runs(
            remote_id,
            [
                self._run_record(
                    exp, None if (exp.project, exp.name, "runs", exp.run_id) in failed_runs else now
                )
                for exp in manifest.experiments
            ],
        )
        clean = not run.failed
        if record_header:
            self.cache.save_applied_manifest(
                remote_id,
                run.manifest_type,
                manifest.revision,
                manifest.snapshot_id,
                manifest.generated_at,
                clean=clean,
                vanished=len(vanished) - run.deleted_count,
            )
        self.cache.save_remote_sync(remote_id, "ok" if clean else "partial")
        self.cache.set_dirty(False)
        if not run.reason:
            run.reason = (
                f"applied {run.manifest_type} manifest revision {manifest.revision}: "
                f"{run.files_synced} file(s) synced, {len(run.failed)} failed"
            )
        logger.info("%s", run.reason)

    @staticmethod
    def _run_record(exp: Any, last_synced: float | None) -> RunRecord:
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

    def _plan(
        self, entries: Sequence[FileEntry], diff: Any, local_sizes: dict[str, int]
    ) -> list[_Transfer]:
        transfers = [_Transfer(entries[i], False, self.cache) for i in diff.new]
        for i in diff.replaced:
            entry = entries[i]
            local_size = local_sizes.get(entry.path, 0)
            if entry.is_append_only and entry.size < local_size:
                logger.warning(
                    "%s is shorter on the server (%d bytes) than in the cache (%d): it was "
                    "truncated or rewritten there; fetching it whole",
                    entry.path,
                    entry.size,
                    local_size,
                )
            transfers.append(_Transfer(entry, False, self.cache))
        for i in diff.grown:
            entry = entries[i]
            local_size = local_sizes[entry.path]
            overlap = _overlap(entry, local_size)
            transfers.append(
                _Transfer(entry, True, self.cache, local_size=local_size, overlap=overlap)
            )
        return transfers

    def _runs_to_delete(
        self, manifest: SyncManifest, remote_id: str, run: _Run
    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Runs of this remote the full manifest no longer lists, and those of them to
        delete: all when deleting is asked and safe (spec 3.10), else none (logged, and
        the reason reported)."""
        cached = self.cache.runs_of_remote(remote_id)
        listed = {(exp.project, exp.name, exp.run_id) for exp in manifest.experiments}
        gone = [key for key in cached if key not in listed]
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

    # -- transferring -------------------------------------------------------------------------

    def _transfer(
        self,
        transfers: list[_Transfer],
        run: _Run,
        progress: ProgressCallback | None,
        remote_id: str,
    ) -> None:
        """Fetch every planned file; a failed append-verify gets a second, whole-file round.

        The engine calls sinks and ``on_result`` on this thread, so finishing files, the
        state commits and the progress callback all happen here, one at a time.
        """
        total = len(transfers)
        state = _StateBatch(self.cache, remote_id, self.BATCH_SIZE)
        completed = 0
        if progress is not None:
            progress(0, total, "")
        attempts = {f.path: f.attempts for f in self.cache.failed_files()}
        pending = transfers
        redo: list[_Transfer] = []

        def handle(transfer: _Transfer, error: BaseException | None, received: int) -> None:
            nonlocal completed
            run.bytes_downloaded += received
            if _is_connection_error(error):
                run.connection_lost = True
            outcome = self._finish(transfer, error, state, run, attempts)
            if outcome == "redo":
                if not run.connection_lost:
                    redo.append(_Transfer(transfer.entry, False, self.cache))
                    return
                self._fail(transfer.entry.path, "connection lost", state, run)
            completed += 1
            state.maybe_flush()
            if progress is not None:
                progress(completed, total, transfer.entry.path)

        try:
            for _round in range(2):
                self._fetch(pending, handle)
                if not redo:
                    break
                pending, redo = redo, []
        finally:
            state.flush()

    def _fetch(
        self,
        transfers: list[_Transfer],
        handle: Callable[[_Transfer, BaseException | None, int], None],
    ) -> None:
        """Hand the transfers to the engine (priority order); every one is handled once,
        even when the engine itself fails."""
        if not transfers:
            return
        api = _transfer_api()
        jobs = [
            api.FetchJob(
                path=t.entry.path,
                offset=t.offset,
                length=t.length,
                priority=t.entry.priority,
                sink=t.sink,
                tag=t,
            )
            for t in transfers
        ]
        unreported = {id(t): t for t in transfers}

        def on_result(result: Any) -> None:
            transfer = result.job.tag
            if unreported.pop(id(transfer), None) is not None:
                handle(transfer, result.error, result.bytes_received)

        workers = min(self.max_workers or self.MAX_WORKERS, len(jobs))
        try:
            try:
                self.remote.fetch(jobs, on_result, workers=workers)
            except (OSError, EOFError, ValueError, RuntimeError) as error:
                logger.warning("the transfer stopped: %s", _reason(error))
                lost = error if _is_connection_error(error) else ConnectionError(str(error))
                for transfer in sorted(unreported.values(), key=lambda t: t.entry.path):
                    unreported.pop(id(transfer), None)
                    handle(transfer, lost, transfer.received)
        finally:
            for transfer in unreported.values():
                transfer.discard()

    def _finish(
        self,
        transfer: _Transfer,
        error: BaseException | None,
        state: _StateBatch,
        run: _Run,
        attempts: dict[str, int],
    ) -> str:
        """Make one fetched file visible (or record why not): "ok", "failed" or "redo"."""
        path = transfer.entry.path
        error = transfer.error or error
        if error is None and transfer.received != transfer.length:
            error = OSError(
                f"received {transfer.received} of {transfer.length} bytes (the file shrank on "
                "the server?)"
            )
        try:
            if error is not None:
                self._fail(path, _reason(error), state, run)
                return "failed"
            if transfer.append:
                try:
                    self._append(transfer, state)
                except _Redo as why:
                    logger.info("%s: %s; fetching the whole file", path, why)
                    return "redo"
                run.incremental_count += 1
            else:
                problem = self._install(transfer, state, attempts.get(path, 0), run)
                if problem:
                    self._fail(path, problem, state, run)
                    return "failed"
                run.full_count += 1
            run.files_synced += 1
            return "ok"
        except (OSError, ValueError) as local_error:
            self._fail(path, f"cannot write to the cache: {_reason(local_error)}", state, run)
            return "failed"
        finally:
            transfer.discard()

    def _fail(self, path: str, reason: str, state: _StateBatch, run: _Run) -> None:
        run.failed[path] = reason
        state.failed.append((path, reason))
        logger.warning("%s: not synced: %s", path, reason)

    def _install(
        self, transfer: _Transfer, state: _StateBatch, attempts: int, run: _Run
    ) -> str | None:
        """Rename a complete temp file into place; a reason string when it must not be.

        A JSON file installed although it does not parse is listed in the stats'
        ``invalid_json_files``: never installed truncated without saying so."""
        entry = transfer.entry
        transfer.open_target()
        if entry.path.endswith(".json") and entry.size <= JSON_CHECK_MAX_BYTES:
            try:
                orjson.loads(_pread_exact(transfer.fd, entry.size, 0))
            except orjson.JSONDecodeError:
                if attempts + 1 < JSON_ACCEPT_AFTER_ATTEMPTS:
                    return TRUNCATED_JSON
                logger.warning(
                    "%s is still not valid JSON after %d syncs; installing the server's copy "
                    "as it is",
                    entry.path,
                    attempts + 1,
                )
                run.extra.setdefault("invalid_json_files", {})[entry.path] = (
                    f"not valid JSON after {attempts + 1} syncs; installed the server's copy "
                    "as it is"
                )
        ns = _ns(entry.mtime)
        os.utime(transfer.fd, ns=(ns, ns))
        os.close(transfer.fd)
        transfer.fd = -1
        dir_fd, name = self.cache.open_parent(entry.path, create=False)
        try:
            os.replace(transfer.temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        transfer.temp_name = None
        state.synced.append(FileRecord(entry.path, entry.size, entry.mtime, entry.tail_hash))
        return None

    def _append(self, transfer: _Transfer, state: _StateBatch) -> None:
        """Extend the cached file in place after the append-verify (spec 3.6).

        Nothing is written until the overlap equals the cached end and the manifest's tail
        hash matches the cached bytes plus the new ones; the tail is hashed again on disk
        afterwards (a local writer interfering). Any mismatch raises :class:`_Redo`.
        """
        entry = transfer.entry
        transfer.open_target()
        spool = transfer.spool
        added = transfer.length - transfer.overlap
        dir_fd, name = self.cache.open_parent(entry.path, create=False)
        try:
            fd = os.open(name, os.O_RDWR | os.O_APPEND | _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            if os.fstat(fd).st_size != transfer.local_size:
                state.forget.append(entry.path)
                raise _Redo("the cached copy changed size since it was recorded")
            spool.seek(0)
            if _pread_exact(fd, transfer.overlap, transfer.offset) != spool.read(transfer.overlap):
                state.forget.append(entry.path)
                raise _Redo("the bytes before the cached end differ on the server (rewritten)")
            if entry.tail_hash is not None:
                cached = min(transfer.local_size, max(0, TAIL_WINDOW - added))
                window = _pread_exact(fd, cached, transfer.local_size - cached)
                spool.seek(transfer.length - min(added, TAIL_WINDOW))
                if digest(window + spool.read()) != entry.tail_hash:
                    state.forget.append(entry.path)
                    raise _Redo("the tail hash does not match the cached end plus the new bytes")
            spool.seek(transfer.overlap)
            while added > 0:
                chunk = spool.read(min(added, 1024 * 1024))
                if not chunk:
                    raise OSError("the spooled data ended early")
                _write_all(fd, chunk)
                added -= len(chunk)
            if entry.tail_hash is not None:
                result = self.backend.hash_tails(
                    str(self.cache.root_dir), [(entry.path, entry.size, False)], TAIL_WINDOW
                )[0]
                if result is None or result[1] != entry.tail_hash:
                    state.forget.append(entry.path)
                    raise _Redo("the tail hash after appending does not match the manifest")
            ns = _ns(entry.mtime)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        state.synced.append(FileRecord(entry.path, entry.size, entry.mtime, entry.tail_hash))


def _overlap(entry: FileEntry, local_size: int) -> int:
    """Bytes before the cached end to fetch again and compare (the append-verify).

    Without a tail hash (legacy walks) that is the last ``min(size, 4096)`` bytes, as
    ``rsync --append-verify`` would check. With one, the hash of the last 4096 bytes at the
    new size already verifies every cached byte inside that window, so only the part of
    :data:`HASHED_VERIFY_BYTES` the window does not reach is fetched: a typical append of a
    few KiB costs no extra bytes instead of 4 KiB per file.
    """
    if entry.tail_hash is None:
        return min(local_size, TAIL_WINDOW)
    covered = min(local_size, max(0, TAIL_WINDOW - (entry.size - local_size)))
    return max(0, min(local_size, HASHED_VERIFY_BYTES) - covered)


class _StateBatch:
    """State changes waiting for the next commit (every ``batch_size`` files or 0.5 s)."""

    def __init__(self, cache: LocalCacheManager, remote_id: str, batch_size: int) -> None:
        self.cache = cache
        self.remote_id = remote_id
        self.batch_size = max(1, int(batch_size))
        self.synced: list[FileRecord] = []
        self.forget: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.last_flush = time.monotonic()

    def maybe_flush(self) -> None:
        count = len(self.synced) + len(self.failed)
        if count >= self.batch_size or time.monotonic() - self.last_flush >= COMMIT_INTERVAL:
            self.flush()

    def flush(self) -> None:
        if self.synced or self.forget or self.failed:
            self.cache.save_progress(
                remote_id=self.remote_id,
                synced=self.synced,
                forget=self.forget,
                failed=self.failed,
            )
            self.synced, self.forget, self.failed = [], [], []
        self.last_flush = time.monotonic()

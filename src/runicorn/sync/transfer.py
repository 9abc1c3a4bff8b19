"""Bringing files over: a diff becomes fetched, verified and installed files.

Given the manifest's entries and the diff against the cache state, :func:`plan` decides per
file whether it is fetched whole or extended in place, and :class:`FileTransfer` hands the
files to the transfer engine (priority order, pipelined channels), checks each one as it
lands, makes it visible and commits the cache state in small batches, so a killed sync
resumes where it stopped.

How a file is brought up to date:

* new or changed files are written to a temp file beside their destination (named with
  :data:`runicorn._sys.atomic.TEMP_PREFIX`), given the manifest's mtime and renamed into place:
  a reader sees the old file or the new one, never a mix;
* append-only logs that grew are extended in place, as ``rsync --append-verify`` would
  (spec 3.6): the bytes before the cached end must still match the server -- checked by the
  manifest's tail hash where its 4 KiB window reaches them, by fetching them again (up to
  4 KiB) where it does not -- and only then are the new bytes appended (viewers tail these
  files, so they are never replaced); the tail hash is checked again on disk afterwards.
  Any mismatch, or a remote file shorter than the local copy, means a full re-download.

Every destination goes through :meth:`LocalCacheManager.open_parent`, which refuses paths
that could leave the cache and symbolic links inside it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, overload

import orjson

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn._sys.cpu import usable_cores
from runicorn._sys.dirs import USE_DIR_FD
from runicorn._sys.fileio import BINARY, pread_upto, pwrite, sync_file_system, syncfs_available
from runicorn.core.backend import Backend
from runicorn.core.copy import (
    COPIED,
    HELD,
    INSTALL_FAILED,
    SHRUNK,
    SOURCE_FAILED,
    CopyJob,
    CopyResult,
)
from runicorn.core.tailhash import TAIL_WINDOW, digest
from runicorn.format.models import FileEntry
from runicorn.sync.cache import (
    FileRecord,
    LocalCacheManager,
    SyncedRow,
    plain_name,
    split_relative_path,
)
from runicorn.transport.local_remote import LocalRemote
from runicorn.transport.remote import ShrunkError

if TYPE_CHECKING:
    from runicorn.core.diff import DiffResult
    from runicorn.sync.stats import ProgressCallback, SyncRun
    from runicorn.transport.remote import FetchResult, Remote

__all__ = [
    "COMMIT_BYTES",
    "COMMIT_INTERVAL",
    "COMMIT_SPACING",
    "HASHED_VERIFY_BYTES",
    "JSON_ACCEPT_AFTER_ATTEMPTS",
    "JSON_CHECK_MAX_BYTES",
    "SPOOL_MEMORY_BYTES",
    "TRUNCATED_JSON",
    "FileTransfer",
    "Transfer",
    "WholeFiles",
    "plan",
]

# Per-file outcomes log under this module's own name; the client keeps the API document's
# logger name for its decisions (both listed in the Python API reference).
logger = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.5
"""Seconds between state commits at most, however slowly files land."""
COMMIT_SPACING = 0.05
"""Seconds between state commits at least while files land faster than ``batch_size`` in
that time (a cold sync of small files): what a killed sync fetches again stays a fraction of
a second's work, and a million small files cost a few thousand commits, not 200,000."""
COMMIT_BYTES = 8 * 1024 * 1024
"""Bytes of finished files after which a due commit is not held back by
:data:`COMMIT_SPACING`: large files are worth recording as soon as they land."""
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
FLUSH_AHEAD_BYTES = 64 * 1024 * 1024
"""Bytes landed after which the cache's file system is flushed on a thread of its own while
the sync goes on (where ``syncfs`` exists), so that the flush before the sync is marked done
finds little left to write."""

_FILE_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | BINARY
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # no FIFOs on Windows, and no flag either

# Temp names: a random token drawn once per process and a counter, so that naming a temp
# file costs no system call; ``O_EXCL`` still refuses any name that happens to exist.
_TEMP_TOKEN = secrets.token_hex(4)
_temp_numbers = itertools.count()


# Nanosecond timestamps the kernel interface takes (a signed 64-bit count: 1677..2262);
# file systems clamp further to their own range, as they do for ``touch -d``.
_MIN_NS = -(2**63)
_MAX_NS = 2**63 - 1


def _ns(mtime: float) -> int:
    """A manifest mtime as the nanoseconds ``os.utime`` accepts: a hostile or far-future
    value is clamped, never an ``OverflowError`` that would abort the sync."""
    return min(max(round(mtime * 1_000_000_000), _MIN_NS), _MAX_NS)


class CacheWriteError(OSError):
    """Writing a fetched file into the cache failed (this machine's disk, not the server)."""


class NoRoomError(CacheWriteError):
    """The cache's disk has no room for this file beside what this sync writes before it."""


FREE_SPACE_MARGIN = 64 * 1024 * 1024
"""Room left free on the cache's disk beyond what a sync writes (the state database grows
too, and a full disk breaks everything else on it)."""


def _size(count: int) -> str:
    """``count`` bytes for a message: ``512.0 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _reason(error: BaseException, entry: FileEntry | None = None) -> str:
    """A short, user-facing reason for a failed file."""
    if isinstance(error, NoRoomError):
        return str(error.strerror)
    if isinstance(error, CacheWriteError):
        if error.errno == errno.ENOSPC:
            return "no space left on the cache's disk; free some space and sync again"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write into the cache: {error.strerror} ({error.filename})"
        return f"cannot write into the cache: {error.strerror or error}"
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


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


class _Flight:
    """What a :class:`Transfer` holds only while its bytes arrive and are checked."""

    __slots__ = ("error", "fd", "received", "spool", "temp_name", "whole")

    def __init__(self) -> None:
        self.temp_name: str | None = None
        self.fd = -1
        self.spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self.error: BaseException | None = None
        self.received = 0
        self.whole: bytes | None = None


_T = TypeVar("_T")

_IDLE = _Flight()
"""What every transfer not in flight reads: shared, never written (:meth:`Transfer._landing`
makes a transfer its own before the first write)."""


class _InFlight(Generic[_T]):
    """A :class:`Transfer` attribute that lives on its :class:`_Flight`: reading it on a
    transfer not in flight gives the idle default, writing it makes the flight first."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, transfer: None, owner: type) -> _InFlight[_T]: ...

    @overload
    def __get__(self, transfer: Transfer, owner: type) -> _T: ...

    def __get__(self, transfer: Transfer | None, owner: type) -> _T | _InFlight[_T]:
        if transfer is None:
            return self
        value: _T = getattr(transfer._flight, self._name)
        return value

    def __set__(self, transfer: Transfer, value: _T) -> None:
        setattr(transfer._landing(), self._name, value)


class Transfer:
    """One file being fetched: where its bytes go while they arrive (worker threads) and
    what the main thread must check before they become visible.

    A cold sync plans one per file of the lab, so the planned part is a few slots and what
    a file needs while it is in flight (its temp file, the bytes received, an error) lives
    in an object of its own, made on the first write.
    """

    __slots__ = ("_flight", "append", "cache", "entry", "local_size", "overlap")

    temp_name = _InFlight[str | None]()
    fd = _InFlight[int]()
    spool = _InFlight["tempfile.SpooledTemporaryFile[bytes] | None"]()
    error = _InFlight[BaseException | None]()
    received = _InFlight[int]()
    whole = _InFlight[bytes | None]()
    """A JSON file's bytes when they arrived in one piece: its check needs no read back."""

    def __init__(
        self,
        entry: FileEntry,
        append: bool,
        cache: LocalCacheManager,
        local_size: int = 0,
        overlap: int = 0,
    ) -> None:
        self.entry = entry
        self.append = append
        self.cache = cache
        self.local_size = local_size
        self.overlap = overlap
        self._flight = _IDLE

    def _landing(self) -> _Flight:
        if self._flight is _IDLE:
            self._flight = _Flight()
        return self._flight

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
                    max_size=SPOOL_MEMORY_BYTES, dir=str(self.cache.state_dir)
                )
            return
        if self.fd >= 0:
            return
        directory, _name = self.cache.open_parent(self.entry.path, create=True)
        try:
            for _attempt in range(8):
                name = f"{TEMP_PREFIX}{_TEMP_TOKEN}{next(_temp_numbers):x}.part"
                try:
                    self.fd = directory.open(
                        name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644
                    )
                except FileExistsError:
                    continue
                self.temp_name = name
                return
            raise FileExistsError(f"cannot create a temp file beside {self.entry.path}")
        finally:
            directory.close()

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
                assert self.spool is not None  # open_target made it
                self.spool.write(data)
            else:
                _write_all(self.fd, data, self.received)
                if (
                    not self.received
                    and len(data) == self.length
                    and self.entry.path.endswith(".json")
                ):
                    self.whole = data
            self.received += len(data)
        except OSError as error:  # this side's disk: say so, not "on the server"
            failure = CacheWriteError(error.errno, error.strerror, self.entry.path)
            self.error = failure
            raise failure from error
        except Exception as error:  # remembered, and raised so the engine drops the job
            self.error = error
            raise

    def discard(self) -> None:
        """Close and remove whatever this transfer created; its file stays as it was."""
        if self._flight is _IDLE:
            return  # nothing was created
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.whole = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.temp_name is not None:
            with contextlib.suppress(OSError, ValueError):
                directory, _name = self.cache.open_parent(self.entry.path, create=False)
                try:
                    directory.unlink(self.temp_name)
                finally:
                    directory.close()
            self.temp_name = None


class _Redo(Exception):
    """The append-verify failed: the file must be fetched whole."""


class WholeFiles(Sequence[Transfer]):
    """The plan of a sync that fetches every file whole (a cold one): its entries, each
    made a :class:`Transfer` only when it is looked at.

    A cold sync of a large lab plans a transfer per file, and a million of them held at
    once cost more memory than the rest of the plan; the local copy and the counts walk
    this one a chunk at a time, so only a chunk's transfers exist at once. Each look makes
    a new transfer: whoever needs the same one twice (the fetch engine's sinks) takes a
    list of them first.
    """

    __slots__ = ("_cache", "_entries")

    def __init__(self, entries: list[FileEntry], cache: LocalCacheManager) -> None:
        self._entries = entries
        self._cache = cache

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Transfer: ...

    @overload
    def __getitem__(self, index: slice) -> list[Transfer]: ...

    def __getitem__(self, index: int | slice) -> Transfer | list[Transfer]:
        if isinstance(index, slice):
            return [Transfer(entry, False, self._cache) for entry in self._entries[index]]
        return Transfer(self._entries[index], False, self._cache)

    def __iter__(self) -> Iterator[Transfer]:
        cache = self._cache
        for entry in self._entries:
            yield Transfer(entry, False, cache)

    @property
    def entries(self) -> Sequence[FileEntry]:
        """The planned files, in the plan's order (each moves its whole ``size``)."""
        return self._entries

    @property
    def total_bytes(self) -> int:
        """Bytes every transfer moves (no transfer made)."""
        return sum(entry.size for entry in self._entries)


def plan(
    entries: Sequence[FileEntry],
    diff: DiffResult | None,
    local_sizes: dict[str, int],
    cache: LocalCacheManager,
) -> Sequence[Transfer]:
    """One :class:`Transfer` per file the diff found new, replaced or grown (appended), in
    priority order, then by path; ``diff`` ``None``: the cache holds none of them, so every
    entry is new (and the plan is a :class:`WholeFiles`). ``entries`` are sorted by path."""
    if diff is None:
        # One stable sort keeps the path order within each priority.
        return WholeFiles(sorted(entries, key=_priority), cache)
    transfers = [Transfer(entries[i], False, cache) for i in diff.new]
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
        transfers.append(Transfer(entry, False, cache))
    for i in diff.grown:
        entry = entries[i]
        local_size = local_sizes[entry.path]
        overlap = _overlap(entry, local_size)
        transfers.append(Transfer(entry, True, cache, local_size=local_size, overlap=overlap))
    # Priority first, then path: two stable sorts, cheaper than a key tuple per file.
    transfers.sort(key=lambda t: t.entry.path)
    transfers.sort(key=lambda t: t.entry.priority)
    return transfers


def _priority(entry: FileEntry) -> int:
    return entry.priority


@dataclass
class FileTransfer:
    """Fetches one sync's planned files into the cache and records them in its state.

    ``remote`` returns the client's :class:`Remote` (built on first use: a sync with nothing
    to fetch never builds it); ``workers`` is how many channels fetch concurrently and
    ``batch_size`` how many finished files a state commit holds.
    """

    cache: LocalCacheManager
    backend: Backend
    remote: Callable[[], Remote]
    workers: int
    batch_size: int

    def transfer(
        self,
        transfers: Sequence[Transfer],
        run: SyncRun,
        progress: ProgressCallback | None,
        remote_id: str,
    ) -> None:
        """Fetch every planned file; a failed append-verify gets a second, whole-file round.

        The engine calls sinks and ``on_result`` on this thread, so finishing files, the
        state commits and the progress callback all happen here, one at a time.
        """
        total = len(transfers)
        state = _StateBatch(self.cache, remote_id, self.batch_size)
        completed = moved = 0
        # A callback that asks (``wants_bytes``) also gets (bytes moved, bytes planned).
        with_bytes = progress is not None and getattr(progress, "wants_bytes", False)
        if progress is not None and total:
            # Never (0, 0): the API document's own example callback divides by the total.
            progress(0, total, "")
        attempts = {f.path: f.attempts for f in self.cache.failed_files()}
        pending = transfers
        redo: list[Transfer] = []

        def handle(transfer: Transfer, error: BaseException | None, received: int) -> None:
            nonlocal completed, moved
            run.bytes_downloaded += received
            moved += received
            state.bytes += received
            if _is_connection_error(error):
                run.connection_lost = True
            outcome = self._finish(transfer, error, state, run, attempts)
            if outcome == "redo":
                if not run.connection_lost:
                    redo.append(Transfer(transfer.entry, False, self.cache))
                    return
                self._fail(transfer.entry.path, "connection lost", state, run)
            completed += 1
            state.maybe_flush()
            if with_bytes:
                progress(completed, total, transfer.entry.path, moved, run.bytes_total)  # type: ignore[call-arg,misc]
            elif progress is not None:
                progress(completed, total, transfer.entry.path)

        def landed(done: Sequence[Transfer], received: Sequence[int]) -> None:
            """Files the local copy finished (installed, or failed with a reason), in order.

            Without a progress callback a chunk is counted at once and weighed for a commit
            once; with one, each file is reported after the commit it may make."""
            nonlocal completed, moved
            if progress is None:
                count = sum(received)
                run.bytes_downloaded += count
                moved += count
                state.bytes += count
                completed += len(done)
                state.maybe_flush()
                return
            for transfer, size in zip(done, received, strict=True):
                run.bytes_downloaded += size
                moved += size
                state.bytes += size
                completed += 1
                state.maybe_flush()
                if with_bytes:
                    progress(completed, total, transfer.entry.path, moved, run.bytes_total)  # type: ignore[call-arg]
                else:
                    progress(completed, total, transfer.entry.path)

        try:
            with self.cache.directory_handles():
                pending = self._within_free_space(pending, handle)
                remote = self.remote() if pending else None
                source_fd = (
                    remote.root_descriptor()
                    if isinstance(remote, LocalRemote) and COPY_HERE
                    else None
                )
                if source_fd is not None:
                    copier = _LocalCopy(self, source_fd, state, run, attempts, landed)
                    try:
                        for here, segment in _segments(pending):
                            if here:
                                copier.copy(segment)
                            else:
                                copier.finish()
                                self._fetch(segment, handle)
                        copier.finish()
                    finally:
                        copier.close()
                else:
                    self._fetch(pending, handle)
                if redo:  # whole files now, so no append can ask for a third round
                    self._fetch(redo, handle)
        finally:
            state.flush()
            state.stop_flushing_ahead()
        state.make_durable()

    def _within_free_space(
        self,
        transfers: Sequence[Transfer],
        handle: Callable[[Transfer, BaseException | None, int], None],
    ) -> Sequence[Transfer]:
        """The transfers that fit on the cache's disk, in order (priority first); each one
        that does not is failed now, before a byte is fetched, with the sizes in its reason.

        A replaced file needs its new size beside the old one until the rename, so the old
        sizes are not counted back. A manifest listing a file larger than the disk (or a
        hostile size) fails that file, not the sync.
        """
        try:
            free = shutil.disk_usage(self.cache.root_dir).free
        except OSError:
            return transfers  # the writes report an unusable directory themselves
        budget = free - FREE_SPACE_MARGIN
        planned = (
            transfers.total_bytes
            if isinstance(transfers, WholeFiles)
            else sum(transfer.length for transfer in transfers)
        )
        if planned <= budget:
            return transfers
        kept: list[Transfer] = []
        refused = 0
        for transfer in transfers:
            if transfer.length <= budget:
                budget -= transfer.length
                kept.append(transfer)
                continue
            refused += 1
            reason = (
                f"not enough free space on the cache's disk for it ({_size(transfer.length)}; "
                f"{_size(max(budget, 0))} of the {_size(free)} free is left for it, keeping "
                f"{_size(FREE_SPACE_MARGIN)} spare); free some space and sync again"
            )
            handle(transfer, NoRoomError(errno.ENOSPC, reason, transfer.entry.path), 0)
        logger.warning(
            "the cache's disk (%s free) has no room for %d of %d file(s) this sync would "
            "write; they are failed and retried next time",
            _size(free),
            refused,
            len(transfers),
        )
        return kept

    def _fetch(
        self,
        planned: Sequence[Transfer],
        handle: Callable[[Transfer, BaseException | None, int], None],
    ) -> None:
        """Hand the transfers to the engine (priority order); every one is handled once,
        even when the engine itself fails."""
        if not planned:
            return
        # Each sink must be the transfer its result is handled with: made once, here.
        transfers = planned if isinstance(planned, list) else list(planned)
        # The transfer engine is imported late, so importing the client stays cheap.
        from runicorn.transport.remote import FetchJob

        jobs = [
            FetchJob(
                path=t.entry.path,
                offset=t.offset,
                length=t.length,
                priority=t.entry.priority,
                sink=t.sink,
                tag=index,
            )
            for index, t in enumerate(transfers)
        ]
        # One byte per transfer, not a dict entry: a cold sync of a large lab hands the
        # engine close to a million jobs.
        unreported = bytearray(b"\x01") * len(transfers)

        def take(index: int) -> Transfer | None:
            if not unreported[index]:
                return None
            unreported[index] = 0
            return transfers[index]

        def on_result(result: FetchResult) -> None:
            transfer = take(result.job.tag)  # type: ignore[arg-type]
            if transfer is not None:
                handle(transfer, result.error, result.bytes_received)

        workers = min(self.workers, len(jobs))
        try:
            try:
                self.remote().fetch(jobs, on_result, workers=workers)
            except (OSError, EOFError, ValueError, RuntimeError) as error:
                logger.warning("the transfer stopped: %s", _reason(error))
                lost = error if _is_connection_error(error) else ConnectionError(str(error))
                left = [i for i, flag in enumerate(unreported) if flag]
                for index in sorted(left, key=lambda i: transfers[i].entry.path):
                    unreported[index] = 0
                    handle(transfers[index], lost, transfers[index].received)
        finally:
            for index, flag in enumerate(unreported):
                if flag:
                    transfers[index].discard()

    def _finish(
        self,
        transfer: Transfer,
        error: BaseException | None,
        state: _StateBatch,
        run: SyncRun,
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
                    self._append(transfer, state, run.tail_hash_algorithm)
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

    def _fail(self, path: str, reason: str, state: _StateBatch, run: SyncRun) -> None:
        run.failed[path] = reason
        state.failed.append((path, reason))
        logger.warning("%s: not synced: %s", path, reason)

    def _install(
        self, transfer: Transfer, state: _StateBatch, attempts: int, run: SyncRun
    ) -> str | None:
        """Rename a complete temp file into place; a reason string when it must not be.

        A JSON file installed although it does not parse is listed in the stats'
        ``invalid_json_files``: never installed truncated without saying so."""
        entry = transfer.entry
        transfer.open_target()
        if _checks_json(entry):
            data = transfer.whole
            problem = _json_problem(
                entry.path,
                data if data is not None else pread_upto(transfer.fd, 0, entry.size),
                attempts,
                run,
            )
            if problem:
                return problem
        ns = _ns(entry.mtime)
        directory, name = self.cache.open_parent(entry.path, create=False)
        assert transfer.temp_name is not None  # open_target made it
        try:
            directory.set_times(transfer.fd, transfer.temp_name, (ns, ns))
            os.close(transfer.fd)
            transfer.fd = -1
            directory.replace(transfer.temp_name, name)
        finally:
            directory.close()
        transfer.temp_name = None
        state.synced.append(FileRecord(entry.path, entry.size, entry.mtime, entry.tail_hash))
        return None

    def _append(self, transfer: Transfer, state: _StateBatch, algorithm: str) -> None:
        """Extend the cached file in place after the append-verify (spec 3.6).

        Nothing is written until the overlap equals the cached end and the manifest's tail
        hash (by ``algorithm``, the manifest's) matches the cached bytes plus the new ones;
        the tail is hashed again on disk afterwards (a local writer interfering). Any
        mismatch raises :class:`_Redo`.
        """
        entry = transfer.entry
        transfer.open_target()
        spool = transfer.spool
        assert spool is not None  # open_target made it
        added = transfer.length - transfer.overlap
        directory, name = self.cache.open_parent(entry.path, create=False)
        try:
            # Non-blocking: a FIFO planted in the cache must not hang the sync.
            fd = directory.open(name, os.O_RDWR | os.O_APPEND | _NONBLOCK | _FILE_FLAGS)
        except OSError as error:
            directory.close()
            if error.errno not in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            # Removed or replaced (by a link, a directory) in the cache since it was
            # recorded, which only the full local check looks for: replace it whole.
            state.forget.append(entry.path)
            raise _Redo("the cached copy is gone or no longer a regular file") from None
        except BaseException:
            directory.close()
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                state.forget.append(entry.path)
                raise _Redo("the cached copy is no longer a regular file")
            if info.st_size != transfer.local_size:
                state.forget.append(entry.path)
                raise _Redo("the cached copy changed size since it was recorded")
            spool.seek(0)
            if pread_upto(fd, transfer.offset, transfer.overlap) != spool.read(transfer.overlap):
                state.forget.append(entry.path)
                raise _Redo("the bytes before the cached end differ on the server (rewritten)")
            if entry.tail_hash is not None:
                cached = min(transfer.local_size, max(0, TAIL_WINDOW - added))
                window = pread_upto(fd, transfer.local_size - cached, cached)
                spool.seek(transfer.length - min(added, TAIL_WINDOW))
                if digest(window + spool.read(), algorithm) != entry.tail_hash:
                    state.forget.append(entry.path)
                    raise _Redo("the tail hash does not match the cached end plus the new bytes")
            if info.st_nlink > 1:
                fd = self._unshare(fd, entry.path, transfer.local_size)
            spool.seek(transfer.overlap)
            while added > 0:
                chunk = spool.read(min(added, 1024 * 1024))
                if not chunk:
                    raise OSError("the spooled data ended early")
                _write_all(fd, chunk)
                added -= len(chunk)
            if entry.tail_hash is not None:
                result = self.backend.hash_tails(
                    str(self.cache.root_dir),
                    [(entry.path, entry.size, False)],
                    TAIL_WINDOW,
                    algorithm,
                )[0]
                if result is None or result[1] != entry.tail_hash:
                    state.forget.append(entry.path)
                    raise _Redo("the tail hash after appending does not match the manifest")
            ns = _ns(entry.mtime)
            directory.set_times(fd, name, (ns, ns))
        finally:
            os.close(fd)
            directory.close()
        state.synced.append(FileRecord(entry.path, entry.size, entry.mtime, entry.tail_hash))

    def _unshare(self, fd: int, path: str, size: int) -> int:
        """A private copy of the cached file ``fd`` (``size`` bytes) put in its place, open
        for appending; ``fd`` is closed.

        A file with other hard links (a ``cp -al`` backup of the cache) must not change
        under those other names: appending in place would write through them. The copy is
        renamed over the cached name, so the cache holds the same bytes at every moment.
        """
        directory, name = self.cache.open_parent(path, create=False)
        temp = f"{TEMP_PREFIX}{_TEMP_TOKEN}{next(_temp_numbers):x}.part"
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
            copy = directory.open(temp, flags, 0o644)
            try:
                position = 0
                while position < size:
                    chunk = pread_upto(fd, position, min(size - position, 1024 * 1024))
                    if not chunk:
                        raise OSError(f"{path} ended at byte {position} while it was copied")
                    _write_all(copy, chunk)
                    position += len(chunk)
                directory.replace(temp, name)
            except BaseException:
                os.close(copy)
                with contextlib.suppress(OSError):
                    directory.unlink(temp)
                raise
        finally:
            directory.close()
        os.close(fd)
        return copy


def _checks_json(entry: FileEntry) -> bool:
    """Whether a fetched file must parse as JSON before it is installed."""
    return entry.path.endswith(".json") and entry.size <= JSON_CHECK_MAX_BYTES


def _json_problem(path: str, data: bytes, attempts: int, run: SyncRun) -> str | None:
    """Why a fetched JSON file must not be installed yet (it does not parse: the server
    was caught mid-write), or ``None``. After :data:`JSON_ACCEPT_AFTER_ATTEMPTS` syncs it is
    installed as it is, and listed in the stats' ``invalid_json_files``."""
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        if attempts + 1 < JSON_ACCEPT_AFTER_ATTEMPTS:
            return TRUNCATED_JSON
        logger.warning(
            "%s is still not valid JSON after %d syncs; installing the server's copy as it is",
            path,
            attempts + 1,
        )
        run.extra.setdefault("invalid_json_files", {})[path] = (
            f"not valid JSON after {attempts + 1} syncs; installed the server's copy as it is"
        )
    return None


COPY_HERE = USE_DIR_FD and hasattr(os, "pread")
"""Whether files from a local-directory remote are copied by the backend's ``copy_files``
(directory descriptors and positional reads, so not on Windows), rather than through the
fetch engine."""
COPY_CHUNK_FILES = 2048
"""Files handed to one ``copy_files`` call at most: what a killed sync may have installed
without recording it, and the granularity of the priority order."""
COPY_CHUNK_BYTES = 32 * 1024 * 1024
"""Bytes one ``copy_files`` call copies at most (a larger file goes alone): the JSON files
it returns for checking are held in memory until installed."""

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _segments(transfers: Sequence[Transfer]) -> Iterator[tuple[bool, list[Transfer]]]:
    """The transfers in order, cut into runs the local copy takes (``True``: whole files,
    at most :data:`COPY_CHUNK_FILES` and :data:`COPY_CHUNK_BYTES` each) and runs of appends
    for the fetch engine (``False``)."""
    segment: list[Transfer] = []
    here = True
    size = 0
    for transfer in transfers:
        kind = not transfer.append
        if segment and (
            kind != here
            or (
                kind
                and (len(segment) >= COPY_CHUNK_FILES or size + transfer.length > COPY_CHUNK_BYTES)
            )
        ):
            yield here, segment
            segment, size = [], 0
        here = kind
        segment.append(transfer)
        size += transfer.length
    if segment:
        yield here, segment


def _source_error(code: int, path: str) -> OSError:
    """The error :class:`LocalRemote` raises for a source it cannot read, from its errno."""
    if code == errno.ELOOP:
        return OSError(
            errno.ELOOP,
            "a component of this path is a symbolic link on the server; refusing to follow "
            "it out of the root",
            path,
        )
    if code == errno.EISDIR:
        return IsADirectoryError(errno.EISDIR, "is a directory", path)
    if code == errno.EINVAL:
        return OSError(errno.EINVAL, "not a regular file", path)
    return OSError(code, os.strerror(code), path)


def _target_error(code: int, path: str) -> Exception:
    """The error the cache tree raises for a file it cannot write, from its errno."""
    if code in (errno.ELOOP, errno.ENOTDIR):
        return ValueError(
            f"cache path {path!r}: a directory on the way is a symbolic link or not a "
            "directory; refusing to follow it"
        )
    return CacheWriteError(code, os.strerror(code), path)


class _LocalCopy:
    """Whole files from a local-directory remote, copied by the backend's ``copy_files`` a
    chunk at a time: the per-file work (make the directory, open beneath the root, read,
    temp file, mtime, rename) runs in the compiled core without the GIL, on every usable
    core.

    Each directory's path is checked once per sync (:func:`split_relative_path`, the cache
    tree's own rule); the copy then opens or makes it beneath the cache root one component
    at a time with no link followed, so a link swapped in meanwhile fails the file, never
    leads out.
    """

    def __init__(
        self,
        owner: FileTransfer,
        source_fd: int,
        state: _StateBatch,
        run: SyncRun,
        attempts: dict[str, int],
        landed: Callable[[Sequence[Transfer], Sequence[int]], None],
    ) -> None:
        self.owner = owner
        self.cache = owner.cache
        self.backend = owner.backend
        self.source_fd = source_fd
        self.state = state
        self.run = run
        self.attempts = attempts
        self.landed = landed
        self.threads = usable_cores() if self.backend.releases_gil else 1
        self.checked: set[str] = set()
        self.target_fd = -1
        # The chunk copied last, not yet recorded: it is recorded while the next one copies.
        self.copied: tuple[list[Transfer], list[CopyResult]] | None = None
        self._copying: tuple[list[Transfer], Future[list[CopyResult]]] | None = None
        self._worker: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Wait for a copy still running (it cannot be stopped half way: at most a chunk,
        left unrecorded for the next sync to copy again), then let go of the cache root."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.target_fd >= 0:
            os.close(self.target_fd)
            self.target_fd = -1

    def _check(self, path: str, directory: str) -> str | None:
        """Why ``path`` cannot be written in the cache, or ``None`` (its directory is
        remembered as checked)."""
        try:
            split_relative_path(path)  # raises, with the reason
            if not plain_name(path.rpartition("/")[2]):
                raise ValueError(f"cache path {path!r} has an unusable file name")
        except ValueError as error:
            return _reason(error)
        self.checked.add(directory)
        return None

    def copy(self, transfers: list[Transfer]) -> None:
        """Copy one chunk; the chunk before it is recorded meanwhile.

        With the GIL released the copy runs on every core while this thread checks the
        JSON files of the chunk before, records them and commits the state: the
        bookkeeping of a chunk costs no time of its own. This chunk's jobs are made while
        the chunk before it still copies, so the copy waits for nothing between chunks.
        Every file of a chunk is recorded (installed, or failed with a reason) before the
        one after the next is copied.
        """
        if self.target_fd < 0:
            self.target_fd = os.open(self.cache.root_dir, _DIR_FLAGS)
        jobs: list[CopyJob] = []
        taken: list[Transfer] = []
        checked = self.checked
        for transfer in transfers:
            entry = transfer.entry
            path = entry.path
            directory, _sep, name = path.rpartition("/")
            if directory not in checked or not plain_name(name):
                problem = self._check(path, directory)
                if problem is not None:
                    self.owner._fail(path, problem, self.state, self.run)
                    self.landed((transfer,), (0,))
                    continue
            jobs.append((path, entry.size, _ns(entry.mtime), _checks_json(entry)))
            taken.append(transfer)
        if not jobs:
            return
        self._collect()
        prefix = f"{TEMP_PREFIX}{_TEMP_TOKEN}{next(_temp_numbers):x}-"
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="runicorn-copy")
        self._copying = (
            taken,
            self._worker.submit(
                self.backend.copy_files,
                self.source_fd,
                self.target_fd,
                jobs,
                prefix,
                self.threads,
                make_dirs=True,
            ),
        )
        self._record()

    def _collect(self) -> None:
        """Wait for the chunk being copied, to be recorded next (its copy's own failure is
        raised here)."""
        if self._copying is None:
            return
        taken, copying = self._copying
        self._copying = None
        self.copied = (taken, copying.result())

    def finish(self) -> None:
        """Record every file copied so far: the chunk copied last, and the one copying."""
        self._record()
        self._collect()
        self._record()

    def _record(self) -> None:
        """Record every file of the chunk copied last: installed, or failed with a reason."""
        if self.copied is None:
            return
        taken, results = self.copied
        self.copied = None
        held = [index for index, result in enumerate(results) if result[0] == HELD]
        problems: dict[int, str | None] = {}
        if held:
            for index in held:
                _outcome, _error, _received, _temp, data = results[index]
                path = taken[index].entry.path
                problems[index] = _json_problem(
                    path, data or b"", self.attempts.get(path, 0), self.run
                )
            errors = self.backend.install_files(
                self.target_fd,
                [
                    (taken[index].entry.path, str(results[index][3]), problems[index] is None)
                    for index in held
                ],
                self.threads,
            )
            for index, code in zip(held, errors, strict=True):
                if problems[index] is None and code:
                    problems[index] = f"cannot write to the cache: {os.strerror(code)}"
        synced = self.state.synced
        installed = 0
        for index, (transfer, result) in enumerate(zip(taken, results, strict=True)):
            outcome = result[0]
            if outcome == COPIED or (outcome == HELD and problems[index] is None):
                entry = transfer.entry
                synced.append((entry.path, entry.size, entry.mtime, entry.tail_hash))
                installed += 1
            else:
                self._fail(transfer, result, problems.get(index))
        self.run.full_count += installed
        self.run.files_synced += installed
        self.landed(taken, [result[2] for result in results])

    def _fail(self, transfer: Transfer, result: CopyResult, problem: str | None) -> None:
        entry = transfer.entry
        outcome, code, received, _temp, _data = result
        if problem is None:
            if outcome == SOURCE_FAILED:
                problem = _reason(_source_error(code, entry.path))
            elif outcome == SHRUNK:
                problem = _reason(ShrunkError(entry.path, entry.size, received))
            elif outcome == INSTALL_FAILED:
                problem = f"cannot write to the cache: {os.strerror(code)}"
            else:
                problem = _reason(_target_error(code, entry.path))
        self.owner._fail(entry.path, problem, self.state, self.run)


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
    """State changes waiting for the next commit.

    A commit is due every ``batch_size`` finished files, held back while the last one is
    less than :data:`COMMIT_SPACING` old unless the files waiting hold :data:`COMMIT_BYTES`;
    whatever waits is committed after :data:`COMMIT_INTERVAL` in any case.
    """

    def __init__(self, cache: LocalCacheManager, remote_id: str, batch_size: int) -> None:
        self.cache = cache
        self.remote_id = remote_id
        self.batch_size = max(1, int(batch_size))
        self.synced: list[SyncedRow] = []
        self.forget: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.bytes = 0
        self.last_flush = time.monotonic()
        # Whether any file was written, and which (kept only where ``syncfs`` is missing,
        # so that a cold sync of a million files does not hold a million paths).
        self.wrote = False
        self.written: list[str] = []
        self.unflushed = 0
        self._ahead: _FlushAhead | None = None

    def stop_flushing_ahead(self) -> None:
        """Wait for a flush ahead still running (it has to reach the disk before the last
        one anyway) and stop its thread."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def make_durable(self) -> None:
        """Put every file this sync wrote on the disk, once, before the sync is marked done.

        The state commits every few files for a killed process to resume; they need no
        barrier, because the sync's in-progress mark (set before its first commit, cleared
        after this) makes the next sync lstat every recorded file, and a file a power loss
        cut short or emptied is then of the wrong size and fetched again. One ``syncfs`` of
        the cache's file system here keeps the mark from being cleared before the data is
        safe; where there is no ``syncfs`` the written files are fsynced one by one. The
        flushes ahead (:class:`_FlushAhead`) only leave this one less to write.
        """
        if not self.wrote:
            return
        try:
            if sync_file_system(str(self.cache.root_dir)):
                return
        except OSError as error:
            logger.debug("syncfs of the cache failed (%s); fsyncing file by file", error)
        for path in self.written:
            with contextlib.suppress(OSError, ValueError):
                directory, name = self.cache.open_parent(path, create=False)
                try:
                    fd = directory.open(name, os.O_RDONLY | _FILE_FLAGS)
                finally:
                    directory.close()
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def maybe_flush(self) -> None:
        count = len(self.synced) + len(self.failed)
        if not count and not self.forget:
            return
        waited = time.monotonic() - self.last_flush
        if waited >= COMMIT_INTERVAL or (
            count >= self.batch_size and (waited >= COMMIT_SPACING or self.bytes >= COMMIT_BYTES)
        ):
            self.flush()

    def flush(self) -> None:
        if self.synced:
            self.wrote = True
            if not syncfs_available():
                self.written.extend(record[0] for record in self.synced)
        if self.synced or self.forget or self.failed:
            self.cache.save_progress(
                remote_id=self.remote_id,
                synced=self.synced,
                forget=self.forget,
                failed=self.failed,
            )
            self.synced, self.forget, self.failed = [], [], []
        self.unflushed += self.bytes
        if self.unflushed >= FLUSH_AHEAD_BYTES and syncfs_available():
            self.unflushed = 0
            if self._ahead is None:
                self._ahead = _FlushAhead(str(self.cache.root_dir))
            self._ahead.request()
        self.bytes = 0
        self.last_flush = time.monotonic()


class _FlushAhead:
    """``syncfs`` of the cache's file system on a thread of its own, on request: the data a
    sync has written reaches the disk while it goes on writing, instead of all of it in the
    flush that ends the sync (:meth:`_StateBatch.make_durable`, which still runs: these
    flushes change nothing of what is durable when). One runs at a time; requests made
    while it runs are one more flush after it, and one made before :meth:`close` is served
    before it returns."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._wake = threading.Event()
        self._requested = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="runicorn-flush", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._requested = True
        self._wake.set()

    def _run(self) -> None:
        failed = False
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._requested and not failed:  # a request is served even when closing
                self._requested = False
                try:
                    sync_file_system(self._root)
                except OSError as error:  # the flush that ends the sync reports it
                    logger.debug("a flush of the cache ahead of the sync's end failed: %s", error)
                    failed = True
            if self._closing:
                return

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()

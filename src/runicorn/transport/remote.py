"""Where the sync client reads from: a remote experiments root over SFTP, or a local directory.

Why: the client decides *what* to fetch (from a manifest or a legacy walk); this module decides
*how*, fast. :class:`SftpRemote` keeps many SFTP requests in flight over a few channels of the
user's SSH connection (see :mod:`.sftp_pipeline`); :class:`LocalRemote` serves the same interface
from a mounted directory (NFS, the demo), so one sync engine covers both.

Threading contract of :meth:`Remote.fetch`: transfers may run on worker threads, but every callback
(each job's ``sink`` and ``on_result``) runs on the thread that called ``fetch``, one at a time,
so callers need no locks. A callback must not call back into the same Remote. ``fetch`` returns
only after every worker thread has ended.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import posixpath
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from runicorn._sys.fd_budget import files_in_flight_per_channel
from runicorn.transport.sftp_pipeline import (
    DEFAULT_DEPTH,
    DEFAULT_READ_SIZE,
    DEFAULT_TIMEOUT,
    DirEntry,
    ListDirOp,
    Operation,
    Prefetched,
    ReadRangeOp,
    SftpPipeline,
    ShrunkError,
)

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "FetchCancelled",
    "FetchJob",
    "FetchResult",
    "LocalRemote",
    "Remote",
    "RemoteEntry",
    "SftpRemote",
    "ShrunkError",
]

logger = logging.getLogger(__name__)

# Requests in flight per channel. At 50 ms RTT and 100 Mbit/s a first sync of ~840 files on
# 3 channels took 4.31 s at depth 64 and 4.09 s at 128 (median of 3): the many small files
# that go first (priority 1) are latency-bound, so more of them in flight fills the link
# sooner. 256 with the byte-bounded event queue below brought a cold 500-run sync from
# 21.65 to 20.85 s (128 and a 256-event queue). Memory stays bounded by the channel window,
# not by the depth; open files by ``fd_budget``.
FETCH_DEPTH = 4 * DEFAULT_DEPTH
# A fetch at most this big (and of at most ``depth`` files) runs on the client's own channel:
# opening worker channels costs two round trips, more than such a fetch gains from them.
SMALL_FETCH_BYTES = 2 * 1024 * 1024
# Events waiting for the caller's thread, bounded by the bytes they carry (memory, when sinks
# are slower than the network) rather than by their number: a cold sync starts with thousands
# of tiny files whose local work (temp file, rename, state) keeps the caller's thread busy;
# with room for only 256 events the workers then stopped reading and the link stood idle
# for about a second. The length bound only caps the bookkeeping of tiny events.
_EVENT_QUEUE_BYTES = 64 * 1024 * 1024
_EVENT_QUEUE_LENGTH = 16384
_POLL = 0.05  # how often the caller's thread looks at ``cancel`` while it waits
_LOCAL_READ_SIZE = 1024 * 1024


@dataclass(frozen=True)
class RemoteEntry:
    """One directory entry, as lstat sees it: a symbolic link is reported, not followed.

    ``mtime`` is in whole seconds for both implementations (SFTP v3 carries no fractions), so a
    walk over either gives the same answer.
    """

    name: str
    is_dir: bool
    is_symlink: bool
    size: int
    mtime: float


@dataclass(eq=False)
class FetchJob:
    """Read bytes ``[offset, offset + length)`` of ``path`` (relative POSIX, under the root).

    ``sink(file_offset, data)`` receives the bytes in offset order; lower ``priority`` runs
    first; ``tag`` is the caller's. Never reads past ``offset + length``.
    """

    path: str
    offset: int
    length: int
    sink: Callable[[int, bytes], None]
    priority: int = 4
    tag: object = None


@dataclass(eq=False)
class FetchResult:
    """The outcome of one job: ``error`` is None on success, else what failed.

    Errors: FileNotFoundError, PermissionError, ShrunkError (the file ended early),
    ConnectionError/TimeoutError (the link), FetchCancelled, ValueError (a bad path), or whatever
    the job's sink raised.
    """

    job: FetchJob
    error: BaseException | None
    bytes_received: int

    @property
    def ok(self) -> bool:
        return self.error is None


class FetchCancelled(Exception):
    """The job did not finish because ``fetch`` was cancelled."""


@runtime_checkable
class Remote(Protocol):
    """What the sync client needs from a remote experiments root."""

    root: str

    def read_prefix(self, path: str, length: int) -> bytes: ...

    def read_file(self, path: str, max_bytes: int) -> bytes: ...

    def listdir(self, path: str) -> list[RemoteEntry]: ...

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteEntry] | BaseException]: ...

    def fetch(
        self,
        jobs: Iterable[FetchJob],
        on_result: Callable[[FetchResult], None],
        *,
        workers: int,
        cancel: threading.Event | None = None,
    ) -> None: ...

    def close(self) -> None: ...


def relative_path(path: str) -> str:
    """``path`` normalised as a relative POSIX path ('' for the root); ValueError if unsafe.

    The caller validates manifest paths already; this second check is cheap and keeps a bug
    upstream from reading outside the root.
    """
    if "\x00" in path or "\\" in path or path.startswith("/"):
        raise ValueError(f"refusing remote path {path!r}: not a relative POSIX path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"refusing remote path {path!r}: '..' leaves the remote root")
    return "/".join(parts)


# -- the fetch engine shared by both implementations ---------------------------------------------

_DATA, _DONE, _EXIT = 0, 1, 2


class _FetchRun:
    """One ``fetch`` call: the job queue, the event queue to the caller, and its bookkeeping.

    Workers take jobs in (priority, submission) order and post events; the caller's thread
    runs :meth:`dispatch`, which calls sinks and ``on_result``.
    """

    def __init__(
        self,
        jobs: Iterable[FetchJob],
        on_result: Callable[[FetchResult], None],
        cancel: threading.Event | None,
    ) -> None:
        self.jobs = list(jobs)
        self.on_result = on_result
        self.cancel = cancel
        self._heap = [(job.priority, index) for index, job in enumerate(self.jobs)]
        heapq.heapify(self._heap)
        self._lock = threading.Lock()
        self.events: queue.Queue[tuple[int, int, Any, Any]] = queue.Queue(_EVENT_QUEUE_LENGTH)
        self._queued_bytes = 0
        self._room = threading.Condition()
        self.stopping = threading.Event()
        self.aborted: set[int] = set()  # jobs whose sink failed: workers drop them
        self.reported: set[int] = set()
        self.last_worker_error: BaseException | None = None

    def take(self) -> int | None:
        """The next job for a worker, or None when none is left (or we are stopping)."""
        if self.stopping.is_set():
            return None
        with self._lock:
            if not self._heap:
                return None
            return heapq.heappop(self._heap)[1]

    def post(self, kind: int, index: int, a: Any = None, b: Any = None) -> None:
        """Hand an event to the caller's thread; dropped once the fetch is stopping."""
        while not self.stopping.is_set():
            try:
                self.events.put((kind, index, a, b), timeout=_POLL)
                return
            except queue.Full:
                continue

    def data(self, index: int, offset: int, data: bytes) -> None:
        """Post received bytes, waiting while the queue holds :data:`_EVENT_QUEUE_BYTES`."""
        size = len(data)
        with self._room:
            while self._queued_bytes and self._queued_bytes + size > _EVENT_QUEUE_BYTES:
                if self.stopping.is_set():
                    return
                self._room.wait(_POLL)
            self._queued_bytes += size
        self.post(_DATA, index, offset, data)

    def _taken(self, size: int) -> None:
        """The caller's thread took ``size`` queued bytes: wake a worker waiting for room."""
        with self._room:
            self._queued_bytes -= size
            self._room.notify()

    def done(self, index: int, error: BaseException | None, received: int) -> None:
        self.post(_DONE, index, error, received)

    def abandoned(self, index: int) -> bool:
        return index in self.aborted or self.stopping.is_set()

    def worker_exit(self, error: BaseException | None) -> None:
        if error is not None:
            self.last_worker_error = error
        self.post(_EXIT, -1, error)

    def _report(self, index: int, error: BaseException | None, received: int) -> None:
        self.reported.add(index)
        self.on_result(FetchResult(self.jobs[index], error, received))

    def dispatch(self, worker_count: int) -> None:
        """Run callbacks until every job is reported or ``cancel`` is set (caller's thread)."""
        remaining = len(self.jobs)
        running = worker_count
        cancel = self.cancel
        while len(self.reported) < remaining:
            if cancel is not None and cancel.is_set():
                self.stopping.set()
                return
            try:
                kind, index, a, b = self.events.get(timeout=_POLL)
            except queue.Empty:
                continue
            if kind == _EXIT:
                running -= 1
                if running == 0:
                    self._fail_leftovers()
                continue
            if kind == _DATA:
                self._taken(len(b))
            if index in self.reported:
                continue
            if kind == _DATA:
                try:
                    self.jobs[index].sink(a, b)
                except Exception as error:  # the sink's failure is this job's failure
                    self.aborted.add(index)
                    self._report(index, error, a + len(b) - self.jobs[index].offset)
            else:
                self._report(index, a, b)

    def _fail_leftovers(self) -> None:
        """Every worker ended (their channels died): the jobs never started fail too."""
        error = self.last_worker_error or ConnectionError("no transfer channel is left")
        while True:
            index = self.take()
            if index is None:
                break
            if index not in self.reported:
                self._report(index, _copy_error(error), 0)
        # Each worker posted its exit after its last event, so nothing of theirs is queued.
        for index in range(len(self.jobs)):
            if index not in self.reported:
                self._report(index, _copy_error(error), 0)

    def report_cancelled(self) -> None:
        for index in range(len(self.jobs)):
            if index not in self.reported:
                self._report(index, FetchCancelled("the fetch was cancelled"), 0)


def _copy_error(error: BaseException) -> BaseException:
    """A fresh exception per job (one instance must not collect tracebacks of many)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return type(error)(str(error))
    return ConnectionError(str(error))


def _run_fetch(
    run: _FetchRun,
    targets: Sequence[Callable[[], None]],
    interrupt: Callable[[], None],
) -> None:
    """Start one thread per target, dispatch callbacks, and always join every thread."""
    threads = [
        threading.Thread(target=target, name=f"runicorn-fetch-{number}", daemon=True)
        for number, target in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    completed = False
    try:
        run.dispatch(len(threads))
        completed = True
    finally:
        run.stopping.set()
        if not completed or (run.cancel is not None and run.cancel.is_set()):
            interrupt()  # otherwise the workers are only closing handles: let them
        for thread in threads:
            thread.join()
    if run.cancel is not None and run.cancel.is_set():
        run.report_cancelled()


# -- SFTP ------------------------------------------------------------------------------------


class SftpRemote:
    """A remote root read over SFTP, with pipelined requests on extra channels.

    Cheap calls (``read_prefix``, ``read_file``, ``listdir``) speak on the channel of the given
    ``sftp_client`` (no new channel, a few round trips), which must not be used by other threads
    meanwhile. ``fetch`` and ``listdirs`` open up to ``workers`` more channels on the same SSH
    transport, once, and keep them until :meth:`close`; if the server refuses channels
    (``MaxSessions``), fewer are used, down to the client's own channel.
    """

    def __init__(
        self,
        sftp_client: paramiko.SFTPClient,
        root: str,
        *,
        depth: int = FETCH_DEPTH,
        read_size: int = DEFAULT_READ_SIZE,
        timeout: float | None = DEFAULT_TIMEOUT,
        workers: int = 4,
        window_size: int | None = 8 * 1024 * 1024,
    ) -> None:
        if depth < 1 or read_size < 1 or workers < 1:
            raise ValueError("depth, read_size and workers must be at least 1")
        self.root = root.rstrip("/") or ("/" if root.startswith("/") else ".")
        self.depth = depth
        self.read_size = read_size
        self.timeout = timeout
        self.workers = workers
        self.window_size = window_size
        self._sftp = sftp_client
        self._transport = sftp_client.get_channel().get_transport()
        self._pipes: list[SftpPipeline] = []
        self._channel_limit: int | None = None  # extra channels the server allows, once known
        self._pipes_lock = threading.Lock()
        self._borrow_lock = threading.Lock()
        self._borrowed_pipe: SftpPipeline | None = None
        self._warm_up: threading.Thread | None = None
        self._transfer_lock = threading.Lock()  # one fetch/listdirs drives the pipes at a time
        self._transfer_owner: int | None = None
        self._closed = False

    def __enter__(self) -> SftpRemote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _full(self, path: str) -> str:
        relative = relative_path(path)
        return posixpath.join(self.root, relative) if relative else self.root

    # -- calls on the client's own channel -------------------------------------------------------

    @contextlib.contextmanager
    def _borrowed(self) -> Any:
        if self._closed:
            raise ValueError("this SftpRemote is closed")
        if not self._borrow_lock.acquire(blocking=False):
            raise RuntimeError(
                "the SFTP client's channel is busy with a transfer; do not call the Remote from "
                "a fetch callback or from two threads"
            )
        try:
            yield self._borrowed_pipeline()
        finally:
            self._borrow_lock.release()

    def _borrowed_pipeline(self) -> SftpPipeline:
        """The one pipeline on the client's channel (the caller holds ``_borrow_lock``).

        Kept for the Remote's life: answers it does not wait for (detached CLOSEs) arrive
        later and must meet the pipeline that knows their ids.
        """
        pipe = self._borrowed_pipe
        if pipe is None or not pipe.alive:
            pipe = SftpPipeline.borrow(
                self._sftp,
                depth=self.depth,
                read_size=self.read_size,
                timeout=self.timeout,
            )
            self._borrowed_pipe = pipe
        return pipe

    def _read(self, path: str, length: int, *, size_cap: int | None = None) -> bytes:
        """Read from the start of ``path`` on the client's channel (prefix or whole file)."""
        pieces: list[bytes] = []
        outcome: list[BaseException | None] = []
        op = ReadRangeOp(
            self._full(path),
            0,
            length,
            self.read_size,
            lambda offset, data: pieces.append(data),
            lambda error, received: outcome.append(error),
            exact=False,
            size_cap=size_cap,
            display_path=path,
        )
        with self._borrowed() as pipe:
            pipe.run(ops=[op])
        if outcome and outcome[0] is not None:
            raise outcome[0]
        return b"".join(pieces)

    def read_prefix(self, path: str, length: int) -> bytes:
        """At most ``length`` bytes from the start of ``path``: OPEN + READ + CLOSE when
        ``length`` fits one read (a short read is taken as the end of the file)."""
        if length < 0:
            raise ValueError("length must not be negative")
        return self._read(path, length)

    def read_prefixes(self, paths: Sequence[str], length: int) -> list[bytes | BaseException]:
        """At most ``length`` bytes from the start of each path, all in one pipeline: the
        OPENs go out together and nobody waits for the CLOSEs, so reading one or several
        prefixes that fit one READ (255 KiB) costs two round trips -- none for a path the
        session's first round trip read already (a :class:`PrefetchingSFTPClient`). Per
        path: the bytes, or the exception (``FileNotFoundError`` …) reading it raised."""
        if length < 0:
            raise ValueError("length must not be negative")
        pieces: list[list[bytes]] = [[] for _ in paths]
        errors: list[BaseException | None] = [None] * len(paths)
        ops: list[Operation] = []
        prefetched: Prefetched | None = getattr(self._sftp, "prefetched", None)
        for index, path in enumerate(paths):
            early = prefetched.take(self.root, relative_path(path), length) if prefetched else None
            if isinstance(early, bytes):
                pieces[index].append(early)
                continue
            if early is not None:
                errors[index] = early
                continue

            def on_done(error: BaseException | None, _received: int, i: int = index) -> None:
                errors[i] = error

            ops.append(
                ReadRangeOp(
                    self._full(path),
                    0,
                    length,
                    self.read_size,
                    lambda _offset, data, i=index: pieces[i].append(data),
                    on_done,
                    exact=False,
                    display_path=path,
                    detach_close=True,
                )
            )
        if ops:
            with self._borrowed() as pipe:
                pipe.run(ops=ops)
        return [
            error if error is not None else b"".join(parts)
            for parts, error in zip(pieces, errors, strict=True)
        ]

    def warm_up(self, workers: int) -> None:
        """Start opening ``workers`` worker channels in the background, so that a large
        fetch that follows (a first sync) does not wait for them; returns at once."""
        with self._pipes_lock:
            if self._closed or (self._warm_up is not None and self._warm_up.is_alive()):
                return

            def open_them() -> None:
                with contextlib.suppress(Exception):
                    self._open_pipes(workers)

            self._warm_up = threading.Thread(
                target=open_them, name="runicorn-sftp-warm-up", daemon=True
            )
            self._warm_up.start()

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The whole file, pipelined (OPEN, FSTAT with the first READ, the rest, CLOSE);
        ValueError if it is larger than ``max_bytes``. A file growing meanwhile is read up to
        the size FSTAT reported."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        return self._read(path, min(self.read_size, max_bytes + 1), size_cap=max_bytes)

    def listdir(self, path: str) -> list[RemoteEntry]:
        """Entries of one directory ('' is the root), sorted by name, links not followed."""
        results: list[tuple[list[DirEntry] | None, BaseException | None]] = []
        op = ListDirOp(
            self._full(path),
            lambda entries, error: results.append((entries, error)),
            display_path=path,
        )
        with self._borrowed() as pipe:
            pipe.run(ops=[op])
        entries, error = results[0]
        if error is not None:
            raise error
        return [_entry(item) for item in entries or []]

    # -- worker channels -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transfer(self) -> Iterator[None]:
        """Serialise fetch/listdirs: a pipeline must be driven by one thread at a time."""
        if self._transfer_owner == threading.get_ident():
            raise RuntimeError("do not call the Remote from a fetch callback")
        with self._transfer_lock:
            self._transfer_owner = threading.get_ident()
            try:
                yield
            finally:
                self._transfer_owner = None

    def _open_pipes(self, wanted: int) -> list[SftpPipeline]:
        """Up to ``wanted`` live worker pipelines, opening missing ones concurrently."""
        with self._pipes_lock:
            if self._closed:
                raise ValueError("this SftpRemote is closed")
            self._pipes = [pipe for pipe in self._pipes if pipe.alive]
            if self._channel_limit is not None:
                wanted = min(wanted, self._channel_limit)
            missing = wanted - len(self._pipes)
            if missing > 0:
                self._pipes.extend(self._open_channels(missing))
            return self._pipes[:wanted]

    def _open_channels(self, count: int) -> list[SftpPipeline]:
        import paramiko

        opened: list[SftpPipeline] = []
        refused: list[BaseException] = []
        lock = threading.Lock()

        def open_one() -> None:
            try:
                pipe = SftpPipeline.open(
                    self._transport,
                    window_size=self.window_size,
                    depth=self.depth,
                    read_size=self.read_size,
                    timeout=self.timeout,
                )
            except (paramiko.SSHException, OSError, EOFError) as error:
                with lock:
                    refused.append(error)
                return
            with lock:
                opened.append(pipe)

        threads = [
            threading.Thread(target=open_one, name=f"runicorn-sftp-open-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:
            for thread in threads:
                thread.join()
            for pipe in opened:
                pipe.close()
            raise
        if refused and self._transport.is_active():
            self._channel_limit = len(self._pipes) + len(opened)
            logger.warning(
                "the SSH server refused %d of %d extra SFTP channels (%s); continuing with %d "
                "(raise MaxSessions in sshd_config for more parallelism)",
                len(refused),
                count,
                refused[0],
                max(self._channel_limit, 1),
            )
        return opened

    def _run_on_pipes(
        self,
        pipes: list[SftpPipeline],
        make_feed: Callable[[], Callable[[], Operation | None]],
        on_exit: Callable[[BaseException | None], None],
        max_open: int | None = None,
    ) -> tuple[list[Callable[[], None]], Callable[[], None], Callable[[], None]]:
        """Thread targets driving each pipe (or the borrowed channel if there is none), each
        with at most ``max_open`` operations open, an interrupt that makes them stop at once,
        and a cleanup to run after they are joined."""
        borrowed_lock_held = False
        if not pipes:
            if not self._borrow_lock.acquire(blocking=False):
                raise RuntimeError("the SFTP client's channel is busy")
            borrowed_lock_held = True
            pipes = [self._borrowed_pipeline()]

        def target_for(pipe: SftpPipeline) -> Callable[[], None]:
            def target() -> None:
                error: BaseException | None = None
                try:
                    pipe.run(make_feed(), max_open=max_open)
                except BaseException as failure:
                    error = failure
                    if not isinstance(failure, (ConnectionError, TimeoutError)):
                        logger.debug("SFTP worker failed", exc_info=True)
                finally:
                    on_exit(error)

            return target

        def interrupt() -> None:
            for pipe in pipes:
                if pipe.borrowed:
                    # Closing the user's channel would kill their SFTPClient; stop by draining.
                    continue
                pipe.close()

        def cleanup() -> None:
            if borrowed_lock_held:
                self._borrow_lock.release()

        return [target_for(pipe) for pipe in pipes], interrupt, cleanup

    def fetch(
        self,
        jobs: Iterable[FetchJob],
        on_result: Callable[[FetchResult], None],
        *,
        workers: int,
        cancel: threading.Event | None = None,
    ) -> None:
        """Run ``jobs`` in priority order over up to ``workers`` channels, many files in flight
        on each; ``on_result`` once per job. All callbacks run on this thread (module doc).

        Cancelling (``cancel`` set) stops at once: open channels are closed (reopened by the
        next call) and each unfinished job is reported with FetchCancelled. A KeyboardInterrupt
        stops the same way, then propagates without further callbacks.
        """
        run = _FetchRun(jobs, on_result, cancel)
        if not run.jobs:
            return
        with self._transfer():
            self._fetch(run, workers)

    def _fetch(self, run: _FetchRun, workers: int) -> None:
        small = (
            len(run.jobs) <= self.depth and sum(job.length for job in run.jobs) <= SMALL_FETCH_BYTES
        )
        if small:
            # Opening channels costs round trips that a small fetch does not win back: use
            # the client's own channel, plus whatever worker channels are open already.
            with self._pipes_lock:
                pipes = [pipe for pipe in self._pipes if pipe.alive][: max(1, workers)]
        else:
            pipes = self._open_pipes(max(1, workers))

        def make_feed() -> Callable[[], Operation | None]:
            def feed() -> Operation | None:
                while True:
                    index = run.take()
                    if index is None:
                        return None
                    job = run.jobs[index]
                    try:
                        full = self._full(job.path)
                        return ReadRangeOp(
                            full,
                            job.offset,
                            job.length,
                            self.read_size,
                            lambda offset, data, i=index: run.data(i, offset, data),
                            lambda error, received, i=index: run.done(i, error, received),
                            should_abort=lambda i=index: run.abandoned(i),
                            display_path=job.path,
                            detach_close=True,
                        )
                    except ValueError as error:
                        run.done(index, error, 0)

            return feed

        # Every file in flight holds a temp file open on this side.
        max_open = files_in_flight_per_channel(max(1, len(pipes)), self.depth)
        targets, interrupt, cleanup = self._run_on_pipes(
            pipes, make_feed, run.worker_exit, max_open
        )
        try:
            _run_fetch(run, targets, interrupt)
        finally:
            cleanup()

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteEntry] | BaseException]:
        """List many directories at once: pipelined over the worker channels (legacy walk)."""
        unique = list(dict.fromkeys(paths))
        results: dict[str, list[RemoteEntry] | BaseException] = {}
        if not unique:
            return results
        if len(unique) == 1:
            try:
                results[unique[0]] = self.listdir(unique[0])
            except (OSError, EOFError, ValueError) as error:
                results[unique[0]] = error
            return results
        lock = threading.Lock()
        pending = list(reversed(unique))
        errors: list[BaseException] = []

        def record(path: str, entries: list[DirEntry] | None, error: BaseException | None) -> None:
            with lock:
                if error is not None:
                    results[path] = error
                else:
                    results[path] = [_entry(item) for item in entries or []]

        def make_feed() -> Callable[[], Operation | None]:
            def feed() -> Operation | None:
                while True:
                    with lock:
                        if not pending:
                            return None
                        path = pending.pop()
                    try:
                        full = self._full(path)
                    except ValueError as error:
                        record(path, None, error)
                        continue
                    return ListDirOp(
                        full,
                        lambda entries, error, p=path: record(p, entries, error),
                        display_path=path,
                        detach_close=True,
                    )

            return feed

        def on_exit(error: BaseException | None) -> None:
            if error is not None:
                with lock:
                    errors.append(error)

        with self._transfer():
            pipes = self._open_pipes(min(self.workers, max(1, len(unique) // 8)))
            targets, interrupt, cleanup = self._run_on_pipes(pipes, make_feed, on_exit)
            self._run_listing(targets, interrupt, cleanup)
        failure = errors[-1] if errors else ConnectionError("directory listing did not finish")
        for path in unique:
            if path not in results:
                results[path] = _copy_error(failure)
        return results

    @staticmethod
    def _run_listing(
        targets: list[Callable[[], None]],
        interrupt: Callable[[], None],
        cleanup: Callable[[], None],
    ) -> None:
        threads = [
            threading.Thread(target=t, name="runicorn-listdirs", daemon=True) for t in targets
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            interrupt()
            for thread in threads:
                thread.join()
            raise
        finally:
            cleanup()

    def close(self) -> None:
        """Close the worker channels (the caller's SFTP client stays open: it is theirs)."""
        warm_up = self._warm_up
        if warm_up is not None:
            warm_up.join()
        with self._pipes_lock:
            self._closed = True
            pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.close()


def _entry(item: DirEntry) -> RemoteEntry:
    attrs = item.attrs
    return RemoteEntry(
        name=item.name,
        is_dir=attrs.is_dir,
        is_symlink=attrs.is_symlink,
        size=attrs.size or 0,
        mtime=float(attrs.mtime or 0),
    )


# -- local directory -----------------------------------------------------------------------------


class LocalRemote:
    """The same interface over a local directory (an NFS mount, the demo).

    The final path component is never followed if it is a symbolic link (``O_NOFOLLOW``), and
    only regular files are read.

    ``fetch`` reads on the caller's thread by default: a local file answers an ``open`` and a
    ``pread`` in microseconds, less than handing each file from a worker thread to the
    caller's thread costs (two queue events and a GIL switch per file), so a cold sync of
    many small files spends its time copying, not handing over. ``threaded=True`` reads with
    ``os.pread`` on ``workers`` threads instead, for a mount whose every open waits on the
    network.
    """

    def __init__(
        self, root: Path | str, *, read_size: int = _LOCAL_READ_SIZE, threaded: bool = False
    ) -> None:
        self._root = Path(root)
        self.root = str(self._root)
        self.read_size = read_size
        self.threaded = threaded
        self._closed = False

    def __enter__(self) -> LocalRemote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _full(self, path: str) -> str:
        relative = relative_path(path)
        return os.path.join(self.root, relative) if relative else self.root

    def _open(self, path: str) -> int:
        """A read-only descriptor of a regular file, refusing a symlink as the last component."""
        full = self._full(path)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO must not hang us
        try:
            fd = os.open(full, flags)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OSError(
                    errno.ELOOP, "is a symbolic link; refusing to follow it", path
                ) from None
            raise type(error)(error.errno, error.strerror, path) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_prefix(self, path: str, length: int) -> bytes:
        """At most ``length`` bytes from the start of ``path``."""
        if length < 0:
            raise ValueError("length must not be negative")
        fd = self._open(path)
        try:
            return _pread_upto(fd, 0, length)
        finally:
            os.close(fd)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The whole file; ValueError if it is larger than ``max_bytes``."""
        fd = self._open(path)
        try:
            data = _pread_upto(fd, 0, max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ValueError(f"file {path!r} is larger than {max_bytes} bytes; refusing it")
        return data

    def listdir(self, path: str) -> list[RemoteEntry]:
        """Entries of one directory ('' is the root), sorted by name, links not followed."""
        full = self._full(path)
        entries: list[RemoteEntry] = []
        try:
            with os.scandir(full) as scan:
                for item in scan:
                    try:
                        info = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    entries.append(
                        RemoteEntry(
                            name=item.name,
                            is_dir=stat.S_ISDIR(info.st_mode),
                            is_symlink=stat.S_ISLNK(info.st_mode),
                            size=info.st_size,
                            mtime=float(int(info.st_mtime)),
                        )
                    )
        except OSError as error:
            raise type(error)(error.errno, error.strerror, path) from None
        entries.sort(key=lambda entry: entry.name)
        return entries

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteEntry] | BaseException]:
        """Many directories; sequential is as fast as it gets on a local disk."""
        results: dict[str, list[RemoteEntry] | BaseException] = {}
        for path in dict.fromkeys(paths):
            try:
                results[path] = self.listdir(path)
            except (OSError, ValueError) as error:
                results[path] = error
        return results

    def fetch(
        self,
        jobs: Iterable[FetchJob],
        on_result: Callable[[FetchResult], None],
        *,
        workers: int,
        cancel: threading.Event | None = None,
    ) -> None:
        """As :meth:`SftpRemote.fetch`: on the caller's thread, or with ``workers`` threads
        doing ``os.pread`` when the remote is ``threaded``."""
        if not self.threaded:
            self._fetch_here(list(jobs), on_result, cancel)
            return
        run = _FetchRun(jobs, on_result, cancel)
        if not run.jobs:
            return

        def target() -> None:
            error: BaseException | None = None
            try:
                while True:
                    index = run.take()
                    if index is None:
                        break
                    self._fetch_one(run, index)
            except BaseException as failure:  # a bug: make the fetch end, not hang
                error = failure
                logger.exception("local fetch worker failed")
            finally:
                run.worker_exit(error)

        _run_fetch(run, [target] * max(1, min(workers, len(run.jobs))), lambda: None)

    def _fetch_here(
        self,
        jobs: list[FetchJob],
        on_result: Callable[[FetchResult], None],
        cancel: threading.Event | None,
    ) -> None:
        """Every job in (priority, submission) order on this thread: read a chunk, hand it
        to the sink, report the job; a sink's failure is its job's failure."""
        order = sorted(range(len(jobs)), key=lambda index: jobs[index].priority)
        for done, index in enumerate(order):
            if cancel is not None and cancel.is_set():
                for rest in order[done:]:
                    on_result(FetchResult(jobs[rest], FetchCancelled("the fetch was cancelled"), 0))
                return
            job = jobs[index]
            received = 0
            error: BaseException | None = None
            try:
                if job.offset < 0 or job.length < 0:
                    raise ValueError(f"negative offset or length for {job.path!r}")
                fd = self._open(job.path)
                try:
                    position, end = job.offset, job.offset + job.length
                    while position < end:
                        data = os.pread(fd, min(self.read_size, end - position), position)
                        if not data:
                            raise ShrunkError(job.path, end, position)
                        try:
                            job.sink(position, data)
                        finally:
                            received += len(data)
                        position += len(data)
                        if cancel is not None and cancel.is_set() and position < end:
                            raise FetchCancelled("the fetch was cancelled")
                finally:
                    os.close(fd)
            except Exception as failure:  # the read's or the sink's: this job's failure
                error = failure
            on_result(FetchResult(job, error, received))

    def _fetch_one(self, run: _FetchRun, index: int) -> None:
        job = run.jobs[index]
        received = 0
        try:
            if job.offset < 0 or job.length < 0:
                raise ValueError(f"negative offset or length for {job.path!r}")
            fd = self._open(job.path)
            try:
                position, end = job.offset, job.offset + job.length
                while position < end:
                    if run.abandoned(index):
                        return
                    data = os.pread(fd, min(self.read_size, end - position), position)
                    if not data:
                        raise ShrunkError(job.path, end, position)
                    run.data(index, position, data)
                    position += len(data)
                    received += len(data)
            finally:
                os.close(fd)
        except (OSError, EOFError, ValueError) as error:
            run.done(index, error, received)
            return
        run.done(index, None, received)

    def close(self) -> None:
        self._closed = True


def _pread_upto(fd: int, offset: int, length: int) -> bytes:
    pieces: list[bytes] = []
    position, end = offset, offset + length
    while position < end:
        data = os.pread(fd, min(_LOCAL_READ_SIZE, end - position), position)
        if not data:
            break
        pieces.append(data)
        position += len(data)
    return b"".join(pieces)

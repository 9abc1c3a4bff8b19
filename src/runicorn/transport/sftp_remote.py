"""A remote experiments root read over SFTP: :class:`SftpRemote`.

Cheap calls ride the user's own SFTP channel; transfers and many-directory listings run on a
few extra channels of the same SSH connection, each a :class:`~.sftp_pipeline.SftpPipeline`
with many requests in flight (see :mod:`.remote` for the threading contract of ``fetch``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from runicorn._sys.fd_budget import files_in_flight_per_channel
from runicorn.transport import openssh_shortcuts
from runicorn.transport.fetch import FetchRun, copy_error, run_fetch
from runicorn.transport.file_stream import DEFAULT_LEVEL, FileStream, StreamBroken, Unfinished
from runicorn.transport.remote import FetchJob, FetchResult, RemoteDirEntry, relative_path
from runicorn.transport.sftp_ops import DirEntry, ListDirOp, LstatOp, Operation, ReadRangeOp
from runicorn.transport.sftp_pipeline import (
    DEFAULT_DEPTH,
    DEFAULT_READ_SIZE,
    DEFAULT_TIMEOUT,
    SftpPipeline,
    stamp_of,
)
from runicorn.transport.sftp_protocol import Attrs

if TYPE_CHECKING:
    import paramiko

    from runicorn.transport.openssh_shortcuts import Prefetched

__all__ = ["FETCH_DEPTH", "SMALL_FETCH_BYTES", "STREAM_MIN_BYTES", "STREAM_MIN_FILES", "SftpRemote"]

logger = logging.getLogger(__name__)

# Requests in flight per channel. The many small files that go first (priority 1) are
# latency-bound, so more of them in flight fills the link sooner; four times the pipeline's
# default measured best at 50 ms RTT and 100 Mbit/s (benchmarks/bench_transfer.py). Memory
# stays bounded by the channel window, not by the depth; open files by ``fd_budget``.
FETCH_DEPTH = 4 * DEFAULT_DEPTH
# A fetch at most this big (and of at most ``depth`` files) runs on the client's own channel:
# opening worker channels costs two round trips, more than such a fetch gains from them.
SMALL_FETCH_BYTES = 2 * 1024 * 1024
# With ``stream=None`` (automatic) a fetch goes through the file stream (:mod:`.file_stream`)
# from this many bytes or files on: below, the round trips and the server's login shell of a
# new exec channel cost more than the stream saves over pipelined SFTP. Once open, the stream
# serves every later fetch of the Remote (SSH compression is off by then).
STREAM_MIN_BYTES = 16 * 1024 * 1024
STREAM_MIN_FILES = 1000


class SftpRemote:
    """A remote root read over SFTP, with pipelined requests on extra channels.

    Cheap calls (``read_prefix``, ``read_file``, ``listdir``) speak on the channel of the given
    ``sftp_client`` (no new channel, a few round trips), which must not be used by other threads
    meanwhile. ``fetch`` and ``listdirs`` open up to ``workers`` more channels on the same SSH
    transport, once, and keep them until :meth:`close`; if the server refuses channels
    (``MaxSessions``), fewer are used, down to the client's own channel.

    ``stream``: fetch through the compressed file stream (:mod:`.file_stream`) always
    (True), never (False), or when a fetch is large enough to pay for it (None, the default:
    :data:`STREAM_MIN_BYTES`, :data:`STREAM_MIN_FILES`). It runs ``stream_python``
    (``python3``) on the server, which compresses with zstd when it can import it (a runicorn
    environment's interpreter can) and this client has it, zlib otherwise; without one, or
    when the stream breaks, the fetch goes on over SFTP from where the stream stopped, and
    later fetches use SFTP. The stream compresses when the connection's compression choice
    is on (:func:`.ssh.compression_choice`), and SSH compression is then re-keyed off.
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
        stream: bool | None = None,
        stream_python: str | None = None,
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
        channel = sftp_client.get_channel()
        if channel is None:
            raise ValueError("the SFTP client has no channel (it is closed)")
        self._transport = channel.get_transport()
        # OpenSSH answers a READ short only at the end of the file (openssh_shortcuts).
        self._short_read_is_eof = openssh_shortcuts.enabled(self._transport)
        self._pipes: list[SftpPipeline] = []
        self._channel_limit: int | None = None  # extra channels the server allows, once known
        self._pipes_lock = threading.Lock()
        self._borrow_lock = threading.Lock()
        self._borrowed_pipe: SftpPipeline | None = None
        self._warm_up: threading.Thread | None = None
        self._transfer_lock = threading.Lock()  # one fetch/listdirs drives the pipes at a time
        self._transfer_owner: int | None = None
        self._closed = False
        self.stream = stream
        self.stream_python = stream_python
        self._stream: FileStream | None = None
        self._stream_refused: str | None = None  # why the stream is not used any more
        self._stream_lock = threading.Lock()

    def __enter__(self) -> SftpRemote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _full(self, path: str) -> str:
        relative = relative_path(path)
        return posixpath.join(self.root, relative) if relative else self.root

    # -- calls on the client's own channel -------------------------------------------------------

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[SftpPipeline]:
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
            short_read_is_eof=self._short_read_is_eof,
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
        return self.probe_files(paths, length, ())[0]

    def probe_files(
        self, paths: Sequence[str], length: int, stamp_paths: Sequence[str]
    ) -> tuple[list[bytes | BaseException], list[tuple[int, int] | BaseException]]:
        """:meth:`read_prefixes` of ``paths`` and the ``(size, mtime)`` (STAT, a link
        followed) of ``stamp_paths``, in one pipeline whose STATs go out first, so a stamp
        is never newer than a prefix read with it. Nothing is asked again that the session's
        first round trip asked already. Per path: the answer, or the exception asking
        raised."""
        if length < 0:
            raise ValueError("length must not be negative")
        prefetched: Prefetched | None = getattr(self._sftp, "prefetched", None)
        ops: list[Operation] = []
        stamps: list[tuple[int, int] | BaseException | None] = [None] * len(stamp_paths)
        for index, path in enumerate(stamp_paths):
            early_stamp = (
                prefetched.take_stamp(self.root, relative_path(path)) if prefetched else None
            )
            if early_stamp is not None:
                stamps[index] = early_stamp
                continue

            def on_attrs(
                attrs: Attrs | None, error: BaseException | None, i: int = index, p: str = path
            ) -> None:
                stamps[i] = error if error is not None else stamp_of(attrs, p)

            ops.append(LstatOp(self._full(path), on_attrs, display_path=path, follow=True))
        pieces: list[list[bytes]] = [[] for _ in paths]
        errors: list[BaseException | None] = [None] * len(paths)
        for index, path in enumerate(paths):
            early = prefetched.take(self.root, relative_path(path), length) if prefetched else None
            if isinstance(early, bytes):
                pieces[index].append(early)
                continue
            if early is not None:
                errors[index] = early
                continue

            def on_data(_offset: int, data: bytes, i: int = index) -> None:
                pieces[i].append(data)

            def on_done(error: BaseException | None, _received: int, i: int = index) -> None:
                errors[i] = error

            ops.append(
                ReadRangeOp(
                    self._full(path),
                    0,
                    length,
                    self.read_size,
                    on_data,
                    on_done,
                    exact=False,
                    short_read_is_eof=self._short_read_is_eof,
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
        ], [
            stamp if stamp is not None else OSError(f"{path}: the STAT was not answered")
            for stamp, path in zip(stamps, stamp_paths, strict=True)
        ]

    def warm_up(self, workers: int) -> None:
        """Start opening ``workers`` worker channels in the background, so that a large
        fetch that follows (a first sync) does not wait for them; returns at once."""
        with self._pipes_lock:
            if self._closed or (self._warm_up is not None and self._warm_up.is_alive()):
                return

            def open_them() -> None:
                with contextlib.suppress(Exception):
                    if self.stream is not False and self._open_stream() is not None:
                        return
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

    def listdir(self, path: str) -> list[RemoteDirEntry]:
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
        run = FetchRun(jobs, on_result, cancel)
        if not run.jobs:
            return
        with self._transfer():
            self._fetch(run, workers)

    def _fetch(self, run: FetchRun, workers: int) -> None:
        if self._wants_stream(run.jobs):
            stream = self._open_stream()
            if stream is not None:
                self._fetch_streamed(run, stream, workers)
                return
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
        shared_gate = None
        if len(pipes) <= 1:
            shared_gate = _DirectoryGate(self.root, _directories_above(run.jobs))

        def make_feed() -> Callable[[], Operation | None]:
            # One channel answers in order: the LSTATs of the directories above a file go
            # out on the file's own channel ahead of its OPEN (all of them first when there
            # is one channel; on several, each channel checks the directories of the files
            # it takes, as it takes them), and a file is read only once they passed.
            gate = shared_gate if shared_gate is not None else _DirectoryGate(self.root, set())
            queued: collections.deque[Operation] = collections.deque()

            def feed() -> Operation | None:
                if queued:
                    return queued.popleft()
                check = gate.next_op()
                if check is not None:
                    return check
                while True:
                    index = run.take()
                    if index is None:
                        return None
                    job = run.jobs[index]
                    try:
                        full = self._full(job.path)
                        queued.extend(gate.ops_for(job.path))
                        queued.append(
                            ReadRangeOp(
                                full,
                                job.offset,
                                job.length,
                                self.read_size,
                                functools.partial(run.data, index),
                                functools.partial(run.done, index),
                                should_abort=functools.partial(run.abandoned, index),
                                display_path=job.path,
                                detach_close=True,
                                check=functools.partial(gate.check, job.path),
                            )
                        )
                        return queued.popleft()
                    except (ValueError, OSError) as error:
                        run.done(index, error, 0)

            return feed

        # Every file in flight holds a temp file open on this side.
        max_open = files_in_flight_per_channel(max(1, len(pipes)), self.depth)
        targets, interrupt, cleanup = self._run_on_pipes(
            pipes, make_feed, run.worker_exit, max_open
        )
        try:
            run_fetch(run, targets, interrupt)
        finally:
            cleanup()

    # -- the file stream ---------------------------------------------------------------------

    def _wants_stream(self, jobs: list[FetchJob]) -> bool:
        if self.stream is False:
            return False
        warm_up = self._warm_up
        if warm_up is not None and warm_up.is_alive():
            # A first sync is opening the stream (a round trip or two): its files go there,
            # compressed, rather than over SFTP beside it.
            warm_up.join()
        if self._stream_refused is not None:
            return False
        opened = self._stream
        failure = None if opened is None else opened.failed_to_start()
        if failure is not None:  # started early, ended at once: refused like one that fails
            self._refuse_stream(failure)
            return False
        if self.stream is True or (self._stream is not None and self._stream.alive):
            return True
        return len(jobs) >= STREAM_MIN_FILES or sum(j.length for j in jobs) >= STREAM_MIN_BYTES

    def _open_stream(self) -> FileStream | None:
        """The open stream, started (and SSH compression handed to it) if need be; None
        when the server cannot run it (logged once, SFTP from then on)."""
        from runicorn.transport import ssh

        with self._stream_lock:
            if self._closed or self._stream_refused is not None:
                return None
            if self._stream is not None and self._stream.alive:
                return self._stream
            transport = self._transport

            def decide_level() -> int:
                # Asked once the channel is open: the link check settles meanwhile.
                return DEFAULT_LEVEL if ssh.hand_compression_to_stream(transport) else 0

            stream = FileStream(
                transport,
                self.root,
                level=0,
                python=self.stream_python,
                timeout=self.timeout,
                window_size=self.window_size,
                decide_level=decide_level,
            )
            try:
                stream.start()
            except StreamBroken as error:
                self._refuse_stream(error)
                return None
            self._stream = stream
            logger.debug(
                "file stream started with %s (zlib level %d, zstd level %d offered)",
                self.stream_python or "python3",
                stream.level,
                stream.zstd_level,
            )
            return stream

    def _refuse_stream(self, error: BaseException) -> None:
        import paramiko

        from runicorn.transport import ssh

        self._stream_refused = str(error)
        self._stream = None
        logger.warning("%s; fetching over SFTP instead", error)
        try:
            # Compression meant for the stream goes back to SSH, for SFTP's files.
            ssh.take_compression_back(self._transport)
        except (OSError, EOFError, paramiko.SSHException) as failure:
            logger.debug("SSH compression could not be turned back on: %s", failure)

    def _fetch_streamed(self, run: FetchRun, stream: FileStream, workers: int) -> None:
        """Run ``run`` through ``stream``; if it breaks, the jobs it did not finish (resumed
        at the byte where it stopped) and the rest go over SFTP pipelines."""
        fallback: list[SftpPipeline] = []

        def target() -> None:
            error: BaseException | None = None
            try:
                try:
                    stream.serve(run)
                    return
                except StreamBroken as broken:
                    if run.stopping.is_set():
                        self._stream = None  # closed by the interrupt: reopened next time
                        return
                    self._refuse_stream(broken)
                    unfinished = broken.unfinished
                error = self._finish_over_sftp(run, unfinished, workers, fallback)
            except BaseException as failure:
                error = failure
            finally:
                run.worker_exit(error)

        def interrupt() -> None:
            stream.close()
            for pipe in list(fallback):
                if not pipe.borrowed:
                    pipe.close()

        run_fetch(run, [target], interrupt)

    def _finish_over_sftp(
        self,
        run: FetchRun,
        unfinished: list[Unfinished],
        workers: int,
        opened: list[SftpPipeline],
    ) -> BaseException | None:
        """The stream's unfinished jobs, then every job not taken yet, over SFTP (on the
        stream's worker thread, driving the pipelines from threads of its own)."""
        pipes = self._open_pipes(max(1, workers))
        opened.extend(pipes)
        refused = self._linked_directories(pipes, run.jobs)
        lock = threading.Lock()
        resumes = list(reversed(unfinished))

        def make_feed() -> Callable[[], Operation | None]:
            def feed() -> Operation | None:
                while True:
                    with lock:
                        item = resumes.pop() if resumes else None
                    if item is not None:
                        index, skip = item.index, item.received
                    else:
                        taken = run.take()
                        if taken is None:
                            return None
                        index, skip = taken, 0
                    job = run.jobs[index]

                    def done(
                        error: BaseException | None, received: int, i: int = index, s: int = skip
                    ) -> None:
                        run.done(i, error, received + s)

                    try:
                        if refused:
                            _refuse_under(refused, job.path)
                        return ReadRangeOp(
                            self._full(job.path),
                            job.offset + skip,
                            job.length - skip,
                            self.read_size,
                            functools.partial(run.data, index),
                            done,
                            should_abort=functools.partial(run.abandoned, index),
                            display_path=job.path,
                            detach_close=True,
                        )
                    except (ValueError, OSError) as error:
                        run.done(index, error, skip)

            return feed

        errors: list[BaseException | None] = []

        def on_exit(error: BaseException | None) -> None:
            with lock:
                errors.append(error)

        max_open = files_in_flight_per_channel(max(1, len(pipes)), self.depth)
        targets, interrupt, cleanup = self._run_on_pipes(pipes, make_feed, on_exit, max_open)
        self._run_workers(targets, interrupt, cleanup, "runicorn-sftp-fallback")
        if errors and all(error is not None for error in errors):
            return errors[-1]
        return None

    def _linked_directories(self, pipes: list[SftpPipeline], jobs: list[FetchJob]) -> set[str]:
        """The directories above ``jobs``' files (relative to the root) that are not plain
        directories on the server: one pipelined LSTAT per distinct directory, per fetch.

        SFTP opens by path and follows every link on the way, so a run's ``media/`` swapped
        for a link after the manifest was made would be read through. Checking the
        directories first closes that, except for a swap in the moment between the LSTAT
        and the OPEN (see ``docs/reliability.md``). A directory that is missing or cannot
        be checked is not refused here: opening the file under it then fails as it would.
        """
        directories = _directories_above(jobs)
        if not directories:
            return set()
        found: dict[str, Attrs] = {}
        lock = threading.Lock()
        pending = sorted(directories, reverse=True)

        def record(path: str, attrs: Attrs | None, _error: BaseException | None) -> None:
            if attrs is not None:
                with lock:
                    found[path] = attrs

        def make_feed() -> Callable[[], Operation | None]:
            def feed() -> Operation | None:
                with lock:
                    if not pending:
                        return None
                    path = pending.pop()
                return LstatOp(
                    posixpath.join(self.root, path),
                    functools.partial(record, path),
                    display_path=path,
                )

            return feed

        targets, interrupt, cleanup = self._run_on_pipes(pipes, make_feed, lambda _error: None)
        self._run_workers(targets, interrupt, cleanup, "runicorn-lstat")
        return {path for path, attrs in found.items() if not attrs.is_dir}

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteDirEntry] | BaseException]:
        """List many directories at once: pipelined over the worker channels (legacy walk)."""
        unique = list(dict.fromkeys(paths))
        results: dict[str, list[RemoteDirEntry] | BaseException] = {}
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
                        functools.partial(record, path),
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
            self._run_workers(targets, interrupt, cleanup, "runicorn-listdirs")
        failure = errors[-1] if errors else ConnectionError("directory listing did not finish")
        for path in unique:
            if path not in results:
                results[path] = copy_error(failure)
        return results

    @staticmethod
    def _run_workers(
        targets: list[Callable[[], None]],
        interrupt: Callable[[], None],
        cleanup: Callable[[], None],
        name: str,
    ) -> None:
        """Run one thread per worker channel to the end; on Ctrl+C (or any error here) stop
        them and wait for them before the channels are cleaned up."""
        threads = [threading.Thread(target=t, name=name, daemon=True) for t in targets]
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
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.finish(min(2.0, self.timeout or 2.0))


def _directories_above(jobs: list[FetchJob]) -> set[str]:
    """Every directory above ``jobs``' files, relative to the root."""
    directories: set[str] = set()
    for job in jobs:
        try:
            relative = relative_path(job.path)
        except ValueError:
            continue  # the file's own operation reports it
        for directory in _directories_of(relative):
            if directory in directories:
                break  # and every one above it
            directories.add(directory)
    return directories


def _directories_of(relative: str) -> Iterator[str]:
    """The directories above the root-relative ``relative``, nearest first: ``a/b/c``
    gives ``a/b``, then ``a``."""
    end = relative.rfind("/")
    while end > 0:
        yield relative[:end]
        end = relative.rfind("/", 0, end)


class _DirectoryGate:
    """The directory checks of :meth:`SftpRemote._linked_directories` on the fetch's own
    channel: the LSTATs are fed ahead of the OPENs they guard (all at the start, or those
    above each file as it is taken), so they travel with the first OPENs, and a file's
    :meth:`check` (asked when its OPEN is answered, and so after every LSTAT sent before
    it, as the server answers in order) refuses it when a directory above it is not a
    plain directory. A file whose directory was not answered yet is refused too, though an
    in-order server never lets that happen. Driven by one pipeline's thread."""

    def __init__(self, root: str, directories: set[str]) -> None:
        self._root = root
        self._pending = sorted(directories, reverse=True)
        self._asked: set[str] = set(directories)
        self._answered: set[str] = set()
        self._refused: set[str] = set()

    def next_op(self) -> LstatOp | None:
        """The next LSTAT to send, or ``None`` once all are sent."""
        if not self._pending:
            return None
        return self._op(self._pending.pop())

    def ops_for(self, path: str) -> list[LstatOp]:
        """LSTATs of the directories above ``path`` not asked on this channel yet (none
        for a path of a directory given at the start: those go first, from :meth:`next_op`)."""
        try:
            relative = relative_path(path)
        except ValueError:
            return []  # the file's own operation reports it
        ops: list[LstatOp] = []
        for directory in reversed(list(_directories_of(relative))):  # the root's side first
            if directory not in self._asked:
                self._asked.add(directory)
                ops.append(self._op(directory))
        return ops

    def _op(self, path: str) -> LstatOp:
        return LstatOp(
            posixpath.join(self._root, path),
            functools.partial(self._record, path),
            display_path=path,
        )

    def _record(self, path: str, attrs: Attrs | None, _error: BaseException | None) -> None:
        # A directory that is missing or cannot be checked is not refused: opening the
        # file under it fails as it would.
        self._answered.add(path)
        if attrs is not None and not attrs.is_dir:
            self._refused.add(path)

    def check(self, path: str) -> BaseException | None:
        """Why ``path`` must not be read, or ``None``."""
        try:
            relative = relative_path(path)
        except ValueError as error:
            return error
        for directory in _directories_of(relative):
            if directory not in self._answered:
                return OSError(
                    errno.EPROTO,
                    f"the server answered the OPEN before the LSTAT of {directory!r}; "
                    "not reading the file unchecked",
                    path,
                )
        try:
            _refuse_under(self._refused, relative)
        except OSError as error:
            return error
        return None


def _refuse_under(refused: set[str], path: str) -> None:
    """OSError (``ELOOP``) if a directory above ``path`` is in ``refused``."""
    for directory in _directories_of(path):
        if directory in refused:
            raise OSError(
                errno.ELOOP,
                f"{directory!r} is a symbolic link (or not a directory) on the server; "
                "refusing to read through it",
                path,
            )


def _entry(item: DirEntry) -> RemoteDirEntry:
    attrs = item.attrs
    return RemoteDirEntry(
        name=item.name,
        is_dir=attrs.is_dir,
        is_symlink=attrs.is_symlink,
        size=attrs.size or 0,
        mtime=float(attrs.mtime or 0),
    )

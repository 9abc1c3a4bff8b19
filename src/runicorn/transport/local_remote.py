"""A local directory served through the :class:`~.remote.Remote` interface: :class:`LocalRemote`
(an NFS mount of the lab, the demo), so one sync engine covers both kinds of remote."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from runicorn._sys.dirs import Directory, LinkOnPathError, open_directory
from runicorn._sys.fileio import pread, pread_upto
from runicorn.transport.fetch import FetchRun, run_fetch
from runicorn.transport.remote import (
    FetchCancelled,
    FetchJob,
    FetchResult,
    RemoteDirEntry,
    ShrunkError,
    relative_path,
)

__all__ = ["LocalRemote"]

logger = logging.getLogger(__name__)

_LOCAL_READ_SIZE = 1024 * 1024


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    """Errors of reaching ``path`` beneath the root, naming it as the caller gave it."""
    try:
        yield
    except LinkOnPathError:
        raise OSError(
            errno.ELOOP,
            "a component of this path is a symbolic link on the server; refusing to "
            "follow it out of the root",
            path,
        ) from None
    except OSError as error:
        raise type(error)(error.errno, error.strerror, path) from None


class LocalRemote:
    """The same interface over a local directory (an NFS mount, the demo).

    No path component is ever followed if it is a symbolic link: every path is opened
    relative to a descriptor of the root, one component at a time or with ``openat2``'s
    ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` (:func:`~runicorn._sys.beneath.open_beneath`),
    so a run directory swapped for a link after the manifest was made cannot lead a read
    outside the root. (Where there is no ``dir_fd``, on Windows, each component is checked
    by path right before the open instead: :mod:`runicorn._sys.dirs`.) Only regular files
    are read. The root itself may be reached through links (a mount point the user chose).

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
        self._root_dir: Directory | None = None
        self._root_lock = threading.Lock()

    def __enter__(self) -> LocalRemote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _root_directory(self) -> Directory:
        """The root directory, opened once (links followed: the user named it)."""
        with self._root_lock:
            if self._root_dir is None:
                try:
                    directory = open_directory(self.root)
                except NotADirectoryError:
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        "the remote root is a file, not a directory; name the experiments "
                        "directory",
                        self.root,
                    ) from None
                except OSError as error:
                    raise type(error)(error.errno, error.strerror, self.root) from None
                self._root_dir = directory
                self._finalizer = weakref.finalize(self, directory.close)
            return self._root_dir

    def root_descriptor(self) -> int | None:
        """The root directory's descriptor, opened once and owned by this remote (never
        close it): for opening many files beneath the root (``copy_files``) without a path
        walk per file. ``None`` where directories are reached by path (Windows)."""
        fd = getattr(self._root_directory(), "fd", None)
        return fd if isinstance(fd, int) else None

    def _open_under_root(self, path: str, flags: int) -> int:
        """``path`` opened beneath the root with no link followed on the way."""
        root = self._root_directory()
        with _named(path):
            return root.open_beneath(relative_path(path), flags)

    def _under_root(self, path: str) -> Directory:
        """The directory ``path`` beneath the root, no link followed on the way."""
        root = self._root_directory()
        with _named(path):
            return root.descend(relative_path(path))

    def _open(self, path: str) -> int:
        """A read-only descriptor of a regular file; no component may be a symbolic link."""
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not hang us
        fd = self._open_under_root(path, flags)
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
            return pread_upto(fd, 0, length)
        finally:
            os.close(fd)

    def probe_files(
        self, paths: Sequence[str], length: int, stamp_paths: Sequence[str]
    ) -> tuple[list[bytes | BaseException], list[tuple[int, int] | BaseException]]:
        """:meth:`read_prefix` of each of ``paths`` and the ``(size, whole-second mtime)``
        of each of ``stamp_paths`` (a link followed), the stamps taken first; per path the
        answer or the exception (``OSError``) asking raised."""
        stamps: list[tuple[int, int] | BaseException] = []
        for path in stamp_paths:
            try:
                fd = self._open(path)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            except OSError as error:
                stamps.append(error)
                continue
            if not stat.S_ISREG(st.st_mode):
                stamps.append(OSError(f"{path}: not a regular file"))
            else:
                stamps.append((st.st_size, int(st.st_mtime)))
        prefixes: list[bytes | BaseException] = []
        for path in paths:
            try:
                prefixes.append(self.read_prefix(path, length))
            except OSError as error:
                prefixes.append(error)
        return prefixes, stamps

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The whole file; ValueError if it is larger than ``max_bytes``."""
        fd = self._open(path)
        try:
            data = pread_upto(fd, 0, max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ValueError(f"file {path!r} is larger than {max_bytes} bytes; refusing it")
        return data

    def listdir(self, path: str) -> list[RemoteDirEntry]:
        """Entries of one directory ('' is the root), sorted by name, links not followed."""
        entries: list[RemoteDirEntry] = []
        directory = self._under_root(path)
        try:
            with directory.scandir() as scan:
                for item in scan:
                    try:
                        info = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    entries.append(
                        RemoteDirEntry(
                            name=item.name,
                            is_dir=stat.S_ISDIR(info.st_mode),
                            is_symlink=stat.S_ISLNK(info.st_mode),
                            size=info.st_size,
                            mtime=float(int(info.st_mtime)),
                        )
                    )
        except OSError as error:
            raise type(error)(error.errno, error.strerror, path) from None
        finally:
            directory.close()
        entries.sort(key=lambda entry: entry.name)
        return entries

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteDirEntry] | BaseException]:
        """Many directories; sequential is as fast as it gets on a local disk."""
        results: dict[str, list[RemoteDirEntry] | BaseException] = {}
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
        run = FetchRun(jobs, on_result, cancel)
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

        run_fetch(run, [target] * max(1, min(workers, len(run.jobs))), lambda: None)

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
                        data = pread(fd, min(self.read_size, end - position), position)
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

    def _fetch_one(self, run: FetchRun, index: int) -> None:
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
                    data = pread(fd, min(self.read_size, end - position), position)
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
        with self._root_lock:
            if self._root_dir is not None:
                self._finalizer()
                self._root_dir = None

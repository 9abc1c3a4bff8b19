"""What the sync client reads from: the :class:`Remote` protocol and the values it speaks.

Why: the client decides *what* to fetch (from a manifest or a legacy walk); a Remote decides
*how*, fast. :class:`~.sftp_remote.SftpRemote` keeps many SFTP requests in flight over a few
channels of the user's SSH connection; :class:`~.local_remote.LocalRemote` serves the same
interface from a mounted directory (NFS, the demo), so one sync engine covers both.

Threading contract of :meth:`Remote.fetch`: transfers may run on worker threads, but every
callback (each job's ``sink`` and ``on_result``) runs on the thread that called ``fetch``, one
at a time, so callers need no locks. A callback must not call back into the same Remote.
``fetch`` returns only after every worker thread has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "FetchCancelled",
    "FetchJob",
    "FetchResult",
    "Remote",
    "RemoteDirEntry",
    "ShrunkError",
    "relative_path",
]


class ShrunkError(EOFError):
    """A remote file ended before the range we were told to read: it shrank since it was listed.

    The caller should treat its copy as stale and fetch the file again after a fresh listing.
    """

    def __init__(self, path: str, expected_end: int, actual_end: int) -> None:
        super().__init__(
            f"remote file {path!r} ends at byte {actual_end}, before the expected {expected_end}: "
            "it shrank or was rewritten since the manifest was made; sync again to pick up the "
            "new version"
        )
        self.path = path
        self.expected_end = expected_end
        self.actual_end = actual_end


@dataclass(frozen=True)
class RemoteDirEntry:
    """One directory entry, as lstat sees it: a symbolic link is reported, not followed.

    ``mtime`` is in whole seconds for both implementations (SFTP v3 carries no fractions), so a
    walk over either gives the same answer.
    """

    name: str
    is_dir: bool
    is_symlink: bool
    size: int
    mtime: float


@dataclass(eq=False, slots=True)
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


@dataclass(eq=False, slots=True)
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

    def listdir(self, path: str) -> list[RemoteDirEntry]: ...

    def listdirs(self, paths: list[str]) -> dict[str, list[RemoteDirEntry] | BaseException]: ...

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

"""A minimal SFTP version 3 client that keeps many requests in flight on one channel.

Why it exists: paramiko's ``SFTPClient`` waits for each OPEN and each 32 KiB READ before it sends
the next request, so a sync over a 50 ms link spends its time waiting, not transferring. Here one
thread drives one SSH channel: it writes up to ``depth`` requests (OPEN, READ, CLOSE, READDIR … of
many files at once) before it reads the answers, matches each answer to its request by id, and
sends follow-up requests as answers arrive. Written from draft-ietf-secsh-filexfer-02.

The unit of work is an *operation* (:class:`ReadRangeOp`, :class:`ListDirOp`): a small state
machine that produces the requests of one file or directory and consumes their answers.
:meth:`SftpPipeline.run` takes operations from a feed until the feed and the operations are
exhausted. A pipeline is not thread-safe: only the thread inside :meth:`~SftpPipeline.run` may
touch it, except :meth:`~SftpPipeline.close`, which any thread may call to make ``run`` fail fast.

Errors of one request (a STATUS answer) become Python exceptions for that operation only:
``FileNotFoundError``, ``PermissionError``, ``EOFError`` (end of file) or ``OSError``. Errors of
the channel (closed, dropped connection, no answer within ``timeout``) fail every operation that
is still open with ``ConnectionError`` or ``TimeoutError`` and mark the pipeline dead.
"""

from __future__ import annotations

import collections
import errno
import logging
import posixpath
import stat
import struct
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paramiko

from runicorn.transport.ssh import speaks_openssh

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_READ_SIZE",
    "DEFAULT_TIMEOUT",
    "MAX_READ_SIZE",
    "OPENSSH_FIRST_HANDLE",
    "Attrs",
    "ListDirOp",
    "Prefetched",
    "PrefetchingSFTPClient",
    "ReadRangeOp",
    "RealPathOp",
    "SftpPipeline",
    "SftpProtocolError",
    "ShrunkError",
    "detached",
    "open_sftp_client",
]

logger = logging.getLogger(__name__)

# Chosen by benchmarks/bench_transfer.py: at 50 ms RTT depth 64 reaches the link's limit, and
# OpenSSH's own client uses 64; more only adds memory.
DEFAULT_DEPTH = 64
# OpenSSH's sftp-server answers at most 255 KiB per READ (SFTP_MAX_READ_LENGTH); asking for that
# much cuts per-request overhead eightfold compared with paramiko's 32 KiB.
MAX_READ_SIZE = 255 * 1024
DEFAULT_READ_SIZE = MAX_READ_SIZE
DEFAULT_TIMEOUT = 30.0

# Refuse absurd packets from a broken or hostile server instead of allocating for them.
_MAX_PACKET = 4 * 1024 * 1024
_RECV_SIZE = 1024 * 1024
_MAX_DETACHED = 4096
SFTP_VERSION = 3

# Packet types (draft-ietf-secsh-filexfer-02, section 3).
FXP_INIT = 1
FXP_VERSION = 2
FXP_OPEN = 3
FXP_CLOSE = 4
FXP_READ = 5
FXP_LSTAT = 7
FXP_FSTAT = 8
FXP_OPENDIR = 11
FXP_READDIR = 12
FXP_REALPATH = 16
FXP_STAT = 17
FXP_STATUS = 101
FXP_HANDLE = 102
FXP_DATA = 103
FXP_NAME = 104
FXP_ATTRS = 105

FXF_READ = 0x00000001

FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_BAD_MESSAGE = 5
FX_NO_CONNECTION = 6
FX_CONNECTION_LOST = 7
FX_OP_UNSUPPORTED = 8

ATTR_SIZE = 0x00000001
ATTR_UIDGID = 0x00000002
ATTR_PERMISSIONS = 0x00000004
ATTR_ACMODTIME = 0x00000008
ATTR_EXTENDED = 0x80000000

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct(">IBI")  # length, type, request id
_INIT_PACKET = _U32.pack(5) + bytes([FXP_INIT]) + _U32.pack(SFTP_VERSION)

OPENSSH_FIRST_HANDLE = _U32.pack(0)
"""The handle OpenSSH's sftp-server gives the first file opened in a session.

Its handles are the index of a slot in its handle table, as four bytes, the lowest free slot
first (``handle_new``/``handle_to_string`` in sftp-server.c, unchanged since 2002). Knowing it
lets the first READ leave with the OPEN; :class:`ReadRangeOp` checks the guess against the
handle actually returned before it uses a byte."""


class SftpProtocolError(ConnectionError):
    """The server broke the SFTP protocol; the channel cannot be trusted any more."""


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
class Attrs:
    """The file attributes an SFTP v3 server reports (fields it left out are None)."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.permissions is not None and stat.S_ISDIR(self.permissions)

    @property
    def is_symlink(self) -> bool:
        return self.permissions is not None and stat.S_ISLNK(self.permissions)

    @property
    def is_regular(self) -> bool:
        return self.permissions is not None and stat.S_ISREG(self.permissions)


# -- encoding ----------------------------------------------------------------------------------


def _string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _path(path: str) -> bytes:
    # surrogateescape: a name the server gave us as undecodable bytes goes back unchanged.
    return _string(path.encode("utf-8", "surrogateescape"))


class _Reader:
    """Cursor over one packet body; a short body raises SftpProtocolError, never IndexError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def u32(self) -> int:
        end = self._pos + 4
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        (value,) = _U32.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def u64(self) -> int:
        end = self._pos + 8
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        (value,) = _U64.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def string(self) -> bytes:
        size = self.u32()
        end = self._pos + size
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        value = bytes(self._data[self._pos : end])
        self._pos = end
        return value

    def text(self) -> str:
        return self.string().decode("utf-8", "surrogateescape")

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        uid = gid = None
        if flags & ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        permissions = self.u32() if flags & ATTR_PERMISSIONS else None
        atime = mtime = None
        if flags & ATTR_ACMODTIME:
            atime, mtime = self.u32(), self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(size, uid, gid, permissions, atime, mtime)


def status_error(code: int, message: str, path: str) -> BaseException:
    """The Python exception for an SFTP STATUS ``code`` about ``path`` (EOFError for EOF)."""
    detail = f"{message} (SFTP status {code})" if message else f"SFTP status {code}"
    if code == FX_EOF:
        return EOFError(f"end of file: {path!r}")
    if code == FX_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, detail, path)
    if code == FX_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, detail, path)
    if code in (FX_NO_CONNECTION, FX_CONNECTION_LOST):
        return ConnectionError(f"{detail}: {path!r}")
    if code == FX_OP_UNSUPPORTED:
        return OSError(errno.EOPNOTSUPP, detail, path)
    return OSError(errno.EIO, detail, path)


# -- operations --------------------------------------------------------------------------------

Handler = Callable[[int, "_Reader"], None]
Request = tuple[int, bytes, Handler]


class Operation:
    """One multi-request job on a pipeline: it hands out requests and consumes their answers.

    ``next_request`` returns the next request to send now (type, payload after the id, handler
    for the answer) or None when it must wait for answers; ``done`` turns true once it expects no
    more answers; ``fail`` is called once if the channel dies under it.
    """

    done: bool = False

    def next_request(self) -> Request | None:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        raise NotImplementedError


def detached(ptype: int, body: _Reader) -> None:
    """The handler of a request whose answer nobody waits for (a CLOSE of a read-only handle).

    The pipeline sends it like any other and drops its answer whenever it arrives, possibly
    during a later :meth:`SftpPipeline.run`; it never delays the end of a run. The server
    still receives and executes it, in order, before anything sent after it.
    """


def _expect(ptype: int, body: _Reader, want: int, path: str) -> None:
    """Raise the STATUS error in an answer, or SftpProtocolError for an unexpected type."""
    if ptype == FXP_STATUS:
        code = body.u32()
        message = body.text() if code != FX_OK else ""
        raise status_error(code, message, path)
    if ptype != want:
        raise SftpProtocolError(f"unexpected SFTP answer type {ptype} (wanted {want}) for {path!r}")


class ReadRangeOp(Operation):
    """OPEN a file, READ bytes ``[offset, offset + length)`` in pipelined chunks, CLOSE it.

    Data reaches ``on_data(file_offset, bytes)`` in offset order whatever order the answers take.
    ``on_done(error, bytes_received)`` is called once, as soon as the outcome is known (before
    the CLOSE is answered). ``exact=True`` (fetch): an EOF before the end is a
    :class:`ShrunkError`. ``exact=False`` (read a prefix): EOF or a short last read ends the
    range early without error, so a small prefix costs exactly OPEN + READ + CLOSE.
    ``size_cap`` (read a whole file): also FSTAT, extend the range to the reported size and fail
    with ValueError if the file is larger than the cap. ``should_abort`` lets the owner stop the
    op (its consumer failed); an aborted op reports nothing more and just closes its handle.
    ``detach_close=True``: the op is done once its CLOSE is sent (see :func:`detached`), so a
    run ends one round trip earlier; a read-only handle has nothing left to lose by then.
    ``predicted_handle`` (a prefix that fits one READ, on a session where nothing else is open
    yet): the READ and CLOSE go out right behind the OPEN, naming the handle the server is
    expected to return, so the whole read costs one round trip. Their answers are used only if
    the OPEN really returned that handle; otherwise they are dropped (they named no file or one
    that this op then reads again properly) and the op goes on as usual.
    """

    def __init__(
        self,
        path: str,
        offset: int,
        length: int,
        read_size: int,
        on_data: Callable[[int, bytes], None],
        on_done: Callable[[BaseException | None, int], None],
        *,
        exact: bool = True,
        size_cap: int | None = None,
        should_abort: Callable[[], bool] | None = None,
        display_path: str | None = None,
        detach_close: bool = False,
        predicted_handle: bytes | None = None,
    ) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length for {path!r}")
        if predicted_handle is not None and (exact or size_cap is not None or length > read_size):
            raise ValueError("a predicted handle is only for a prefix that fits one READ")
        self.path = path
        self._name = display_path if display_path is not None else path
        self._start = offset
        self._end = offset + length
        self._read_size = read_size
        self._on_data = on_data
        self._on_done: Callable[[BaseException | None, int], None] | None = on_done
        self._exact = exact
        self._size_cap = size_cap
        self._should_abort = should_abort
        self._detach_close = detach_close
        self._handle: bytes | None = None
        self._opened = False
        self._stat_state = 0  # 0: not needed/sent, 1: to send, 2: in flight
        self._next = offset  # next offset to request
        self._retries: collections.deque[tuple[int, int]] = collections.deque()
        self._chunks: dict[int, bytes] = {}
        self._delivered = offset  # data before this reached on_data
        self._received = 0
        self._reads_in_flight = 0
        self._finished = False  # outcome reported (or aborted): no more reads
        self._closing = False
        self._predicted = predicted_handle
        # guess: 0 none, 1 READ to send, 2 CLOSE to send, 3 answers due, 4 settled
        self._guess_state = 0
        self._guess_read: tuple[int, _Reader] | None = None
        self._guess_matched = False
        self._open_answered = False
        if size_cap is not None or (exact and length == 0):
            # A whole-file read learns the size; an empty range still checks it is a file.
            self._stat_state = 1

    # outcome -------------------------------------------------------------------------------

    def _finish(self, error: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback(error, self._received)

    def fail(self, error: BaseException) -> None:
        self.done = True
        self._finish(error)

    def _aborted(self) -> bool:
        if not self._finished and self._should_abort is not None and self._should_abort():
            self._finished = True
            self._on_done = None
        return self._finished

    # requests ------------------------------------------------------------------------------

    def next_request(self) -> Request | None:
        if not self._opened:
            self._opened = True
            if self._predicted is not None:
                self._guess_state = 1
            payload = _path(self.path) + _U32.pack(FXF_READ) + _U32.pack(0)
            return FXP_OPEN, payload, self._on_open
        if self._guess_state == 1:
            self._guess_state = 2
            size = self._end - self._start
            payload = _string(self._predicted) + _U64.pack(self._start) + _U32.pack(size)
            return FXP_READ, payload, self._on_guessed_read
        if self._guess_state == 2:
            self._guess_state = 3
            return FXP_CLOSE, _string(self._predicted), self._on_guessed_close
        if self._guess_state == 3 or self._handle is None or self._closing:
            return None
        handle = _string(self._handle)
        if not self._aborted():
            if self._stat_state == 1:
                self._stat_state = 2
                return FXP_FSTAT, handle, self._on_fstat
            if self._retries:
                start, size = self._retries.popleft()
                return self._read(handle, start, size)
            if self._next < self._end and not (self._size_cap is None and self._stat_state == 2):
                size = min(self._read_size, self._end - self._next)
                start = self._next
                self._next += size
                return self._read(handle, start, size)
            if self._stat_state == 2 or self._reads_in_flight:
                return None
            self._finish(None)
        if self._reads_in_flight or self._stat_state == 2:
            return None  # answers still due; CLOSE only after them
        self._closing = True
        if self._detach_close:
            self.done = True
            return FXP_CLOSE, handle, detached
        return FXP_CLOSE, handle, self._on_close

    def _read(self, handle: bytes, start: int, size: int) -> Request:
        self._reads_in_flight += 1

        def handler(ptype: int, body: _Reader) -> None:
            self._on_read(ptype, body, start, size)

        return FXP_READ, handle + _U64.pack(start) + _U32.pack(size), handler

    # answers -------------------------------------------------------------------------------

    def _on_open(self, ptype: int, body: _Reader) -> None:
        self._open_answered = True
        if self._guess_state in (1, 2):
            self._guess_state = 0  # answered before the guess left (depth was full): no guess
        try:
            _expect(ptype, body, FXP_HANDLE, self._name)
            self._handle = body.string()
        except (OSError, EOFError) as error:
            if isinstance(error, SftpProtocolError):
                raise
            self.done = self._guess_state == 0  # else the guessed answers are still due
            self._finish(error)
        self._settle_guess()

    def _on_guessed_read(self, ptype: int, body: _Reader) -> None:
        self._guess_read = (ptype, body)
        self._settle_guess()

    def _on_guessed_close(self, ptype: int, body: _Reader) -> None:
        # The last answer of a guess that was right, or of an OPEN that failed. After a wrong
        # guess the op reads the file with its real handle and ends with its own CLOSE.
        if self._guess_matched or self._handle is None:
            self.done = True

    def _settle_guess(self) -> None:
        """Once the OPEN and the guessed READ are both answered: keep or drop the guess."""
        if self._guess_state != 3 or not self._open_answered or self._guess_read is None:
            return
        self._guess_state = 4
        ptype, body = self._guess_read
        self._guess_read = None
        if self._handle is None or self._handle != self._predicted:
            return  # OPEN failed, or another handle: the guessed requests named no file of ours
        self._guess_matched = True
        self._closing = True  # the guessed CLOSE is this file's
        self._next = self._end
        self._reads_in_flight += 1
        self._on_read(ptype, body, self._start, self._end - self._start)
        self._finish(None)  # one READ covered the prefix (or it failed, reported already)

    def _on_fstat(self, ptype: int, body: _Reader) -> None:
        self._stat_state = 0
        if self._finished:
            return
        try:
            _expect(ptype, body, FXP_ATTRS, self._name)
            attrs = body.attrs()
        except SftpProtocolError:
            raise
        except (OSError, EOFError) as error:
            self._finish(error)
            return
        if attrs.permissions is not None and stat.S_ISDIR(attrs.permissions):
            self._finish(IsADirectoryError(errno.EISDIR, "is a directory", self._name))
            return
        if self._size_cap is not None and attrs.size is not None:
            if attrs.size > self._size_cap:
                self._finish(_too_large(self._name, attrs.size, self._size_cap))
                return
            self._end = max(self._end, self._start + attrs.size)

    def _on_read(self, ptype: int, body: _Reader, start: int, size: int) -> None:
        self._reads_in_flight -= 1
        if self._finished:
            return
        if ptype == FXP_STATUS:
            code = body.u32()
            message = body.text() if code != FX_OK else ""
            if code == FX_EOF:
                self._eof_at(start)
            else:
                self._finish(status_error(code, message, self._name))
            return
        if ptype != FXP_DATA:
            raise SftpProtocolError(f"unexpected SFTP answer type {ptype} to READ {self._name!r}")
        data = body.string()
        if len(data) > size:
            raise SftpProtocolError(f"server sent {len(data)} bytes for a {size}-byte READ")
        if not data:
            self._eof_at(start)
            return
        self._received += len(data)
        self._chunks[start] = data
        if len(data) < size:
            rest = start + len(data)
            if not self._exact and start + size >= self._end and not self._retries:
                # Short last read of a prefix: the end of the file (OpenSSH reads short only
                # there), so no extra request is spent to confirm it.
                self._end = rest
                self._next = min(self._next, rest)
            else:
                self._retries.appendleft((rest, size - len(data)))
        self._deliver()
        if self._size_cap is not None and self._delivered > self._size_cap:
            self._finish(_too_large(self._name, self._delivered, self._size_cap))

    def _eof_at(self, position: int) -> None:
        if position >= self._end:
            return
        if self._exact:
            self._finish(ShrunkError(self._name, self._end, position))
            return
        self._end = position
        self._next = min(self._next, position)
        self._retries = collections.deque((s, n) for s, n in self._retries if s < position)
        self._deliver()

    def _deliver(self) -> None:
        chunks = self._chunks
        while self._delivered in chunks:
            data = chunks.pop(self._delivered)
            if self._delivered + len(data) > self._end:
                data = data[: self._end - self._delivered]
            self._on_data(self._delivered, data)
            self._delivered += len(data)
            if self._finished:
                return

    def _on_close(self, ptype: int, body: _Reader) -> None:
        # A failed CLOSE of a read-only handle loses nothing; the data was already delivered.
        self.done = True


def _too_large(path: str, size: int, cap: int) -> ValueError:
    return ValueError(f"remote file {path!r} is larger than {cap} bytes ({size}); refusing it")


@dataclass(frozen=True)
class DirEntry:
    """One READDIR name with its (lstat) attributes."""

    name: str
    attrs: Attrs


class ListDirOp(Operation):
    """OPENDIR, READDIR until EOF, CLOSE; ``on_done(entries or None, error)`` once.

    OpenSSH reports lstat attributes in READDIR, so symbolic links are listed as links.
    ``.`` and ``..`` are left out.
    """

    def __init__(
        self,
        path: str,
        on_done: Callable[[list[DirEntry] | None, BaseException | None], None],
        *,
        display_path: str | None = None,
        detach_close: bool = False,
    ) -> None:
        self.path = path
        self._name = display_path if display_path is not None else path
        self._detach_close = detach_close
        self._on_done: Callable[[list[DirEntry] | None, BaseException | None], None] | None = (
            on_done
        )
        self._entries: list[DirEntry] = []
        self._handle: bytes | None = None
        self._opened = False
        self._waiting = False
        self._finished = False
        self._closing = False

    def _finish(self, entries: list[DirEntry] | None, error: BaseException | None) -> None:
        callback, self._on_done = self._on_done, None
        self._finished = True
        if callback is not None:
            callback(entries, error)

    def fail(self, error: BaseException) -> None:
        self.done = True
        if not self._finished:
            self._finish(None, error)

    def next_request(self) -> Request | None:
        if not self._opened:
            self._opened = True
            return FXP_OPENDIR, _path(self.path), self._on_opendir
        if self._handle is None or self._waiting or self._closing:
            return None
        self._waiting = True
        if not self._finished:
            return FXP_READDIR, _string(self._handle), self._on_readdir
        self._closing = True
        if self._detach_close:
            self._waiting = False
            self.done = True
            return FXP_CLOSE, _string(self._handle), detached
        return FXP_CLOSE, _string(self._handle), self._on_close

    def _on_opendir(self, ptype: int, body: _Reader) -> None:
        try:
            _expect(ptype, body, FXP_HANDLE, self._name)
            self._handle = body.string()
        except SftpProtocolError:
            raise
        except (OSError, EOFError) as error:
            self.done = True
            self._finish(None, error)

    def _on_readdir(self, ptype: int, body: _Reader) -> None:
        self._waiting = False
        if ptype == FXP_STATUS:
            code = body.u32()
            if code == FX_EOF:
                self._entries.sort(key=lambda entry: entry.name)
                self._finish(self._entries, None)
            else:
                self._finish(None, status_error(code, body.text(), self._name))
            return
        if ptype != FXP_NAME:
            raise SftpProtocolError(f"unexpected SFTP answer type {ptype} to READDIR")
        for _ in range(body.u32()):
            name = body.text()
            body.string()  # longname: ls -l text, not needed
            attrs = body.attrs()
            if name not in (".", ".."):
                self._entries.append(DirEntry(name, attrs))

    def _on_close(self, ptype: int, body: _Reader) -> None:
        self._waiting = False
        self.done = True


# -- the pipeline ------------------------------------------------------------------------------


class RealPathOp(Operation):
    """REALPATH: the server's absolute, canonical form of ``path`` (``.``: the login directory).

    ``on_done(path or None, error)`` once.
    """

    def __init__(self, path: str, on_done: Callable[[str | None, BaseException | None], None]):
        self.path = path
        self._on_done = on_done
        self._sent = False

    def next_request(self) -> Request | None:
        if self._sent:
            return None
        self._sent = True
        return FXP_REALPATH, _path(self.path), self._on_name

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._on_done(None, error)

    def _on_name(self, ptype: int, body: _Reader) -> None:
        self.done = True
        try:
            _expect(ptype, body, FXP_NAME, self.path)
            if body.u32() != 1:
                raise SftpProtocolError(f"REALPATH of {self.path!r} did not return one name")
            resolved = body.text()
        except SftpProtocolError:
            raise
        except (OSError, EOFError) as error:
            self._on_done(None, error)
            return
        self._on_done(resolved, None)


@dataclass
class Prefetched:
    """File prefixes read in an SFTP session's first round trip, for the first caller that asks.

    ``results`` maps a path relative to ``root`` to its first ``length`` bytes, or to the
    exception reading it raised (``FileNotFoundError`` …).
    """

    root: str
    length: int
    results: dict[str, bytes | BaseException]

    def take(self, root: str, path: str, length: int) -> bytes | BaseException | None:
        """The answer for ``path``, once; None if it was not read with this root and length."""
        if root.rstrip("/") != self.root.rstrip("/") or length != self.length:
            return None
        return self.results.pop(path, None)


class PrefetchingSFTPClient(paramiko.SFTPClient):
    """A paramiko ``SFTPClient`` whose INIT went out pipelined with its first requests.

    Made by :func:`open_sftp_client`; ``root`` is the remote root it resolved and
    ``prefetched`` what the first round trip read (consumed by :class:`SftpRemote`).
    """

    def __init__(
        self, channel: paramiko.Channel, server_version: int, root: str, prefetched: Prefetched
    ) -> None:
        self._known_version = server_version
        self.root = root
        self.prefetched = prefetched
        super().__init__(channel)

    def _send_version(self) -> int:
        # paramiko's __init__ calls this to exchange INIT/VERSION, which already happened.
        return self._known_version


def open_sftp_client(
    transport: paramiko.Transport,
    *,
    window_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    root: str | None = None,
    prefetch: Sequence[str] = (),
    prefetch_bytes: int = MAX_READ_SIZE,
) -> paramiko.SFTPClient:
    """An SFTP session on a new channel of ``transport``: a paramiko ``SFTPClient``.

    Plain, that is three round trips: channel open, subsystem request, INIT. OpenSSH's sshd
    opens a session channel with a zero window until the subsystem runs, so nothing can go
    along with the request. With ``root`` (relative: to the login directory) and
    ``prefetch`` (paths relative to it) on an OpenSSH server, the INIT leaves together with
    a REALPATH of a relative root and the reads of the first ``prefetch_bytes`` of each
    path -- the first one with its handle guessed (:data:`OPENSSH_FIRST_HANDLE`), so it costs
    no round trip of its own. The session is then a :class:`PrefetchingSFTPClient`: the
    whole no-change check of a sync is the third round trip.
    """
    channel = transport.open_session(window_size=window_size, timeout=timeout)
    try:
        channel.settimeout(timeout)
        channel.invoke_subsystem("sftp")
        if root is None or not speaks_openssh(transport):
            return paramiko.SFTPClient(channel)
        return _first_round_trip(channel, root, prefetch, prefetch_bytes, timeout)
    except BaseException:
        channel.close()
        raise


def _first_round_trip(
    channel: paramiko.Channel,
    root: str,
    prefetch: Sequence[str],
    length: int,
    timeout: float | None,
) -> PrefetchingSFTPClient:
    """INIT, REALPATH (relative root only) and the prefetch reads, pipelined; see above."""
    if not 0 <= length <= MAX_READ_SIZE:
        raise ValueError(f"prefetch_bytes must be between 0 and {MAX_READ_SIZE}")
    pipe = SftpPipeline(channel, timeout=timeout, borrowed=True, pipelined_init=True)
    resolved: list[tuple[str | None, BaseException | None]] = []
    results: dict[str, bytes | BaseException] = {}
    pieces: dict[str, list[bytes]] = {path: [] for path in prefetch}
    ops: list[Operation] = []
    absolute = root.startswith("/")
    if not absolute:
        ops.append(RealPathOp(root or ".", lambda path, error: resolved.append((path, error))))
    for index, path in enumerate(prefetch):

        def on_done(error: BaseException | None, _received: int, path: str = path) -> None:
            results[path] = error if error is not None else b"".join(pieces[path])

        ops.append(
            ReadRangeOp(
                posixpath.join(root, path) if root else path,
                0,
                length,
                max(length, 1),
                lambda _offset, data, path=path: pieces[path].append(data),
                on_done,
                exact=False,
                display_path=path,
                predicted_handle=OPENSSH_FIRST_HANDLE if index == 0 and length else None,
            )
        )
    pipe.run(ops=ops)
    if absolute:
        resolved_root = root
    else:
        path, error = resolved[0]
        if error is not None:
            raise error
        assert path is not None
        resolved_root = path
    assert pipe.server_version is not None
    return PrefetchingSFTPClient(
        channel, pipe.server_version, resolved_root, Prefetched(resolved_root, length, results)
    )


@dataclass(eq=False)
class _BorrowedState:
    """What the pipelines borrowed on one channel, one after another, share."""

    next_id: int = 0x70000000  # far above paramiko's own request ids
    detached: set[int] = field(default_factory=set)


_BORROWED: weakref.WeakKeyDictionary[paramiko.Channel, _BorrowedState] = weakref.WeakKeyDictionary()


class SftpPipeline:
    """One SFTP session on one channel, with up to ``depth`` requests in flight.

    ``borrowed=True`` speaks on the channel of an existing, idle paramiko ``SFTPClient`` (its
    INIT is done): request ids start far above paramiko's, the channel's timeout is restored
    after each :meth:`run`, and every answer is consumed before ``run`` returns, so paramiko
    finds the channel exactly as it left it. This is what lets a small read cost no extra channel
    (several round trips to open on a WAN).
    """

    def __init__(
        self,
        channel: paramiko.Channel,
        *,
        depth: int = DEFAULT_DEPTH,
        read_size: int = DEFAULT_READ_SIZE,
        timeout: float | None = DEFAULT_TIMEOUT,
        borrowed: bool = False,
        pipelined_init: bool = False,
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        if not 1 <= read_size <= _MAX_PACKET - 1024:
            raise ValueError(f"read_size must be between 1 and {_MAX_PACKET - 1024}")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None to wait forever)")
        self.channel = channel
        self.depth = depth
        self.read_size = read_size
        self.timeout = timeout
        self.borrowed = borrowed
        self.server_version: int | None = None
        self.extensions: dict[str, bytes] = {}
        self._buffer = bytearray()
        self._pending: dict[int, tuple[Operation, Handler]] = {}
        self._detached: set[int] = set()  # sent, answer not awaited (see ``detached``)
        self._next_id = 1
        self._shared: _BorrowedState | None = None
        if borrowed:
            self._shared = _BORROWED.get(channel)
            if self._shared is None:
                self._shared = _BorrowedState()
                _BORROWED[channel] = self._shared
            self._detached = self._shared.detached
            self._next_id = self._shared.next_id
        self._dead: BaseException | None = None
        # pipelined_init: the INIT leaves with the first requests and VERSION is read before
        # their answers (the server handles a session's packets in order), saving a round trip.
        self._init_due = pipelined_init
        self._version_due = False
        if not borrowed and not pipelined_init:
            self._handshake()

    @classmethod
    def open(
        cls,
        transport: paramiko.Transport,
        *,
        window_size: int | None = None,
        max_packet_size: int | None = None,
        **options: object,
    ) -> SftpPipeline:
        """Open a new session channel on ``transport`` and start the SFTP subsystem on it.

        Raises paramiko's ``ChannelException``/``SSHException`` if the server refuses the channel
        (``MaxSessions`` reached) so the caller can settle for fewer channels.
        """
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        channel = transport.open_session(
            window_size=window_size,
            max_packet_size=max_packet_size,
            timeout=timeout,  # type: ignore[arg-type]
        )
        options.setdefault("pipelined_init", speaks_openssh(transport))
        try:
            channel.settimeout(timeout)  # type: ignore[arg-type]
            channel.invoke_subsystem("sftp")
            return cls(channel, **options)  # type: ignore[arg-type]
        except BaseException:
            channel.close()
            raise

    @classmethod
    def borrow(cls, sftp_client: paramiko.SFTPClient, **options: object) -> SftpPipeline:
        """A pipeline over an idle paramiko ``SFTPClient``'s channel (see the class docstring).

        Every pipeline borrowed on one channel shares its request ids and the answers still
        due (detached CLOSEs, requests of a pipeline that died): a later one ignores those
        instead of taking them for a protocol error.
        """
        return cls(sftp_client.get_channel(), borrowed=True, **options)  # type: ignore[arg-type]

    @property
    def alive(self) -> bool:
        return self._dead is None and not self.channel.closed

    def close(self) -> None:
        """Close the channel (unless borrowed); a ``run`` in another thread then fails fast."""
        if self._dead is None:
            self._dead = ConnectionError("SFTP pipeline closed")
        if not self.borrowed:
            self.channel.close()

    # -- wire ----------------------------------------------------------------------------------

    def _handshake(self) -> None:
        self.channel.settimeout(self.timeout)
        self.channel.sendall(_INIT_PACKET)
        self._take_version()

    def _take_version(self) -> None:
        """Read and check the server's VERSION answer to our INIT."""
        ptype, body = self._read_packet()
        if ptype != FXP_VERSION:
            raise SftpProtocolError(f"server answered INIT with packet type {ptype}")
        reader = _Reader(body)
        self.server_version = reader.u32()
        if self.server_version < SFTP_VERSION:
            raise SftpProtocolError(f"server speaks SFTP version {self.server_version}, need 3")
        try:
            while True:
                name = reader.text()
                self.extensions[name] = reader.string()
        except SftpProtocolError:
            pass  # end of the extension list

    def _fill(self, need: int) -> None:
        """Receive until the buffer holds ``need`` bytes; raise on EOF or a silent server."""
        buffer = self._buffer
        while len(buffer) < need:
            try:
                data = self.channel.recv(_RECV_SIZE)
            except TimeoutError:
                raise TimeoutError(
                    f"the SFTP server sent nothing for {self.timeout} s; giving up on the "
                    "connection (raise the timeout for a slow link)"
                ) from None
            if not data:
                raise ConnectionError("the SFTP channel closed (connection dropped or server gone)")
            buffer += data

    def _read_packet(self) -> tuple[int, memoryview]:
        """One whole packet: (type, body after the type byte)."""
        self._fill(4)
        (size,) = _U32.unpack_from(self._buffer, 0)
        if size < 1 or size > _MAX_PACKET:
            raise SftpProtocolError(f"SFTP packet of {size} bytes; the stream is corrupt")
        self._fill(4 + size)
        with memoryview(self._buffer) as view:
            packet = bytes(view[: 4 + size])
        del self._buffer[: 4 + size]
        return packet[4], memoryview(packet)[5:]

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        feed: Callable[[], Operation | None] | None = None,
        ops: list[Operation] | tuple[Operation, ...] = (),
        *,
        max_open: int | None = None,
    ) -> None:
        """Drive ``ops`` and operations taken from ``feed`` until all are done.

        ``feed`` is called only when a request slot is free and the ops already started have
        nothing to send, so older operations finish first (priority order, bounded memory);
        it returns None when it has nothing more. At most ``max_open`` (default ``depth``)
        operations are open at once. If the channel dies, every open operation gets ``fail``
        and the error is raised; operations never started stay with the feed.
        """
        if self._dead is not None:
            raise ConnectionError(f"SFTP pipeline is dead: {self._dead}") from self._dead
        limit = max_open if max_open is not None else self.depth
        active: list[Operation] = list(ops)
        ready: collections.deque[Operation] = collections.deque(active)
        queued: set[int] = {id(op) for op in active}
        open_count = len(active)
        feed_empty = feed is None
        previous_timeout = self.channel.gettimeout() if self.borrowed else None
        if self.borrowed or self._init_due:
            self.channel.settimeout(self.timeout)
        pending = self._pending
        try:
            while True:
                out = bytearray()
                if self._init_due:
                    self._init_due = False
                    self._version_due = True
                    out += _INIT_PACKET
                while len(pending) < self.depth:
                    if ready:
                        op = ready[0]
                        request = None if op.done else op.next_request()
                        if request is None:
                            ready.popleft()
                            queued.discard(id(op))
                            if op.done:
                                open_count -= 1
                            continue
                        ptype, payload, handler = request
                        request_id = self._next_id
                        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
                        out += _HEADER.pack(len(payload) + 5, ptype, request_id)
                        out += payload
                        if handler is detached:
                            self._note_detached(request_id)
                        else:
                            pending[request_id] = (op, handler)
                        continue
                    if feed_empty or open_count >= limit:
                        break
                    new = feed() if feed is not None else None
                    if new is None:
                        feed_empty = True
                        break
                    active.append(new)
                    open_count += 1
                    ready.append(new)
                    queued.add(id(new))
                if out:
                    self.channel.sendall(bytes(out))
                if self._version_due:
                    self._version_due = False
                    self._take_version()
                if not pending:
                    if ready:
                        continue
                    return
                # Answer everything already received before sending again (fewer, larger sends).
                while True:
                    ptype, body = self._read_packet()
                    reader = _Reader(body)
                    request_id = reader.u32()
                    entry = pending.pop(request_id, None)
                    if entry is not None:
                        op, handler = entry
                        handler(ptype, reader)
                        if id(op) not in queued:
                            ready.append(op)
                            queued.add(id(op))
                    elif request_id in self._detached:
                        self._detached.discard(request_id)
                    else:
                        raise SftpProtocolError(f"answer to unknown SFTP request {request_id}")
                    if not pending or len(self._buffer) < 4:
                        break
                    (size,) = _U32.unpack_from(self._buffer, 0)
                    if len(self._buffer) < 4 + size:
                        break
                if len(active) > 4 * limit:
                    active = [op for op in active if not op.done]
        except BaseException as error:
            failure = self._die(error, active)
            channel_error = (OSError, EOFError, paramiko.SSHException)
            if failure is not error and isinstance(error, channel_error):
                raise failure from error  # one type for "the channel is gone"
            raise
        finally:
            if self._shared is not None:
                self._shared.next_id = self._next_id
            if self.borrowed and self._dead is None:
                self.channel.settimeout(previous_timeout)

    def _note_detached(self, request_id: int) -> None:
        detached_ids = self._detached
        if len(detached_ids) >= _MAX_DETACHED:
            # Answers someone else read (a borrowed channel's own client drops them as
            # unexpected): forget the oldest ids rather than grow without end.
            for old_id in sorted(detached_ids)[: _MAX_DETACHED // 2]:
                detached_ids.discard(old_id)
        detached_ids.add(request_id)

    def _die(self, error: BaseException, active: list[Operation]) -> BaseException:
        """The channel is unusable: fail every open operation with a connection error."""
        if isinstance(error, (TimeoutError, ConnectionError)):
            failure: BaseException = error
        elif isinstance(error, (OSError, EOFError, paramiko.SSHException)):
            failure = ConnectionError(f"SFTP channel failed: {error}")
        else:  # KeyboardInterrupt, a bug in a callback: report the channel as abandoned
            failure = ConnectionError(f"SFTP transfer interrupted ({type(error).__name__})")
        if self._dead is None:
            self._dead = failure
        if self.borrowed:
            # The channel lives on: answers still due must not look unknown to a successor.
            self._detached.update(self._pending)
        else:
            self._detached.clear()
        self._pending.clear()
        for op in active:
            if not op.done:
                try:
                    op.fail(failure)
                except Exception:  # a failing callback must not hide the channel error
                    logger.exception("callback failed while reporting a dead SFTP channel")
        if not self.borrowed:
            self.channel.close()
        else:
            logger.warning(
                "the borrowed SFTP channel failed mid-request (%s); its SFTPClient may be "
                "unusable now",
                failure,
            )
        return failure

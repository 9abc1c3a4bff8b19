"""SFTP operations: small state machines that produce the requests of one file or directory
and consume their answers, for :class:`~.sftp_pipeline.SftpPipeline` to drive.

An operation hands out requests (:meth:`Operation.next_request`) whenever the pipeline has room
and the answers it depends on are in; many operations are in flight on one channel at once.
Errors of one request (a STATUS answer) become Python exceptions for that operation only:
``FileNotFoundError``, ``PermissionError``, ``EOFError`` (end of file) or ``OSError``.
"""

from __future__ import annotations

import collections
import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from runicorn.transport.remote import ShrunkError
from runicorn.transport.sftp_protocol import (
    FX_EOF,
    FX_OK,
    FXF_READ,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_FSTAT,
    FXP_HANDLE,
    FXP_LSTAT,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READDIR,
    FXP_REALPATH,
    FXP_STAT,
    FXP_STATUS,
    U32,
    U64,
    Attrs,
    Reader,
    SftpProtocolError,
    encode_path,
    encode_string,
    expect_answer,
    status_error,
)

__all__ = [
    "DirEntry",
    "Handler",
    "ListDirOp",
    "LstatOp",
    "Operation",
    "ReadRangeOp",
    "RealPathOp",
    "Request",
    "detached",
]

Handler = Callable[[int, "Reader"], None]
Request = tuple[int, bytes, Handler]
_Answer = TypeVar("_Answer")


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

    def predict_handle(self, handle: bytes) -> None:
        """The OPEN this op just handed out should get ``handle`` (the pipeline's
        :class:`~.sftp_pipeline.HandleTable` says so): an op may send a READ on that guess
        right behind it. Ignoring it is always correct."""


def detached(ptype: int, body: Reader) -> None:
    """The handler of a request whose answer nobody waits for (a CLOSE of a read-only handle).

    The pipeline sends it like any other and drops its answer whenever it arrives, possibly
    during a later :meth:`SftpPipeline.run`; it never delays the end of a run. The server
    still receives and executes it, in order, before anything sent after it.
    """


class ReadRangeOp(Operation):
    """OPEN a file, READ bytes ``[offset, offset + length)`` in pipelined chunks, CLOSE it.

    Data reaches ``on_data(file_offset, bytes)`` in offset order whatever order the answers take.
    ``on_done(error, bytes_received)`` is called once, as soon as the outcome is known (before
    the CLOSE is answered). ``exact=True`` (fetch): an EOF before the end is a
    :class:`ShrunkError`. ``exact=False`` (read a prefix): EOF ends the range early without
    error. ``short_read_is_eof=True`` (an OpenSSH server, which answers a READ short only at
    the end of the file: :func:`.openssh_shortcuts.enabled`) lets a short last answer of a
    prefix end it too, so a small prefix costs exactly OPEN + READ + CLOSE; otherwise the rest
    is asked for until the server answers EOF.
    ``size_cap`` (read a whole file): also FSTAT, extend the range to the reported size and fail
    with ValueError if the file is larger than the cap. ``should_abort`` lets the owner stop the
    op (its consumer failed); an aborted op reports nothing more and just closes its handle.
    ``detach_close=True``: the op is done once its CLOSE is sent (see :func:`detached`), so a
    run ends one round trip earlier; a read-only handle has nothing left to lose by then.
    ``predicted_handle`` (a prefix that fits one READ, on an OpenSSH session where nothing else
    is open yet, with ``short_read_is_eof``): the READ and CLOSE go out right behind the OPEN,
    naming the handle the server is expected to return, so the whole read costs one round trip.
    Their answers are used only if the OPEN really returned that handle; otherwise they are
    dropped (they named no file or one that this op then reads again properly) and the op goes
    on as usual. Without it, the pipeline may still :meth:`predict_handle` (the READ alone
    leaves on the guess), unless ``guess_later`` is False: a READ on a guess for a file that
    is missing is a request spent for nothing.
    ``check`` is asked once the OPEN is answered, before any READ: an error it returns is the
    op's outcome (its handle is closed, nothing read). It lets checks that were sent on the
    same channel ahead of the OPEN, and so are answered before it, guard the file without a
    round trip of their own.
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
        short_read_is_eof: bool = False,
        size_cap: int | None = None,
        should_abort: Callable[[], bool] | None = None,
        display_path: str | None = None,
        detach_close: bool = False,
        predicted_handle: bytes | None = None,
        check: Callable[[], BaseException | None] | None = None,
        guess_later: bool = True,
    ) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length for {path!r}")
        if predicted_handle is not None and (
            exact
            or not short_read_is_eof
            or size_cap is not None
            or length > read_size
            or check is not None
        ):
            raise ValueError("a predicted handle is only for a prefix that fits one READ")
        self.path = path
        self._name = display_path if display_path is not None else path
        self._start = offset
        self._end = offset + length
        self._read_size = read_size
        self._on_data = on_data
        self._on_done: Callable[[BaseException | None, int], None] | None = on_done
        self._exact = exact
        self._short_read_is_eof = short_read_is_eof and not exact
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
        self._guess_close = predicted_handle is not None  # the guess sends the CLOSE too
        self._guess_later = guess_later
        self._guess_size = 0
        self._check = check
        # guess: 0 none, 1 READ to send, 2 CLOSE to send, 3 answers due, 4 settled
        self._guess_state = 0
        self._guess_read: tuple[int, Reader] | None = None
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
            payload = encode_path(self.path) + U32.pack(FXF_READ) + U32.pack(0)
            return FXP_OPEN, payload, self._on_open
        if self._guess_state in (1, 2) and self._predicted is not None:
            guessed = encode_string(self._predicted)
            if self._guess_state == 1:
                self._guess_state = 2 if self._guess_close else 3
                self._guess_size = min(self._read_size, self._end - self._start)
                payload = guessed + U64.pack(self._start) + U32.pack(self._guess_size)
                return FXP_READ, payload, self._on_guessed_read
            self._guess_state = 3
            return FXP_CLOSE, guessed, self._on_guessed_close
        if self._guess_state == 3 or self._handle is None or self._closing:
            return None
        handle = encode_string(self._handle)
        if self._check is not None and not self._finished:
            error = self._checked(None)
            if error is not None:
                self._finish(error)
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

    def predict_handle(self, handle: bytes) -> None:
        """The first READ leaves right behind the OPEN, naming ``handle``; its answer is used
        only if the OPEN returns that handle (else it named no file of this op's, or another
        file, whose bytes are dropped) and ``check`` passes. No CLOSE goes out on a guess: a
        wrong one could close another file's handle."""
        if (
            self._guess_later
            and self._guess_state == 0
            and self._predicted is None
            and self._size_cap is None
            and self._stat_state == 0
            and self._end > self._start
            and not self._open_answered
        ):
            self._predicted = handle
            self._guess_state = 1

    def _read(self, handle: bytes, start: int, size: int) -> Request:
        self._reads_in_flight += 1

        def handler(ptype: int, body: Reader) -> None:
            self._on_read(ptype, body, start, size)

        return FXP_READ, handle + U64.pack(start) + U32.pack(size), handler

    # answers -------------------------------------------------------------------------------

    def _on_open(self, ptype: int, body: Reader) -> None:
        self._open_answered = True
        if self._guess_state in (1, 2):
            self._guess_state = 0  # answered before the guess left (depth was full): no guess
        try:
            expect_answer(ptype, body, FXP_HANDLE, self._name)
            self._handle = body.string()
        except (OSError, EOFError) as error:
            if isinstance(error, SftpProtocolError):
                raise
            self.done = self._guess_state == 0  # else the guessed answers are still due
            self._finish(self._checked(error))
        self._settle_guess()

    def _checked(self, error: BaseException | None) -> BaseException | None:
        """The ``check``'s error if it has one (asked once), else ``error``."""
        check, self._check = self._check, None
        found = check() if check is not None else None
        return found if found is not None else error

    def _on_guessed_read(self, ptype: int, body: Reader) -> None:
        self._guess_read = (ptype, body)
        self._settle_guess()

    def _on_guessed_close(self, ptype: int, body: Reader) -> None:
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
            # OPEN failed, or another handle: the guessed requests named no file of ours.
            if self._handle is None and not self._guess_close:
                self.done = True  # no CLOSE of a guess is due
            return
        self._guess_matched = True
        size = self._guess_size
        if not self._guess_close:
            error = self._checked(None) if self._check is not None else None
            if error is not None:
                self._finish(error)
            self._next = self._start + size
            self._reads_in_flight += 1
            self._on_read(ptype, body, self._start, size)
            return
        self._closing = True  # the guessed CLOSE is this file's
        self._next = self._end
        self._reads_in_flight += 1
        self._on_read(ptype, body, self._start, size)
        self._finish(None)  # one READ covered the prefix (or it failed, reported already)

    def _on_fstat(self, ptype: int, body: Reader) -> None:
        self._stat_state = 0
        if self._finished:
            return
        try:
            expect_answer(ptype, body, FXP_ATTRS, self._name)
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

    def _on_read(self, ptype: int, body: Reader, start: int, size: int) -> None:
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
            if self._short_read_is_eof and start + size >= self._end and not self._retries:
                # Short last read of a prefix on OpenSSH: the end of the file, so no extra
                # request is spent to confirm it.
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

    def _on_close(self, ptype: int, body: Reader) -> None:
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
            return FXP_OPENDIR, encode_path(self.path), self._on_opendir
        if self._handle is None or self._waiting or self._closing:
            return None
        self._waiting = True
        if not self._finished:
            return FXP_READDIR, encode_string(self._handle), self._on_readdir
        self._closing = True
        if self._detach_close:
            self._waiting = False
            self.done = True
            return FXP_CLOSE, encode_string(self._handle), detached
        return FXP_CLOSE, encode_string(self._handle), self._on_close

    def _on_opendir(self, ptype: int, body: Reader) -> None:
        try:
            expect_answer(ptype, body, FXP_HANDLE, self._name)
            self._handle = body.string()
        except SftpProtocolError:
            raise
        except (OSError, EOFError) as error:
            self.done = True
            self._finish(None, error)

    def _on_readdir(self, ptype: int, body: Reader) -> None:
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

    def _on_close(self, ptype: int, body: Reader) -> None:
        self._waiting = False
        self.done = True


class _OneAnswerOp(Operation, Generic[_Answer]):
    """One request, one answer: ``on_done(value or None, error)`` once, the value what
    :meth:`_parse` reads from the answer; a protocol error (an answer of the wrong type)
    ends the channel instead."""

    def __init__(
        self,
        request: tuple[int, bytes],
        display_path: str,
        on_done: Callable[[_Answer | None, BaseException | None], None],
    ) -> None:
        self._request = request
        self.display_path = display_path
        self._on_done = on_done
        self._sent = False

    def next_request(self) -> Request | None:
        if self._sent:
            return None
        self._sent = True
        return self._request[0], self._request[1], self._on_answer

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._on_done(None, error)

    def _parse(self, ptype: int, body: Reader) -> _Answer:
        raise NotImplementedError

    def _on_answer(self, ptype: int, body: Reader) -> None:
        self.done = True
        try:
            value = self._parse(ptype, body)
        except SftpProtocolError:
            raise
        except (OSError, EOFError) as error:
            self._on_done(None, error)
            return
        self._on_done(value, None)


class RealPathOp(_OneAnswerOp[str]):
    """REALPATH: the server's absolute, canonical form of ``path`` (``.``: the login directory).

    ``on_done(path or None, error)`` once.
    """

    def __init__(self, path: str, on_done: Callable[[str | None, BaseException | None], None]):
        super().__init__((FXP_REALPATH, encode_path(path)), path, on_done)
        self.path = path

    def _parse(self, ptype: int, body: Reader) -> str:
        expect_answer(ptype, body, FXP_NAME, self.path)
        if body.u32() != 1:
            raise SftpProtocolError(f"REALPATH of {self.path!r} did not return one name")
        return body.text()


class LstatOp(_OneAnswerOp[Attrs]):
    """LSTAT: the attributes of ``path`` itself (a symbolic link is reported, not followed);
    with ``follow``, STAT: those of what a link points to.

    ``on_done(attrs or None, error)`` once; ``display_path`` names the path in errors.
    """

    def __init__(
        self,
        path: str,
        on_done: Callable[[Attrs | None, BaseException | None], None],
        *,
        display_path: str | None = None,
        follow: bool = False,
    ) -> None:
        super().__init__(
            (FXP_STAT if follow else FXP_LSTAT, encode_path(path)),
            display_path if display_path is not None else path,
            on_done,
        )
        self.path = path

    def _parse(self, ptype: int, body: Reader) -> Attrs:
        expect_answer(ptype, body, FXP_ATTRS, self.display_path)
        return body.attrs()

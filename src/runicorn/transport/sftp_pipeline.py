"""The SFTP engine: one thread drives one SSH channel with many requests in flight.

Why it exists: paramiko's ``SFTPClient`` waits for each OPEN and each 32 KiB READ before it sends
the next request, so a sync over a 50 ms link spends its time waiting, not transferring. Here one
thread writes up to ``depth`` requests (OPEN, READ, CLOSE, READDIR … of many files at once)
before it reads the answers, matches each answer to its request by id, and sends follow-up
requests as answers arrive. The requests come from operations (:mod:`.sftp_ops`);
:meth:`SftpPipeline.run` takes them from a feed until the feed and the operations are
exhausted. A pipeline is not thread-safe: only the thread inside :meth:`~SftpPipeline.run` may
touch it, except :meth:`~SftpPipeline.close`, which any thread may call to make ``run`` fail fast.
Such a close is carried out by the thread in ``run``, between its own sends: OpenSSH drops the
whole connection when data arrives for a channel it has already freed, and paramiko sends a
message outside the lock under which it checked that the channel was open, so a close from
another thread could overtake a request on its way out.

Errors of the channel (closed, dropped connection, no answer within ``timeout``) fail every
operation that is still open with ``ConnectionError`` or ``TimeoutError`` and mark the pipeline
dead. :func:`open_sftp_client` opens the user's paramiko session, in one round trip fewer on an
OpenSSH server (see :mod:`.openssh_shortcuts`).
"""

from __future__ import annotations

import collections
import logging
import posixpath
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paramiko

from runicorn.transport import openssh_shortcuts
from runicorn.transport.polled_send import poll_seconds, send_all
from runicorn.transport.sftp_ops import (
    Handler,
    LstatOp,
    Operation,
    ReadRangeOp,
    RealPathOp,
    detached,
)
from runicorn.transport.sftp_protocol import (
    FX_OK,
    FXP_CLOSE,
    FXP_HANDLE,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_STATUS,
    FXP_VERSION,
    HEADER,
    INIT_PACKET,
    MAX_PACKET,
    SFTP_VERSION,
    U32,
    Attrs,
    Reader,
    SftpProtocolError,
)

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_READ_SIZE",
    "DEFAULT_TIMEOUT",
    "MAX_READ_SIZE",
    "HandleTable",
    "SftpPipeline",
    "open_sftp_client",
    "stamp_of",
]

logger = logging.getLogger(__name__)

# Chosen by benchmarks/bench_transfer.py: at 50 ms RTT depth 64 reaches the link's limit, and
# OpenSSH's own client uses 64; more only adds memory.
DEFAULT_DEPTH = 64
# OpenSSH's sftp-server answers at most 255 KiB per READ (SFTP_MAX_READ_LENGTH); asking for that
# much cuts per-request overhead eightfold compared with paramiko's 32 KiB. A server that
# answers less is read on from where its answer ended.
MAX_READ_SIZE = 255 * 1024
DEFAULT_READ_SIZE = MAX_READ_SIZE
DEFAULT_TIMEOUT = 30.0

_RECV_SIZE = 1024 * 1024
_MAX_DETACHED = 4096


_MAX_UNANSWERED = 4096


class HandleTable:
    """OpenSSH's sftp-server handle table as one session's requests leave it, so the handle
    an OPEN will get is known when the OPEN is sent (its first READ can go right behind it).

    The server keeps the free slots of its table on a stack (``handle_new`` and
    ``handle_unused`` in sftp-server.c): an OPEN or OPENDIR takes the slot freed last, or a
    new one after the highest; a CLOSE frees its slot; a failed OPEN takes none. A handle is
    the slot's index as four bytes. Two copies are kept: the table as the answers read so
    far left it (the server answers a session's requests in order), and the same with every
    request still unanswered applied as if it succeeded -- the prediction. An answer that
    differs from what was assumed (an OPEN that failed) rebuilds the prediction from the
    first; one that makes no sense for the table (someone else's requests on the channel)
    stops the predictions for the session. A wrong prediction costs a round trip, never a
    wrong byte: only READs are sent on a guess, and their answers are used only when the
    OPEN returned the guessed handle (:meth:`.sftp_ops.ReadRangeOp.predict_handle`).
    """

    def __init__(self) -> None:
        self.broken = False
        self._free: list[int] = []  # answered state: the stack of free slots
        self._size = 0  # answered state: slots in the table
        self._guess_free: list[int] = []  # predicted state
        self._guess_size = 0
        # request id -> [FXP_OPEN, predicted slot] or [FXP_CLOSE, slot named (None: not a
        # handle of this table), 1 if it is assumed to succeed else 0]
        self._unanswered: dict[int, list[int | None]] = {}

    def sent_open(self, request_id: int) -> bytes | None:
        """An OPEN or OPENDIR left with ``request_id``: the handle it should get."""
        if self.broken:
            return None
        slot = self._take(self._guess_free, self._guess_size)
        if slot == self._guess_size:
            self._guess_size += 1
        self._note(request_id, [FXP_OPEN, slot])
        return slot.to_bytes(4, "big")

    def sent_close(self, request_id: int, payload: bytes) -> None:
        """A CLOSE left with ``request_id`` (``payload``: the handle as an SFTP string)."""
        if self.broken:
            return
        slot = _slot_of(payload[4:]) if payload[:4] == b"\x00\x00\x00\x04" else None
        # Not open as far as the table knows: it will fail, freeing nothing.
        assumed = slot is not None and _in_use(slot, self._guess_free, self._guess_size)
        if assumed:
            assert slot is not None
            self._guess_free.append(slot)
        self._note(request_id, [FXP_CLOSE, slot, int(assumed)])

    def answered(self, request_id: int, ptype: int, body: memoryview) -> None:
        """The answer to ``request_id`` arrived (``body``: after the type byte, id first)."""
        entry = self._unanswered.pop(request_id, None)
        if entry is None or self.broken:
            return
        if entry[0] == FXP_OPEN:
            assumed = entry[1]
            slot = None
            if ptype == FXP_HANDLE and len(body) == 12 and bytes(body[4:8]) == b"\x00\x00\x00\x04":
                slot = _slot_of(bytes(body[8:12]))
            elif ptype != FXP_STATUS:
                self._break()
                return
            if slot is not None:
                if self._free and self._free[-1] == slot:
                    self._free.pop()
                elif not self._free and slot == self._size:
                    self._size += 1
                else:
                    self._break()
                    return
            if slot != assumed:
                self._rebuild()
            return
        slot, closes = entry[1], entry[2]
        ok = ptype == FXP_STATUS and len(body) >= 8 and int.from_bytes(body[4:8], "big") == FX_OK
        if ok:
            if slot is None or not _in_use(slot, self._free, self._size):
                self._break()  # it closed a handle the table did not know was open
                return
            self._free.append(slot)
        if ok != bool(closes):
            self._rebuild()

    def forget(self) -> None:
        """The channel failed mid-request: what the server did is unknown from here."""
        self._break()

    def _note(self, request_id: int, entry: list[int | None]) -> None:
        if len(self._unanswered) >= _MAX_UNANSWERED:
            self._break()  # answers someone else read: the table can no longer follow
            return
        self._unanswered[request_id] = entry

    def _break(self) -> None:
        self.broken = True
        self._unanswered.clear()

    def _rebuild(self) -> None:
        """The prediction again: the answered state, then every unanswered request."""
        free, size = list(self._free), self._size
        for entry in self._unanswered.values():
            if entry[0] == FXP_OPEN:
                slot = self._take(free, size)
                if slot == size:
                    size += 1
                entry[1] = slot
            else:
                closed = entry[1]
                entry[2] = int(closed is not None and _in_use(closed, free, size))
                if closed is not None and entry[2]:
                    free.append(closed)
        self._guess_free, self._guess_size = free, size

    @staticmethod
    def _take(free: list[int], size: int) -> int:
        return free.pop() if free else size


def _slot_of(handle: bytes) -> int | None:
    return int.from_bytes(handle, "big") if len(handle) == 4 else None


def _in_use(slot: int, free: list[int], size: int) -> bool:
    return slot < size and slot not in free


@dataclass(eq=False)
class _BorrowedState:
    """What the pipelines borrowed on one channel, one after another, share."""

    next_id: int = 0x70000000  # far above paramiko's own request ids
    detached: set[int] = field(default_factory=set)
    handles: HandleTable | None = None


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
        predict_handles: bool = False,
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        if not 1 <= read_size <= MAX_PACKET - 1024:
            raise ValueError(f"read_size must be between 1 and {MAX_PACKET - 1024}")
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
        # Only a pipeline that starts the session knows its handle table is empty.
        fresh = pipelined_init or not borrowed
        self._handles = HandleTable() if predict_handles and fresh else None
        if borrowed:
            self._shared = _BORROWED.get(channel)
            if self._shared is None:
                self._shared = _BorrowedState()
                _BORROWED[channel] = self._shared
            self._detached = self._shared.detached
            self._next_id = self._shared.next_id
            if self._handles is not None:
                self._shared.handles = self._handles
            else:
                self._handles = self._shared.handles
        self._dead: BaseException | None = None
        # close() from another thread while run() drives the channel: run closes it (see the
        # module docstring). Guarded by _state_lock together with _running.
        self._state_lock = threading.Lock()
        self._running = False
        self._close_asked = False
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
        shortcuts = openssh_shortcuts.enabled(transport)
        options.setdefault("pipelined_init", shortcuts)
        options.setdefault("predict_handles", shortcuts)
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
        """Close the channel (unless borrowed); any thread. A ``run`` in another thread stops
        within a poll (`POLL_SECONDS`) and closes the channel itself, after its last send."""
        with self._state_lock:
            if self._dead is None:
                self._dead = ConnectionError("SFTP pipeline closed")
            if self.borrowed:
                return
            self._close_asked = True
            if self._running:
                return
        self.channel.close()

    def _stop_if_asked(self) -> None:
        if self._close_asked:
            raise ConnectionError("SFTP pipeline closed")

    def _waited(self, since: float, what: str) -> None:
        """A poll of the channel timed out: stop if a close was asked, raise TimeoutError once
        ``timeout`` seconds passed ``since`` (without progress), else let the caller poll on."""
        self._stop_if_asked()
        if self.timeout is not None and time.monotonic() - since >= self.timeout:
            raise TimeoutError(
                f"the SFTP server {what} for {self.timeout} s; giving up on the connection "
                "(raise the timeout for a slow link)"
            )

    # -- wire ----------------------------------------------------------------------------------

    def _handshake(self) -> None:
        self.channel.settimeout(self._poll_seconds())
        self._send(INIT_PACKET)
        self._take_version()

    def _poll_seconds(self) -> float:
        return poll_seconds(self.timeout)

    def _send(self, data: bytes) -> None:
        """Send all of ``data`` (the channel's timeout is a poll: see :meth:`_waited`)."""
        send_all(
            self.channel,
            data,
            stop_if_asked=self._stop_if_asked,
            waited=self._waited,
            ended=lambda: ConnectionError(
                "the SFTP channel closed (connection dropped or server gone)"
            ),
        )

    def _take_version(self) -> None:
        """Read and check the server's VERSION answer to our INIT."""
        ptype, body = self._read_packet()
        if ptype != FXP_VERSION:
            raise SftpProtocolError(f"server answered INIT with packet type {ptype}")
        reader = Reader(body)
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
        since = time.monotonic()
        while len(buffer) < need:
            self._stop_if_asked()
            try:
                data = self.channel.recv(_RECV_SIZE)
            except TimeoutError:
                self._waited(since, "sent nothing")
                continue
            if not data:
                raise ConnectionError("the SFTP channel closed (connection dropped or server gone)")
            buffer += data
            since = time.monotonic()

    def _read_packet(self) -> tuple[int, memoryview]:
        """One whole packet: (type, body after the type byte)."""
        self._fill(4)
        (size,) = U32.unpack_from(self._buffer, 0)
        if size < 1 or size > MAX_PACKET:
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
        with self._state_lock:
            if self._dead is not None:
                raise ConnectionError(f"SFTP pipeline is dead: {self._dead}") from self._dead
            self._running = True
        limit = max_open if max_open is not None else self.depth
        active: list[Operation] = list(ops)
        ready: collections.deque[Operation] = collections.deque(active)
        queued: set[int] = {id(op) for op in active}
        open_count = len(active)
        feed_empty = feed is None
        previous_timeout = self.channel.gettimeout() if self.borrowed else None
        self.channel.settimeout(self._poll_seconds())
        pending = self._pending
        handles = self._handles
        try:
            while True:
                out = bytearray()
                if self._init_due:
                    self._init_due = False
                    self._version_due = True
                    out += INIT_PACKET
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
                        out += HEADER.pack(len(payload) + 5, ptype, request_id)
                        out += payload
                        if handles is not None and not handles.broken:
                            if ptype == FXP_CLOSE:
                                handles.sent_close(request_id, payload)
                            elif ptype in (FXP_OPEN, FXP_OPENDIR):
                                guess = handles.sent_open(request_id)
                                if guess is not None:
                                    op.predict_handle(guess)
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
                    self._send(bytes(out))
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
                    reader = Reader(body)
                    request_id = reader.u32()
                    if handles is not None:
                        handles.answered(request_id, ptype, body)
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
                    (size,) = U32.unpack_from(self._buffer, 0)
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
            if self.borrowed:  # the owner's timeout, not our poll, even after a failure
                self.channel.settimeout(previous_timeout)
            with self._state_lock:
                self._running = False
                close_now = self._close_asked
            if close_now:
                self.channel.close()  # asked from another thread while this one could send

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
        if self._handles is not None:
            self._handles.forget()
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
                "the SFTP session failed in the middle of a request (%s); the connection is "
                "probably lost: open a new one before using this session again",
                failure,
            )
        return failure


def open_sftp_client(
    transport: paramiko.Transport,
    *,
    window_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    root: str | None = None,
    prefetch: Sequence[str] = (),
    prefetch_bytes: int = MAX_READ_SIZE,
    prestat: Sequence[str] = (),
) -> paramiko.SFTPClient:
    """An SFTP session on a new channel of ``transport``: a paramiko ``SFTPClient``.

    Plain, that is three round trips: channel open, subsystem request, INIT. On OpenSSH the
    subsystem request leaves with the channel open on a connection's first channel
    (:meth:`.openssh_shortcuts.ClientTransport.open_subsystem`); sshd opens a session channel
    with a zero window until the subsystem runs, so the INIT must wait for that answer. With
    ``root`` (relative: to the login directory) and ``prefetch`` (paths relative to it) on
    an OpenSSH server, the INIT leaves together with a REALPATH of a relative root and the
    reads of the first ``prefetch_bytes`` of each path -- the first one with its handle
    guessed (:data:`~.openssh_shortcuts.OPENSSH_FIRST_HANDLE`), so it costs no round trip of
    its own -- and a STAT of each path of ``prestat`` (their size and mtime, sent before the
    reads).
    The session is then a :class:`~.openssh_shortcuts.PrefetchingSFTPClient`: the whole
    no-change check of a sync is the second round trip. :func:`.openssh_shortcuts.enabled`
    decides whether the server gets this; otherwise the session is paramiko's own.
    """
    if isinstance(transport, openssh_shortcuts.ClientTransport):
        channel = transport.open_subsystem("sftp", window_size=window_size, timeout=timeout)
    else:
        channel = transport.open_session(window_size=window_size, timeout=timeout)
        try:
            channel.invoke_subsystem("sftp")
        except BaseException:
            channel.close()
            raise
    try:
        channel.settimeout(timeout)
        if root is None or not openssh_shortcuts.enabled(transport):
            return paramiko.SFTPClient(channel)
        return _first_round_trip(channel, root, prefetch, prefetch_bytes, timeout, prestat)
    except BaseException:
        channel.close()
        raise


def _first_round_trip(
    channel: paramiko.Channel,
    root: str,
    prefetch: Sequence[str],
    length: int,
    timeout: float | None,
    prestat: Sequence[str] = (),
) -> openssh_shortcuts.PrefetchingSFTPClient:
    """INIT, REALPATH (relative root only), the STATs and the prefetch reads, pipelined; see
    above."""
    if not 0 <= length <= MAX_READ_SIZE:
        raise ValueError(f"prefetch_bytes must be between 0 and {MAX_READ_SIZE}")
    pipe = SftpPipeline(
        channel, timeout=timeout, borrowed=True, pipelined_init=True, predict_handles=True
    )
    resolved: list[tuple[str | None, BaseException | None]] = []
    results: dict[str, bytes | BaseException] = {}
    pieces: dict[str, list[bytes]] = {path: [] for path in prefetch}
    first_handle = openssh_shortcuts.OPENSSH_FIRST_HANDLE
    ops: list[Operation] = []
    absolute = root.startswith("/")
    if not absolute:
        ops.append(RealPathOp(root or ".", lambda path, error: resolved.append((path, error))))
    stamps: dict[str, tuple[int, int] | BaseException] = {}
    for path in prestat:

        def on_attrs(attrs: Attrs | None, error: BaseException | None, path: str = path) -> None:
            stamps[path] = error if error is not None else stamp_of(attrs, path)

        full = posixpath.join(root, path) if root else path
        ops.append(LstatOp(full, on_attrs, display_path=path, follow=True))
    for index, path in enumerate(prefetch):

        def on_data(_offset: int, data: bytes, path: str = path) -> None:
            pieces[path].append(data)

        def on_done(error: BaseException | None, _received: int, path: str = path) -> None:
            results[path] = error if error is not None else b"".join(pieces[path])

        ops.append(
            ReadRangeOp(
                posixpath.join(root, path) if root else path,
                0,
                length,
                max(length, 1),
                on_data,
                on_done,
                exact=False,
                display_path=path,
                short_read_is_eof=True,
                predicted_handle=first_handle if index == 0 and length else None,
                # A no-change check costs its four requests even when a manifest is missing.
                guess_later=False,
            )
        )
    pipe.run(ops=ops)
    resolved_root = root
    if not absolute:
        real, error = resolved[0]
        if error is not None:
            raise error
        assert real is not None
        resolved_root = real
    assert pipe.server_version is not None
    prefetched = openssh_shortcuts.Prefetched(resolved_root, length, results, stamps)
    return openssh_shortcuts.PrefetchingSFTPClient(
        channel, pipe.server_version, resolved_root, prefetched
    )


def stamp_of(attrs: Attrs | None, path: str) -> tuple[int, int] | BaseException:
    """``(size, mtime)`` from a STAT answer, or why it cannot say."""
    if attrs is None or attrs.size is None or attrs.mtime is None or attrs.is_dir:
        return OSError(f"{path}: the server reported no size and mtime of a file")
    return attrs.size, attrs.mtime

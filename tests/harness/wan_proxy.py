"""A loopback TCP proxy that behaves like a WAN link: one-way delay, a bandwidth cap, and faults.

Why it exists: the kernel on the test machines has no ``netem`` qdisc, yet the sync client has to be
measured (issue 3, WAN benchmark) and broken (issue 5, network faults) over a link that behaves like
a real one. This proxy sits between a client and a server on 127.0.0.1 and models each direction as
a wire:

* a chunk that arrives at the proxy waits for the wire to be free, occupies it for
  ``n * 8 / bandwidth_bps`` seconds (serialization; queueing adds up as on a router), then spends
  ``delay_ms`` in flight before it is delivered. Delay is pipelined: many chunks are in flight at
  once, so a bulk transfer fills the link as it would over a real long fat pipe;
* each direction's wire is shared by every connection through the proxy, like one physical link;
* data is forwarded in order; EOF (half-close) and resets travel through the same queue, so a
  FIN never overtakes the data sent before it.

Fault switches for reliability tests: :meth:`WanProxy.cut_after_bytes` (the link dies after N more
bytes, every connection is reset), :meth:`WanProxy.stall` / :meth:`WanProxy.resume` (connections
stay open but nothing is delivered) and :meth:`WanProxy.close_all`.

The proxy runs an asyncio event loop in one daemon thread; :meth:`WanProxy.stop` ends the loop and
joins the thread, so nothing outlives it. It never prints; it logs under ``runicorn``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Literal, TypeVar

try:  # Linux: lets a cut wait until the bytes it promised have left the kernel.
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - non-Linux fallback
    fcntl = None  # type: ignore[assignment]
    _TIOCOUTQ = None

__all__ = ["Direction", "WanProxy"]

_LOG = logging.getLogger(__name__)

Direction = Literal["down", "up", "both"]
_T = TypeVar("_T")

_READ_SIZE = 64 * 1024
# Large reads are split so that the first bytes of a chunk are not held back by the serialization
# time of the whole chunk (a real link delivers packet by packet).
_SEGMENT = 16 * 1024
_WRITE_BATCH = 256 * 1024
_DEFAULT_BUFFER_CAPPED = 1024 * 1024
_DEFAULT_BUFFER_UNCAPPED = 16 * 1024 * 1024
_CONNECT_TIMEOUT = 10.0
_FLUSH_TIMEOUT = 2.0
_CONTROL_TIMEOUT = 10.0
_JOIN_TIMEOUT = 10.0

_DATA, _EOF, _RESET = 0, 1, 2


def _resolve_loopback(host: str) -> str:
    """Return the numeric address for ``host``; refuse anything that is not loopback.

    Why: a test proxy must never expose a port beyond this machine, and a numeric address keeps
    asyncio from spawning a resolver thread.
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        addr = str(sockaddr[0])
        if ipaddress.ip_address(addr).is_loopback:
            return addr
    raise ValueError(f"{host!r} is not a loopback address; the proxy listens on loopback only")


def _resolve(host: str) -> str:
    """Resolve ``host`` once up front so no resolver thread is needed inside the loop."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


def _unsent_bytes(sock: socket.socket | None) -> int:
    """Bytes still in the kernel send queue (0 when that cannot be asked)."""
    if sock is None or fcntl is None or _TIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, struct.pack("i", 0))
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _rst_close(sock: socket.socket) -> None:
    """Close a raw socket with RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _hard_close(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees a reset, as after a real network failure."""
    transport = writer.transport
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Link:
    """One direction of the emulated wire, shared by all connections like a physical link."""

    def __init__(self, delay_s: float, bandwidth_bps: float | None) -> None:
        self.delay_s = delay_s
        self.bandwidth_bps = bandwidth_bps
        self.free_at = 0.0

    def schedule(self, now: float, nbytes: int) -> float:
        """Return when ``nbytes`` arriving at ``now`` reach the far end (queue + wire + flight)."""
        if not self.bandwidth_bps:
            return now + self.delay_s
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8.0 / self.bandwidth_bps
        return self.free_at + self.delay_s


class _Pipe:
    """Moves one direction of one connection through its link, in order, with backpressure."""

    def __init__(
        self,
        conn: _Conn,
        direction: Literal["down", "up"],
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        link: _Link,
        limit: int,
    ) -> None:
        self.conn = conn
        self.direction: Literal["down", "up"] = direction
        self.src = src
        self.dst = dst
        self.link = link
        self.limit = limit
        self.queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
        self.queued = 0
        self.last_at = 0.0
        self.have_items = asyncio.Event()
        self.have_space = asyncio.Event()
        self.have_space.set()

    def _push(self, at: float, kind: int, data: bytes) -> None:
        at = max(at, self.last_at)  # never let anything overtake what was queued before it
        self.last_at = at
        self.queue.append((at, kind, data))
        self.queued += len(data)
        self.have_items.set()

    async def pump_in(self) -> None:
        """Read from the source as long as the buffer has room; stamp each chunk's delivery."""
        loop = asyncio.get_running_loop()
        while True:
            while self.queued >= self.limit:
                self.have_space.clear()
                await self.have_space.wait()
            try:
                data = await self.src.read(_READ_SIZE)
            except (ConnectionError, OSError):
                self._push(self.link.schedule(loop.time(), 0), _RESET, b"")
                return
            now = loop.time()
            if not data:
                self._push(self.link.schedule(now, 0), _EOF, b"")
                return
            if len(data) <= _SEGMENT:
                self._push(self.link.schedule(now, len(data)), _DATA, data)
                continue
            view = memoryview(data)
            for i in range(0, len(data), _SEGMENT):
                seg = bytes(view[i : i + _SEGMENT])
                self._push(self.link.schedule(now, len(seg)), _DATA, seg)

    async def pump_out(self) -> None:
        """Deliver queued chunks once their time has come, unless the proxy is stalled."""
        try:
            await self._pump_out()
        except (ConnectionError, OSError) as exc:
            _LOG.debug("wan proxy: %s write failed: %s", self.direction, exc)
            self.conn.abort()

    async def _pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.conn.proxy
        while True:
            if not self.queue:
                self.have_items.clear()
                await self.have_items.wait()
                continue
            wait = self.queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if proxy._stalled and proxy._flowing is not None:
                await proxy._flowing.wait()
                continue
            now = loop.time()
            parts: list[bytes] = []
            size = 0
            marker = _DATA
            while self.queue and self.queue[0][0] <= now and size < _WRITE_BATCH:
                _, kind, data = self.queue[0]
                if kind != _DATA:
                    if not parts:
                        self.queue.popleft()
                        marker = kind
                    break
                self.queue.popleft()
                parts.append(data)
                size += len(data)
            if marker == _EOF:
                if self.dst.can_write_eof() and not self.dst.transport.is_closing():
                    self.dst.write_eof()
                return
            if marker == _RESET:
                self.conn.abort()
                return
            if not parts:
                continue
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            allowed, cut = proxy._take_budget(self.direction, len(payload))
            if allowed:
                # count first: a reader in another thread may look right after it receives
                proxy._count(self.direction, allowed)
                self.dst.write(payload if allowed == len(payload) else payload[:allowed])
            self.queued -= size
            if self.queued < self.limit:
                self.have_space.set()
            if cut:
                await self._flush()
                proxy._fire_cut()
                return
            await self.dst.drain()

    async def _flush(self) -> None:
        """Wait (bounded) until the promised bytes left our socket, so a RST cannot eat them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_TIMEOUT
        transport = self.dst.transport
        sock = self.dst.get_extra_info("socket")
        while loop.time() < deadline and not transport.is_closing():
            if transport.get_write_buffer_size() == 0 and _unsent_bytes(sock) == 0:
                return
            await asyncio.sleep(0.001)


class _Conn:
    """One proxied TCP connection: a client side, a server side and two pipes."""

    def __init__(
        self, proxy: WanProxy, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_r = client_r
        self.client_w = client_w
        self.server_w: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.aborted = False

    async def run(self) -> None:
        proxy = self.proxy
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(proxy._target_addr, proxy.target_port),
                _CONNECT_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            _LOG.warning("wan proxy: cannot reach target port %d: %s", proxy.target_port, exc)
            _hard_close(self.client_w)
            return
        self.server_w = server_w
        proxy._transports.add(server_w.transport)
        if self.aborted:  # close_all() or stop() raced with the connect
            _hard_close(server_w)
            return
        for w in (self.client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Pipe(self, "up", self.client_r, server_w, proxy._links["up"], proxy._buffer_limit)
        down = _Pipe(
            self, "down", server_r, self.client_w, proxy._links["down"], proxy._buffer_limit
        )
        self.tasks = [
            asyncio.create_task(up.pump_in()),
            asyncio.create_task(up.pump_out()),
            asyncio.create_task(down.pump_in()),
            asyncio.create_task(down.pump_out()),
        ]
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            if not self.aborted:
                self.client_w.close()
                server_w.close()

    def abort(self) -> None:
        """Reset both sides now and stop the pipes (data still queued is dropped, as on a cut)."""
        if self.aborted:
            return
        self.aborted = True
        _hard_close(self.client_w)
        if self.server_w is not None:
            _hard_close(self.server_w)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class WanProxy:
    """A TCP proxy on loopback that adds one-way delay and a bandwidth cap, with fault switches.

    ``delay_ms`` is applied in each direction, so a round trip gains ``2 * delay_ms``.
    ``bandwidth_bps`` caps each direction (bits per second, shared by all connections).
    ``buffer_bytes`` is how much a direction may hold beyond what is in flight on the wire (a
    router queue plus socket buffers); the bandwidth-delay product is always added on top so a
    bulk transfer can fill the link. ``WanProxy(port)`` is accepted as shorthand for the target.
    """

    def __init__(
        self,
        target_host: str | int = "127.0.0.1",
        target_port: int | None = None,
        *,
        delay_ms: float = 0.0,
        bandwidth_bps: float | None = None,
        listen_host: str = "127.0.0.1",
        buffer_bytes: int | None = None,
    ) -> None:
        if isinstance(target_host, int) and target_port is None:
            target_host, target_port = "127.0.0.1", target_host
        if target_port is None or not 0 < int(target_port) < 65536:
            raise ValueError(f"target_port must be a TCP port, got {target_port!r}")
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be positive or None")
        if buffer_bytes is not None and buffer_bytes <= 0:
            raise ValueError("buffer_bytes must be positive or None")
        self.target_host = str(target_host)
        self.target_port = int(target_port)
        self.delay_ms = float(delay_ms)
        self.bandwidth_bps = float(bandwidth_bps) if bandwidth_bps else None
        self.listen_host = listen_host
        self._listen_addr = _resolve_loopback(listen_host)
        self._target_addr = _resolve(self.target_host)
        if buffer_bytes is None:
            buffer_bytes = (
                _DEFAULT_BUFFER_CAPPED if self.bandwidth_bps else _DEFAULT_BUFFER_UNCAPPED
            )
        in_flight = int(self.bandwidth_bps / 8 * self.delay_ms / 1000) if self.bandwidth_bps else 0
        self._buffer_limit = buffer_bytes + in_flight

        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lsock: socket.socket | None = None
        self._raw: set[socket.socket] = set()
        # every transport we made, so stop() can reset even those still flushing a graceful close
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._port: int | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._links: dict[str, _Link] = {}
        self._flowing: asyncio.Event | None = None
        self._stalled = False
        self._closing = False
        self._cut_direction: Direction | None = None
        self._cut_remaining = 0
        self._bytes = {"down": 0, "up": 0}
        self._connections_total = 0
        self._cuts = 0

    @contextlib.contextmanager
    def unthrottled(self) -> Iterator[None]:
        """No delay and no cap while inside: connections made meanwhile reach the same port
        (so a client takes the server for the same one), at loopback speed."""
        saved = [(link, link.delay_s, link.bandwidth_bps) for link in self._links.values()]
        for link, _, _ in saved:
            link.delay_s, link.bandwidth_bps = 0.0, None
        try:
            yield
        finally:
            for link, delay, bandwidth in saved:
                link.delay_s, link.bandwidth_bps = delay, bandwidth

    # ----------------------------------------------------------------------------------- life
    def start(self) -> WanProxy:
        """Bind an ephemeral loopback port and start forwarding (in a daemon thread)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("WanProxy already started")
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run_loop, args=(loop, ready), name="runicorn-wan-proxy", daemon=True
            )
            thread.start()
            ready.wait(_CONTROL_TIMEOUT)
            self._loop, self._thread = loop, thread
            try:
                fut = asyncio.run_coroutine_threadsafe(self._open(), loop)
                fut.result(_CONTROL_TIMEOUT)
            except BaseException:
                self._loop, self._thread = None, None
                loop.call_soon_threadsafe(loop.stop)
                thread.join(_JOIN_TIMEOUT)
                raise
        _LOG.debug(
            "wan proxy: 127.0.0.1:%s -> %s:%d delay=%.1fms bw=%s",
            self._port,
            self.target_host,
            self.target_port,
            self.delay_ms,
            self.bandwidth_bps,
        )
        return self

    def stop(self) -> None:
        """Close the listener and all connections, end the loop, join its thread (idempotent)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop, self._thread = None, None
            if thread.is_alive():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._close(), loop).result(_CONTROL_TIMEOUT)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(loop.stop)
                thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():  # pragma: no cover - only if the loop is wedged
                _LOG.warning("wan proxy: event loop thread did not stop in time")

    def __enter__(self) -> WanProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten proxy must not keep a thread and a port alive
        with contextlib.suppress(Exception):
            self.stop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        if not self._stalled:
            self._flowing.set()
        delay_s = self.delay_ms / 1000.0
        self._links = {
            "down": _Link(delay_s, self.bandwidth_bps),
            "up": _Link(delay_s, self.bandwidth_bps),
        }
        self._closing = False
        family = socket.AF_INET6 if ":" in self._listen_addr else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.bind((self._listen_addr, 0))
            lsock.listen(128)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        self._lsock = lsock
        self._port = int(lsock.getsockname()[1])
        asyncio.get_running_loop().add_reader(lsock.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        """Accept by hand (a reader callback) rather than through ``asyncio.start_server``.

        Why: on Python 3.11 a socket accepted just before ``Server.close()`` is wrapped after the
        close and leaks, and a cancelled ``sock_accept`` can drop a socket it already accepted.
        Accepting synchronously here means every socket is tracked from its first moment.
        """
        lsock = self._lsock
        if lsock is None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(64):  # bounded per wake-up; the reader fires again if more are waiting
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: pause accepting instead of spinning
                _LOG.warning("wan proxy: accept failed: %s", exc)
                loop.remove_reader(lsock.fileno())
                loop.call_later(0.05, self._resume_accepting)
                return
            if self._closing:
                _rst_close(sock)
                continue
            sock.setblocking(False)
            self._raw.add(sock)
            task = loop.create_task(self._serve(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _resume_accepting(self) -> None:
        if self._lsock is not None and not self._closing:
            asyncio.get_running_loop().add_reader(self._lsock.fileno(), self._on_acceptable)

    async def _close(self) -> None:
        """Reset every connection and wait (bounded) until no task of ours is left on the loop."""
        self._closing = True
        if self._lsock is not None:
            asyncio.get_running_loop().remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        deadline = loop.time() + 3.0
        while loop.time() < deadline:
            for conn in list(self._conns):
                conn.abort()
            for task in list(self._handlers):
                task.cancel()
            others = [t for t in asyncio.all_tasks() if t is not current]
            if not others:
                break
            await asyncio.wait(others, timeout=0.02)
        for sock in list(self._raw):  # accepted, but the handler never got to wrap it
            _rst_close(sock)
        self._raw.clear()
        for transport in list(self._transports):
            transport.abort()  # no-op for closed ones; resets any still flushing a close
        await asyncio.sleep(0)  # let aborted transports run their close callbacks

    async def _serve(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.CancelledError):
            self._raw.discard(sock)
            _rst_close(sock)
            return
        self._raw.discard(sock)  # the transport owns it now
        self._transports.add(writer.transport)
        if self._closing:
            _hard_close(writer)
            return
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        self._connections_total += 1
        try:
            await conn.run()
        except asyncio.CancelledError:
            conn.abort()  # stop(): end quietly, the loop is going away
        except Exception:  # a broken connection must never take the proxy down
            _LOG.exception("wan proxy: connection handler failed")
            conn.abort()
        finally:
            self._conns.discard(conn)

    # -------------------------------------------------------------------------------- control
    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the proxy's loop and wait: a switch is in force once the call returns."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()

        async def wrapper() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result(_CONTROL_TIMEOUT)

    def stall(self) -> None:
        """Stop delivering (connections stay open, data is held) until :meth:`resume`."""

        def do() -> None:
            self._stalled = True
            if self._flowing is not None:
                self._flowing.clear()

        self._call(do)

    def resume(self) -> None:
        """Deliver again; data held during a stall is released at once, in order."""

        def do() -> None:
            self._stalled = False
            if self._flowing is not None:
                self._flowing.set()

        self._call(do)

    def close_all(self) -> None:
        """Reset every open connection now; the listener keeps accepting new ones."""

        def do() -> None:
            for conn in list(self._conns):
                conn.abort()

        self._call(do)

    def cut_after_bytes(self, n: int, direction: Direction = "down") -> None:
        """After forwarding exactly ``n`` more bytes in ``direction``, reset every connection.

        ``"down"`` is target to client, ``"up"`` client to target, ``"both"`` counts the two
        together. The switch fires once (like a link that dies and comes back); later connections
        are forwarded normally. A new call replaces a pending one.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if direction not in ("down", "up", "both"):
            raise ValueError(f"direction must be 'down', 'up' or 'both', got {direction!r}")

        def do() -> None:
            self._cut_direction = direction
            self._cut_remaining = int(n)

        self._call(do)

    def cancel_cut(self) -> None:
        """Disarm a pending :meth:`cut_after_bytes`."""

        def do() -> None:
            self._cut_direction = None

        self._call(do)

    def reset_counters(self) -> None:
        """Zero ``bytes_down`` and ``bytes_up`` (e.g. between benchmark scenarios)."""

        def do() -> None:
            self._bytes["down"] = 0
            self._bytes["up"] = 0

        self._call(do)

    # ------------------------------------------------------------------------- loop internals
    def _take_budget(self, direction: Literal["down", "up"], nbytes: int) -> tuple[int, bool]:
        """How many of ``nbytes`` may go out, and whether the link dies right after them."""
        cut_dir = self._cut_direction
        if cut_dir is None or (cut_dir != "both" and cut_dir != direction):
            return nbytes, False
        allowed = min(nbytes, self._cut_remaining)
        self._cut_remaining -= allowed
        return allowed, self._cut_remaining == 0

    def _fire_cut(self) -> None:
        if self._cut_direction is None:
            return
        self._cut_direction = None
        self._cuts += 1
        _LOG.debug("wan proxy: cutting %d connection(s)", len(self._conns))
        for conn in list(self._conns):
            conn.abort()

    def _count(self, direction: Literal["down", "up"], nbytes: int) -> None:
        self._bytes[direction] += nbytes

    # ------------------------------------------------------------------------------ read-only
    @property
    def port(self) -> int:
        """The loopback port clients connect to."""
        if self._port is None:
            raise RuntimeError("WanProxy not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to connect to."""
        return self._listen_addr, self.port

    @property
    def bytes_down(self) -> int:
        """Bytes delivered target -> client since start or :meth:`reset_counters`."""
        return self._bytes["down"]

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> target since start or :meth:`reset_counters`."""
        return self._bytes["up"]

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def connections_total(self) -> int:
        """Connections accepted since start."""
        return self._connections_total

    @property
    def cuts(self) -> int:
        """How many times :meth:`cut_after_bytes` has fired."""
        return self._cuts

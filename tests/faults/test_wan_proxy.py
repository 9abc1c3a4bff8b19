"""The WAN proxy must be faithful (in order, intact, delayed, rate-capped) and its faults exact.

Benchmarks and fault tests lean on it, so a proxy that reorders, drops or silently speeds up data
would make every number built on it wrong. Timing checks are lower bounds only (noisy machine).
"""

from __future__ import annotations

import os
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from harness.wan_proxy import WanProxy

Handler = Callable[[socket.socket], None]


class _Server:
    """A tiny threaded TCP server on 127.0.0.1 running ``handler`` per connection."""

    def __init__(self, handler: Handler) -> None:
        outer = self

        class _H(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    handler(self.request)
                except OSError as exc:
                    outer.errors.append(exc)

        self.errors: list[BaseException] = []
        self.srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _H)
        self.srv.daemon_threads = True
        self.port = int(self.srv.server_address[1])
        self.thread = threading.Thread(target=self.srv.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join(5)


def _echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(data)


@pytest.fixture
def server_factory() -> Iterator[Callable[[Handler], _Server]]:
    servers: list[_Server] = []

    def make(handler: Handler) -> _Server:
        s = _Server(handler)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def echo(server_factory: Callable[[Handler], _Server]) -> _Server:
    return server_factory(_echo)


def _connect(proxy: WanProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Read until EOF or reset; return the data and whether the end was a reset."""
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(buf), True
        if not chunk:
            return bytes(buf), False
        buf += chunk


def _echo_roundtrip(proxy: WanProxy, payload: bytes) -> bytes:
    """Send and receive concurrently so large payloads never deadlock on full buffers."""
    with _connect(proxy) as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)), daemon=True
        )
        sender.start()
        got, reset = _recv_until_closed(sock)
        sender.join(10)
    assert not reset
    return got


def test_small_and_large_payloads_round_trip_intact(echo: _Server) -> None:
    small = os.urandom(1000)
    big = os.urandom(8 * 1024 * 1024)
    with WanProxy("127.0.0.1", echo.port, delay_ms=2) as proxy:
        assert _echo_roundtrip(proxy, small) == small
        assert _echo_roundtrip(proxy, big) == big
        assert proxy.bytes_up == proxy.bytes_down == len(small) + len(big)


def test_concurrent_connections_do_not_mix(echo: _Server) -> None:
    payloads = [os.urandom(200_000 + i) for i in range(4)]
    results: list[bytes | None] = [None] * len(payloads)
    with WanProxy(echo.port, delay_ms=5, bandwidth_bps=400e6) as proxy:

        def run(i: int) -> None:
            results[i] = _echo_roundtrip(proxy, payloads[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert proxy.connections_total == len(payloads)
    assert results == payloads


def test_round_trip_gains_twice_the_one_way_delay(echo: _Server) -> None:
    delay = 0.03
    rounds = 5
    with WanProxy(echo.port, delay_ms=delay * 1000) as proxy, _connect(proxy) as sock:
        for i in range(rounds):
            t0 = time.monotonic()
            sock.sendall(bytes([i]))
            assert _recv_exact(sock, 1) == bytes([i])
            assert time.monotonic() - t0 >= 2 * delay


def test_bandwidth_cap_is_a_lower_bound_on_transfer_time(
    server_factory: Callable[[Handler], _Server],
) -> None:
    n = 1_000_000
    bps = 16e6  # 0.5 s for 1 MB

    def sink(sock: socket.socket) -> None:
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
        sock.sendall(str(total).encode())

    srv = server_factory(sink)
    with WanProxy(srv.port, delay_ms=10, bandwidth_bps=bps) as proxy, _connect(proxy) as sock:
        t0 = time.monotonic()
        sock.sendall(os.urandom(n))
        sock.shutdown(socket.SHUT_WR)
        reply, _ = _recv_until_closed(sock)
        elapsed = time.monotonic() - t0
    assert int(reply) == n
    # n bytes on the wire, plus the delay there and back for the reply
    assert elapsed >= n * 8 / bps + 2 * 0.010


def test_half_close_is_forwarded_after_the_data(server_factory: Callable[[Handler], _Server]):
    def count_then_reply(sock: socket.socket) -> None:
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
        sock.sendall(f"got {total}".encode())

    srv = server_factory(count_then_reply)
    with WanProxy(srv.port, delay_ms=5) as proxy, _connect(proxy) as sock:
        sock.sendall(b"x" * 12345)
        sock.shutdown(socket.SHUT_WR)
        reply, reset = _recv_until_closed(sock)
    assert (reply, reset) == (b"got 12345", False)


@pytest.mark.parametrize("n", [0, 1, 100_000])
def test_cut_after_bytes_down_delivers_exactly_n(
    server_factory: Callable[[Handler], _Server], n: int
) -> None:
    blob = os.urandom(1_000_000)

    def source(sock: socket.socket) -> None:
        sock.sendall(blob)

    srv = server_factory(source)
    with WanProxy(srv.port, delay_ms=1) as proxy:
        proxy.cut_after_bytes(n, "down")
        with _connect(proxy) as sock:
            got, _ = _recv_until_closed(sock)
        assert got == blob[:n]
        assert proxy.cuts == 1
        assert proxy.bytes_down == n
        # one-shot: the next connection is whole again
        with _connect(proxy) as sock:
            got, reset = _recv_until_closed(sock)
        assert got == blob
        assert not reset


def test_cut_after_bytes_up_reaches_the_server_exactly(
    server_factory: Callable[[Handler], _Server],
) -> None:
    n = 54_321
    received: list[int] = []
    done = threading.Event()

    def sink(sock: socket.socket) -> None:
        total = 0
        try:
            while chunk := sock.recv(65536):
                total += len(chunk)
        except ConnectionResetError:
            pass
        received.append(total)
        done.set()

    srv = server_factory(sink)
    with WanProxy(srv.port) as proxy:
        proxy.cut_after_bytes(n, direction="up")
        with _connect(proxy) as sock, pytest.raises(OSError):
            for _ in range(200):  # bounded: 200 x 64 KiB, far more than the budget
                sock.sendall(b"u" * 65536)
                time.sleep(0.001)
        assert done.wait(10)
    assert received == [n]


def test_cut_both_counts_the_two_directions_together(echo: _Server) -> None:
    with WanProxy(echo.port) as proxy:
        proxy.cut_after_bytes(15, direction="both")
        with _connect(proxy) as sock:
            sock.sendall(b"0123456789")  # 10 up, then 5 of the echo down, then the cut
            got, _ = _recv_until_closed(sock)
        assert got == b"01234"
        assert (proxy.bytes_up, proxy.bytes_down) == (10, 5)


def test_stall_holds_data_until_resume(echo: _Server) -> None:
    with WanProxy(echo.port, delay_ms=1) as proxy, _connect(proxy) as sock:
        sock.sendall(b"before")
        assert _recv_exact(sock, 6) == b"before"
        proxy.stall()
        assert proxy.stalled
        sock.sendall(b"held")
        readable, _, _ = select.select([sock], [], [], 0.3)
        assert readable == []
        assert proxy.bytes_up == 6
        assert proxy.active_connections == 1
        proxy.resume()
        assert _recv_exact(sock, 4) == b"held"


def test_close_all_resets_open_connections_and_keeps_listening(echo: _Server) -> None:
    with WanProxy(echo.port) as proxy:
        with _connect(proxy) as a, _connect(proxy) as b:
            for s in (a, b):
                s.sendall(b"hi")
                assert _recv_exact(s, 2) == b"hi"
            proxy.close_all()
            for s in (a, b):
                got, _ = _recv_until_closed(s)
                assert got == b""
        with _connect(proxy) as c:
            c.sendall(b"again")
            assert _recv_exact(c, 5) == b"again"


def test_counters_and_reset(echo: _Server) -> None:
    with WanProxy(echo.port) as proxy, _connect(proxy) as sock:
        sock.sendall(b"a" * 1000)
        _recv_exact(sock, 1000)
        assert (proxy.bytes_up, proxy.bytes_down) == (1000, 1000)
        proxy.reset_counters()
        assert (proxy.bytes_up, proxy.bytes_down) == (0, 0)
        sock.sendall(b"b" * 10)
        _recv_exact(sock, 10)
        assert (proxy.bytes_up, proxy.bytes_down) == (10, 10)


def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]  # bound, never listening
        with WanProxy(dead_port) as proxy:
            try:
                sock = _connect(proxy)
            except ConnectionResetError:  # the reset can beat connect() home on a busy machine
                return
            with sock:
                got, _ = _recv_until_closed(sock)
            assert got == b""


def test_stop_is_idempotent_and_leaves_no_thread(echo: _Server) -> None:
    proxy = WanProxy(echo.port, delay_ms=50)
    proxy.start()
    port = proxy.port
    sock = _connect(proxy)
    sock.sendall(b"in flight")  # still queued when stop() runs
    proxy.stop()
    proxy.stop()
    sock.close()
    assert not [t for t in threading.enumerate() if t.name == "runicorn-wan-proxy"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_refuses_non_loopback_listen_address() -> None:
    with pytest.raises(ValueError):
        WanProxy(22, listen_host="0.0.0.0")
    with pytest.raises(ValueError):
        WanProxy("127.0.0.1", None)

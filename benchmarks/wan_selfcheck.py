"""Self-check of the WAN proxy: does it behave like a 50 ms RTT, 100 Mbit/s link?

Why: every WAN benchmark number (docs/performance.md) is only as good as this emulation. The script
measures, over loopback through :class:`harness.wan_proxy.WanProxy`:

* RTT: 1-byte ping-pongs on an idle connection (expect about 2 * delay);
* bulk throughput down (server -> client) and up (client -> server) for a 20 MiB transfer with a
  plain socket (expect close to the cap: delay must be pipelined, not paid per chunk);
* RTT on a second connection while a bulk download runs (the queueing delay behind bulk data).

Usage: ``python benchmarks/wan_selfcheck.py [--rtt-ms 50] [--mbit 100] [--mib 20]``
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
from harness.wan_proxy import WanProxy

_CHUNK = 256 * 1024


def _serve(listener: socket.socket, payload: bytes, stop: threading.Event) -> None:
    """Tiny server: 'P' = echo one byte per ping, 'D' = send payload, 'U' = sink and report."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_handle, args=(conn, payload), daemon=True).start()


def _handle(conn: socket.socket, payload: bytes) -> None:
    with conn, contextlib.suppress(OSError):  # a reset at proxy shutdown is expected
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"P":
            while b := conn.recv(1):
                conn.sendall(b)
        elif mode == b"D":
            conn.sendall(payload)
        elif mode == b"U":
            total = 0
            while chunk := conn.recv(_CHUNK):
                total += len(chunk)
            conn.sendall(str(total).encode())


def _connect(port: int, mode: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


def measure_rtt(port: int, pings: int = 20) -> list[float]:
    samples = []
    with _connect(port, b"P") as sock:
        for _ in range(pings):
            t0 = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("ping lost")
            samples.append(time.perf_counter() - t0)
    return samples


def measure_down(port: int, nbytes: int) -> tuple[float, float]:
    """Return (seconds from request to last byte, seconds from first byte to last byte)."""
    t0 = time.perf_counter()
    got = 0
    first = None
    with _connect(port, b"D") as sock:
        while chunk := sock.recv(_CHUNK):
            if first is None:
                first = time.perf_counter()
            got += len(chunk)
    end = time.perf_counter()
    if got != nbytes:
        raise RuntimeError(f"received {got} of {nbytes} bytes")
    return end - t0, end - (first or t0)


def measure_up(port: int, payload: bytes) -> float:
    """Seconds from first byte sent to the server's report (includes one RTT for the report)."""
    with _connect(port, b"U") as sock:
        t0 = time.perf_counter()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(64):
            reply += chunk
    elapsed = time.perf_counter() - t0
    if int(reply) != len(payload):
        raise RuntimeError(f"server got {reply!r}, expected {len(payload)}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--mib", type=float, default=20.0)
    args = ap.parse_args(argv)

    payload = bytes(range(256)) * int(args.mib * 1024 * 1024 / 256)
    bps = args.mbit * 1e6
    ideal = len(payload) * 8 / bps
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=_serve, args=(listener, payload, stop), daemon=True)
        server.start()
        port = listener.getsockname()[1]
        try:
            with WanProxy(port, delay_ms=args.rtt_ms / 2, bandwidth_bps=bps) as proxy:
                rtts = measure_rtt(proxy.port)
                down_total, down_stream = measure_down(proxy.port, len(payload))
                up_total = measure_up(proxy.port, payload)
                # RTT on a second connection while a bulk download fills the shared down link:
                # shows the queueing delay a request sees behind bulk data (bufferbloat).
                bulk = threading.Thread(target=measure_down, args=(proxy.port, len(payload)))
                bulk.start()
                time.sleep(0.3)
                loaded = measure_rtt(proxy.port, pings=5)
                bulk.join(60)
                counted = (proxy.bytes_down, proxy.bytes_up)
        finally:
            stop.set()
            server.join(2)

    mib = len(payload) / 2**20
    rtt_ms = statistics.median(rtts) * 1000
    print(f"link: {args.rtt_ms:.0f} ms RTT, {args.mbit:.0f} Mbit/s; transfer {mib:.0f} MiB")
    print(
        f"RTT idle: median {rtt_ms:.1f} ms  (min {min(rtts) * 1000:.1f}, "
        f"max {max(rtts) * 1000:.1f}, target {args.rtt_ms:.0f})"
    )
    print(f"RTT during a bulk download: median {statistics.median(loaded) * 1000:.1f} ms")
    print(f"ideal bulk time at the cap: {ideal:.2f} s")
    for name, secs in (
        ("down, request -> last byte", down_total),
        ("down, first -> last byte ", down_stream),
        ("up, first byte -> report ", up_total),
    ):
        mbit = len(payload) * 8 / secs / 1e6
        print(f"{name}: {secs:.2f} s = {mbit:6.1f} Mbit/s ({100 * mbit / args.mbit:5.1f} %)")
    print(f"proxy counters: down {counted[0]} B, up {counted[1]} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

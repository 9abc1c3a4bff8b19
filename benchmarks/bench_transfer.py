"""How pipelining depth and read size change the time to fetch a 100-run lab over SFTP.

Run: ``python benchmarks/bench_transfer.py [--runs 100] [--no-wan] [--slow]``

It builds a lab (``runicorn.demo.sample_lab`` when available, else synthetic files of similar sizes)
in a temporary directory, starts a throw-away sshd on 127.0.0.1, and fetches every file through
:class:`runicorn.transport.sftp_remote.SftpRemote` with different ``depth`` (requests in flight
per channel), ``read_size`` and ``workers``. Over loopback first, then, if
``harness.wan_proxy`` is present, through a 50 ms RTT / 100 Mbit/s proxy, next to the
time the link's bandwidth alone allows. Time is the fetch (including opening the worker
channels), not the SSH handshake. Prints a table; ``--slow`` adds depth 1 on the WAN (minutes).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import paramiko

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
from harness.sshd import SshServer
from runicorn.transport.remote import FetchJob, FetchResult
from runicorn.transport.sftp_remote import SftpRemote

KIB = 1024


def build_lab(root: Path, runs: int, scale: float) -> None:
    """The sample lab (:mod:`runicorn.demo.sample_lab`) if it imports, else similar files."""
    try:
        from runicorn.demo.sample_lab import build_sample_lab
    except ImportError:
        build_sample_lab = None
    if build_sample_lab is not None:
        build_sample_lab(root, runs=runs, seed=0, scale=scale)
        return
    rng = random.Random(0)
    for run in range(runs):
        run_dir = root / "proj" / "exp" / "runs" / f"run{run:04d}"
        (run_dir / "media").mkdir(parents=True)
        for name, size in [
            ("meta.json", 600),
            ("status.json", 200),
            ("summary.json", 1500),
            ("events.jsonl", rng.randint(100_000, 600_000)),
            ("logs.txt", rng.randint(20_000, 100_000)),
        ]:
            (run_dir / name).write_bytes(rng.randbytes(size))
        for index in range(4):
            (run_dir / "media" / f"img{index}.png").write_bytes(
                rng.randbytes(rng.randint(1, 8) * 10_000)
            )


def lab_files(root: Path) -> list[tuple[str, int]]:
    files = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    files.sort()
    return files


def connect(server: SshServer, port: int) -> paramiko.SSHClient:
    """Connect to ``server`` through ``port`` (the proxy), trusting exactly its host key."""
    client = paramiko.SSHClient()
    key_type, key_data = server.host_public_key.split()[:2]
    key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_data))
    client.get_host_keys().add(f"[127.0.0.1]:{port}", key_type, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=port,
        username=server.username,
        pkey=server.client_key(),
        allow_agent=False,
        look_for_keys=False,
        timeout=30,
    )
    return client


def fetch_all(
    client: paramiko.SSHClient,
    root: Path,
    files: list[tuple[str, int]],
    *,
    depth: int,
    read_size: int,
    workers: int,
) -> tuple[float, int]:
    sftp = client.open_sftp()
    received = 0
    failures: list[FetchResult] = []

    def sink(offset: int, data: bytes) -> None:
        nonlocal received
        received += len(data)

    def on_result(result: FetchResult) -> None:
        if result.error is not None:
            failures.append(result)

    jobs = [FetchJob(path, 0, size, sink) for path, size in files]
    remote = SftpRemote(sftp, str(root), depth=depth, read_size=read_size, timeout=120)
    try:
        started = time.perf_counter()
        remote.fetch(jobs, on_result, workers=workers)
        elapsed = time.perf_counter() - started
    finally:
        remote.close()
        sftp.close()
    if failures:
        raise RuntimeError(f"{len(failures)} jobs failed, first: {failures[0].error!r}")
    return elapsed, received


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--no-wan", action="store_true", help="loopback only")
    parser.add_argument("--slow", action="store_true", help="also depth 1 over the WAN")
    parser.add_argument(
        "--scale", type=float, default=2.65, help="sample-lab size factor (2.65: about 48 MB)"
    )
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="runicorn-bench-") as tmp:
        root = Path(tmp) / "lab"
        build_lab(root, args.runs, args.scale)
        files = lab_files(root)
        total = sum(size for _, size in files)
        print(f"lab: {len(files)} files, {total / 1e6:.1f} MB ({args.runs} runs)")
        print(f"{'link':<18} {'depth':>5} {'read':>8} {'workers':>7} {'seconds':>8} {'MB/s':>7}")

        def row(link: str, client: paramiko.SSHClient, depth: int, read: int, workers: int) -> None:
            elapsed, received = fetch_all(
                client, root, files, depth=depth, read_size=read, workers=workers
            )
            assert received == total, (received, total)
            print(
                f"{link:<18} {depth:>5} {read // KIB:>5}KiB {workers:>7} {elapsed:>8.2f} "
                f"{total / elapsed / 1e6:>7.1f}",
                flush=True,
            )

        with SshServer() as server:
            client = server.connect()
            try:
                for read in (32 * KIB, 255 * KIB):
                    for depth in (1, 4, 16, 64, 256):
                        row("loopback", client, depth, read, 1)
                row("loopback", client, 64, 255 * KIB, 4)
            finally:
                client.close()

            if args.no_wan:
                return 0
            try:
                from harness.wan_proxy import WanProxy
            except ImportError:
                print("(no harness.wan_proxy: WAN rows skipped)")
                return 0
            link = f"{args.rtt_ms:g}ms/{args.mbit:g}Mbit"
            limit = total * 8 / (args.mbit * 1e6)
            print(f"{link}: the bandwidth alone needs {limit:.2f} s for {total / 1e6:.1f} MB")
            with WanProxy(
                "127.0.0.1",
                server.port,
                delay_ms=args.rtt_ms / 2,
                bandwidth_bps=args.mbit * 1e6,
            ) as proxy:
                client = connect(server, proxy.port)
                try:
                    depths = (1, 4, 16, 64, 256) if args.slow else (4, 16, 64, 256)
                    for depth in depths:
                        row(link, client, depth, 255 * KIB, 1)
                    row(link, client, 64, 32 * KIB, 1)
                    row(link, client, 64, 255 * KIB, 3)
                    row(link, client, 64, 255 * KIB, 4)
                    row(link, client, 128, 255 * KIB, 3)
                finally:
                    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

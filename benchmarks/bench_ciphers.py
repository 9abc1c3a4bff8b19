"""Client CPU per SSH cipher and MAC for one large SFTP download from a local sshd.

Run: ``python benchmarks/bench_ciphers.py [--mib 200] [--rounds 2]``

A cold sync over a WAN link is bound by the link, but the client shares two cores with the
server and everything else, so the CPU each byte costs in paramiko decides how close it gets
to the link's speed. This fetches one file of random bytes through a throw-away sshd on
127.0.0.1 (no proxy: the time is CPU, not the link) once per cipher/MAC pair, each the
first choice of the client's offer, and prints wall time and this process's CPU time
(paramiko's transport thread included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import paramiko

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
from harness.sshd import SshServer

PAIRS = [
    ("aes128-ctr", "hmac-sha2-256"),  # paramiko's first choice against OpenSSH
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes128-gcm@openssh.com", "hmac-sha2-256"),  # AEAD: the MAC is not used
    ("aes256-gcm@openssh.com", "hmac-sha2-256"),
]


def _first(preferred: tuple[str, ...], choice: str) -> tuple[str, ...]:
    return (choice, *(name for name in preferred if name != choice))


def fetch(server: SshServer, path: Path, cipher: str, mac: str) -> tuple[str, float, float]:
    """Download ``path`` whole; return (negotiated cipher, wall s, CPU s)."""
    ciphers, macs = paramiko.Transport._preferred_ciphers, paramiko.Transport._preferred_macs
    paramiko.Transport._preferred_ciphers = _first(ciphers, cipher)
    paramiko.Transport._preferred_macs = _first(macs, mac)
    try:
        client = server.connect()
    finally:
        paramiko.Transport._preferred_ciphers, paramiko.Transport._preferred_macs = ciphers, macs
    try:
        transport = client.get_transport()
        negotiated = f"{transport.local_cipher} {transport.local_mac}" if transport else "?"
        sftp = client.open_sftp()
        size = path.stat().st_size
        wall, cpu = time.perf_counter(), time.process_time()
        received = 0
        with sftp.open(str(path), "rb") as remote:
            remote.prefetch(size)
            while chunk := remote.read(1 << 20):
                received += len(chunk)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if received != size:
            raise RuntimeError(f"received {received} of {size} bytes")
        return negotiated, wall, cpu
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="size of the file to fetch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runicorn-ciphers-") as scratch:
        path = Path(scratch) / "payload"
        with open(path, "wb") as handle:
            for _ in range(args.mib):
                handle.write(os.urandom(1 << 20))
        print(f"{args.mib} MiB per fetch; CPU is this process's (user + system)")
        print(f"{'cipher / MAC offered first':<48} {'negotiated':<48} {'wall s':>7} {'CPU s':>6}")
        with SshServer() as server:
            for _ in range(args.rounds):
                for cipher, mac in PAIRS:
                    negotiated, wall, cpu = fetch(server, path, cipher, mac)
                    offered = f"{cipher} {mac}"
                    print(f"{offered:<48} {negotiated:<48} {wall:7.2f} {cpu:6.2f}")


if __name__ == "__main__":
    main()

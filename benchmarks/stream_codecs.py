"""The file stream's codecs on a sample lab: bytes out and CPU of each zlib and zstd setting.

Builds a sample lab (``--runs``, ``--scale``; the seed is the run count, as in
``wan_sync.py``), takes its files in path order as a cold sync asks for them, leaves out
those the stream sends uncompressed (a first 4 KiB that zlib level 1 does not shrink), and
feeds the rest through one compression context in blocks of about 128 KiB, each ended by a
flush, as the server-side program does. For each setting it prints the bytes out, the ratio
and the CPU seconds of this process (``time.process_time``), best of ``--rounds``. LDM is
zstd's long-distance matching. The standard library's other codecs are there for a server
whose ``python3`` has no zstd: zlib's levels, and LZMA (``lzma``: it cannot flush a stream
and go on, so each block is a raw LZMA2 stream of its own).

    python benchmarks/stream_codecs.py --runs 200 --scale 1.0
"""

from __future__ import annotations

import argparse
import lzma
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

from runicorn.demo.sample_lab import build_sample_lab

BLOCK = 128 * 1024
PROBE = 4096


def _compressible(root: Path) -> tuple[list[bytes], int]:
    """The lab's files the stream compresses, in path order, and the bytes of the others."""
    kept: list[bytes] = []
    plain = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or ".runicorn" in path.parts or path.suffix == ".lock":
            continue
        data = path.read_bytes()
        if len(data) >= PROBE and len(zlib.compress(data[:PROBE], 1)) >= 0.9 * PROBE:
            plain += len(data)
            continue
        kept.append(data)
    return kept, plain


def _blocks(files: list[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []
    size = 0
    for data in files:
        for start in range(0, len(data), BLOCK):
            piece = data[start : start + BLOCK]
            pending.append(piece)
            size += len(piece)
            if size > BLOCK:
                yield b"".join(pending)
                pending, size = [], 0
    if pending:
        yield b"".join(pending)


def _zlib(level: int) -> Callable[[bytes], bytes]:
    packer = zlib.compressobj(level)
    return lambda body: packer.compress(body) + packer.flush(zlib.Z_SYNC_FLUSH)


def _lzma(preset: int) -> Callable[[bytes], bytes]:
    filters = [{"id": lzma.FILTER_LZMA2, "preset": preset}]
    return lambda body: lzma.compress(body, format=lzma.FORMAT_RAW, filters=filters)


def _zstd(level: int, window_log: int | None, ldm: bool) -> Callable[[bytes], bytes]:
    if window_log is None and not ldm:
        compressor = zstandard.ZstdCompressor(level=level)
    else:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log or 0, enable_ldm=ldm
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
    packer = compressor.compressobj()
    flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
    return lambda body: packer.compress(body) + packer.flush(flush)


SETTINGS: list[tuple[str, Callable[[], Callable[[bytes], bytes]]]] = [
    ("zlib 1 (the stream without zstd)", lambda: _zlib(1)),
    *[(f"zlib {level}", lambda level=level: _zlib(level)) for level in (2, 3, 4)],
    ("zlib 6 (sshd's)", lambda: _zlib(6)),
    ("LZMA2 preset 0, each block alone", lambda: _lzma(0)),
    *[(f"zstd {level}", lambda level=level: _zstd(level, None, False)) for level in (1, 2, 3)],
    *[
        (f"zstd {level}, window 2^{log}", lambda level=level, log=log: _zstd(level, log, False))
        for level in (1, 2, 3)
        for log in (21, 23)
    ],
    *[
        (f"zstd {level}, window 2^27, LDM", lambda level=level: _zstd(level, 27, True))
        for level in (1, 2, 3)
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runicorn-codecs-") as workdir:
        lab = Path(workdir) / "lab"
        build_sample_lab(lab, args.runs, seed=args.runs, scale=args.scale)
        files, plain = _compressible(lab)
    blocks = list(_blocks(files))
    total = sum(len(block) for block in blocks)
    print(
        f"{args.runs} runs, scale {args.scale}: {len(files)} files compressed, "
        f"{total / 1e6:.1f} MB; {plain / 1e6:.1f} MB sent plain\n"
    )
    print("| setting | MB out | ratio | CPU s | MB/s |")
    print("|---|---|---|---|---|")
    for name, make in SETTINGS:
        best = float("inf")
        out = 0
        for _ in range(max(1, args.rounds)):
            pack = make()
            started = time.process_time()
            out = sum(len(pack(block)) for block in blocks)
            best = min(best, time.process_time() - started)
        print(
            f"| {name} | {out / 1e6:.2f} | {total / out:.2f} | {best:.3f} | "
            f"{total / best / 1e6:.0f} |"
        )


if __name__ == "__main__":
    main()

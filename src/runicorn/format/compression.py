"""The ``.json.gz`` of a manifest: deterministic gzip out, size-capped gunzip in.

A 100,000-run manifest is about 150 MB of JSON, and deflating it on one core would be a
large share of a full generation. So large documents are deflated in fixed pieces on
several threads, as ``pigz`` does: every piece but the last ends with a sync flush, which
closes its deflate blocks on a byte boundary without ending the stream, so the pieces join
into one ordinary gzip member that any reader (``gzip -d``, :func:`gzip.decompress`, a
single ``zlib.decompressobj``) accepts. The pieces have a fixed size, so the bytes depend
on the content only, never on the thread count; a document of one piece comes out byte for
byte as :func:`gzip.compress` with ``mtime=0`` makes it with the same deflate library and
level.

The library is zlib-ng (the ``zlib-ng`` package, zlib's API) where it is installed, else
the standard :mod:`zlib`: zlib-ng deflates a large manifest in about half the time and a
little smaller, and inflates it in about half the time too (figures in
``docs/performance.md``). Either output is plain gzip that the other, and every other
reader, accepts.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

from runicorn._sys.atomic import Buffer, Document, pieces_of
from runicorn._sys.cpu import usable_cores

zlib_ng: ModuleType | None
try:
    from zlib_ng import zlib_ng
except ImportError:  # an install without the wheel: the standard library does the same work
    zlib_ng = None

LEVELS: dict[str, int] = {"zlib": 6, "zlib_ng.zlib_ng": 5}
"""Per library: zlib's default (level 9 costs twice the time for about 3 % smaller
manifests); zlib-ng's level 5, which is still smaller than zlib's 6 and faster than its 6."""

DEFLATE: ModuleType = zlib_ng or zlib
"""The deflate library in use (``zlib_ng.zlib_ng`` or ``zlib``): same API, same format."""

PIECE_BYTES = 4 * 1024 * 1024
"""Deflated independently; each piece forgets the 32 KiB window of the one before, which
costs well under 1 % of the compressed size at this length."""

MAX_COMPRESS_THREADS = 4

_GZIP_HEADER = struct.pack("<BBBBLBB", 0x1F, 0x8B, zlib.DEFLATED, 0, 0, 0, 3)
"""Magic, deflate, no flags, mtime 0 (bytes depend on content only), no extra flags, OS
Unix: what zlib and zlib-ng write at these levels, as :func:`gzip.compress` does with
``mtime=0``."""


def _deflate_piece(deflate: ModuleType, piece: Buffer, last: bool) -> bytes:
    level = LEVELS[deflate.__name__]
    deflater = deflate.compressobj(level, deflate.DEFLATED, -deflate.MAX_WBITS)
    body: bytes = deflater.compress(piece)
    tail: bytes = deflater.flush(deflate.Z_FINISH if last else deflate.Z_SYNC_FLUSH)
    return body + tail


def _fixed_pieces(views: list[memoryview], total: int) -> list[tuple[Buffer, bool]]:
    """``(piece, is_last)`` at every :data:`PIECE_BYTES` of the concatenation of ``views``;
    a piece is a slice of one view, or a copy where it spans two."""
    pieces: list[tuple[Buffer, bool]] = []
    index, offset = 0, 0  # where the next piece starts: views[index][offset]
    for start in range(0, max(total, 1), PIECE_BYTES):
        wanted = min(PIECE_BYTES, total - start)
        slices = []
        while wanted > 0:
            view = views[index]
            taken = view[offset : offset + wanted]
            slices.append(taken)
            wanted -= len(taken)
            offset += len(taken)
            if offset == len(view):
                index, offset = index + 1, 0
        piece = slices[0] if len(slices) == 1 else b"".join(slices)
        pieces.append((piece, start + PIECE_BYTES >= total))
    return pieces


def compress(data: Document, threads: int | None = None) -> bytes:
    """Deterministic gzip (no file name, zero mtime) so published bytes depend on content only.

    ``data`` may be given in pieces (see :data:`~runicorn._sys.atomic.Document`); the gzip is
    that of their concatenation. ``threads`` (default: the usable cores, at most 4) deflate
    the 4 MiB pieces of a large document concurrently; the library releases the GIL while it works.
    The result is the same for every thread count.
    """
    deflate = DEFLATE
    views = [memoryview(part).cast("B") for part in pieces_of(data)]
    views = [view for view in views if len(view)]
    total = sum(len(view) for view in views)
    pieces = _fixed_pieces(views, total) if views else [(b"", True)]
    workers = min(len(pieces), threads or min(MAX_COMPRESS_THREADS, usable_cores()))

    def checksum() -> int:
        crc = 0
        for view in views:
            crc = deflate.crc32(view, crc)
        return crc

    if workers <= 1:
        bodies = [_deflate_piece(deflate, piece, last) for piece, last in pieces]
        crc = checksum()
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deflate") as pool:
            futures = [pool.submit(_deflate_piece, deflate, piece, last) for piece, last in pieces]
            crc = checksum()  # meanwhile, on this thread
            bodies = [future.result() for future in futures]
    trailer = struct.pack("<LL", crc, total & 0xFFFFFFFF)
    return b"".join((_GZIP_HEADER, *bodies, trailer))


KEEP_BYTES = 64 * 1024 * 1024
"""Inflated output kept while a stream is read the first time. A larger stream is only
counted on that pass, and inflated again once it is known to be within the caps."""

_STEP_BYTES = 1024 * 1024
"""Output of one inflate call on the first pass."""

_FILL_BYTES = 16 * 1024 * 1024
"""Output of one inflate call on the second pass, which writes into the final buffer."""

VALUES_PER_ENTRY = 32
"""JSON values allowed per entry of the entries cap: a file entry is about 13 (keys and
values), a run about 20 plus its tags, so a real manifest stays far below this."""

_SEPARATORS = (b",", b":", b"[")


class JsonTally:
    """Counts of JSON text read so far, refused the moment one passes its cap.

    ``objects`` counts ``{`` (every run and file entry is one object), ``values`` counts
    the bytes a JSON value or key must follow (``[``, ``,``, ``:`` and ``{``): together they
    bound what a parser would allocate before it is asked to. Bytes inside strings count
    too, so both are overestimates, never under-. Each :meth:`add` is a few
    :meth:`bytes.count` scans, at memory speed.
    """

    __slots__ = ("limit", "max_entries", "objects", "size", "source", "values")

    def __init__(self, limit: int, max_entries: int | None, source: str) -> None:
        self.limit = limit
        self.max_entries = max_entries
        self.source = source
        self.size = 0
        self.objects = 0
        self.values = 0

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ValueError(
                f"{self.source} decompresses to more than {self.limit} bytes; refusing it "
                "(a gzip bomb, or a lab larger than this reader's limit: raise "
                "max_manifest_bytes, --max-manifest-bytes on the command line)"
            )
        if self.max_entries is None:
            return
        data = chunk if isinstance(chunk, bytes | bytearray) else bytes(chunk)
        objects = data.count(b"{")
        self.objects += objects
        self.values += objects + sum(data.count(separator) for separator in _SEPARATORS)
        # Two objects (the document and its statistics) are not entries.
        if self.objects > self.max_entries + 2:
            raise ValueError(
                f"{self.source} lists more than {self.max_entries} entries (runs and files); "
                "refusing it (a hostile manifest, or a lab larger than this reader's limit: "
                "raise max_manifest_entries, --max-manifest-entries on the command line)"
            )
        if self.values > VALUES_PER_ENTRY * self.max_entries + 1024:
            raise ValueError(
                f"{self.source} holds more JSON values than {self.max_entries} entries "
                f"(runs and files) of {VALUES_PER_ENTRY} values each could; refusing it "
                "(a hostile manifest: no generator writes one like it)"
            )


def decompress_capped(
    data: bytes | bytearray,
    limit: int,
    *,
    source: str = "manifest",
    max_entries: int | None = None,
) -> bytes | bytearray:
    """Gunzip ``data``, refusing to produce more than ``limit`` bytes (gzip bombs) or, with
    ``max_entries``, JSON text with more entries or values than that allows
    (:class:`JsonTally`).

    Memory stays bounded whatever the stream inflates to: the first pass inflates
    :data:`_STEP_BYTES` at a time and keeps the output only up to :data:`KEEP_BYTES`, then
    just counts it; a stream found within the caps is inflated a second time, into one
    buffer of its now known size. So a stream refused by a cap costs at most
    :data:`KEEP_BYTES` of memory, a 2 GiB bomb included, and an accepted one its own size.
    """
    size, kept = _first_pass(data, limit, source, max_entries)
    if kept is not None:
        return b"".join(kept)
    result = bytearray(size)
    position = 0

    def second_pass(chunk: bytes) -> None:
        nonlocal position
        end = position + len(chunk)
        if end > len(result):  # the same bytes inflate the same way; never expected
            raise ValueError(f"{source} inflated differently the second time")
        result[position:end] = chunk
        position = end

    _inflate(data, source, _FILL_BYTES, lambda: len(result) + 1 - position, second_pass)
    return result


def decompress_pieces(
    data: bytes | bytearray,
    limit: int,
    *,
    source: str = "manifest",
    max_entries: int | None = None,
) -> tuple[int, Iterator[bytes]]:
    """:func:`decompress_capped` handed out in pieces: the text's size, and its bytes a
    piece at a time, in order. The caps are checked in full before this returns, as there;
    a piece the caller drops is freed, so a reader that consumes the text as it comes
    (:meth:`~runicorn.format.models.SyncManifest.from_gzip`) never holds it whole."""
    size, kept = _first_pass(data, limit, source, max_entries)
    if kept is not None:
        return size, _handed_out(kept)
    return size, _inflated_again(data, source, size)


def _first_pass(
    data: bytes | bytearray, limit: int, source: str, max_entries: int | None
) -> tuple[int, list[bytes] | None]:
    """Inflate ``data`` once under the caps: its inflated size, and its pieces when they
    came to at most :data:`KEEP_BYTES` (``None`` beyond: only counted)."""
    tally = JsonTally(limit, max_entries, source)
    kept: list[bytes] | None = []
    for chunk in _inflated(data, source, _STEP_BYTES, lambda: limit + 1 - tally.size):
        tally.add(chunk)
        if kept is not None:
            kept.append(chunk)
            if tally.size > KEEP_BYTES:
                kept = None
    return tally.size, kept


def _handed_out(kept: list[bytes]) -> Iterator[bytes]:
    """The pieces of ``kept`` in order, each let go of as it is handed out."""
    kept.reverse()
    while kept:
        yield kept.pop()


def _inflated_again(data: bytes | bytearray, source: str, size: int) -> Iterator[bytes]:
    """The second pass over a stream the first pass found within the caps, in pieces."""
    produced = 0

    def room() -> int:
        return size + 1 - produced

    for chunk in _inflated(data, source, _STEP_BYTES, room):
        produced += len(chunk)
        if produced > size:  # the same bytes inflate the same way; never expected
            raise ValueError(f"{source} inflated differently the second time")
        yield chunk
    if produced != size:
        raise ValueError(f"{source} inflated differently the second time")


def _inflate(
    data: bytes | bytearray,
    source: str,
    step: int,
    room: Callable[[], int],
    sink: Callable[[bytes], None],
) -> None:
    """:func:`_inflated`, each piece handed to ``sink``."""
    for chunk in _inflated(data, source, step, room):
        sink(chunk)


def _inflated(
    data: bytes | bytearray,
    source: str,
    step: int,
    room: Callable[[], int],
) -> Iterator[bytes]:
    """Inflate the one gzip member ``data`` holds, at most ``min(step, room())`` bytes per
    call, yielding each piece; ValueError if it is not gzip, is truncated or is
    followed by anything but zero padding."""
    deflate = DEFLATE
    inflater = deflate.decompressobj(wbits=16 + deflate.MAX_WBITS)
    pending: bytes | bytearray = data
    try:
        while True:
            wanted = min(step, room())
            chunk = inflater.decompress(pending, wanted)
            yield chunk
            if inflater.eof:
                if inflater.unused_data.strip(b"\0"):
                    raise ValueError(f"{source} has trailing data after the gzip stream")
                return
            pending = inflater.unconsumed_tail
            if not pending and len(chunk) < wanted:
                raise ValueError(f"{source} is a truncated gzip stream")
    except deflate.error as error:
        raise ValueError(f"{source} is not valid gzip: {error}") from None

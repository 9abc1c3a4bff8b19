"""The published ``.json.gz``: deflated in pieces on several threads, yet one ordinary gzip
stream whose bytes depend on the content only. Every test runs with zlib-ng (the installed
dependency) and with the standard zlib it falls back to."""

from __future__ import annotations

import gzip
import itertools
import subprocess
import sys
import zlib

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.format import compression
from runicorn.format.compression import compress, decompress_capped

LIBRARIES = {"zlib-ng": compression.zlib_ng, "zlib": zlib}


@pytest.fixture(autouse=True, params=sorted(LIBRARIES))
def deflate(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The deflate library under test, as :mod:`runicorn.format.compression` uses it."""
    library = LIBRARIES[request.param]
    if library is None:
        pytest.fail("zlib-ng is a declared dependency but did not import")
    monkeypatch.setattr(compression, "DEFLATE", library)
    return library


def _gzip_of(deflate, data: bytes) -> bytes:
    """What the library makes of ``data`` in one call (gzip wrapper, level as published)."""
    return deflate.compress(data, compression.LEVELS[deflate.__name__], wbits=16 + 15)


def _json_like(rows: int) -> bytes:
    return orjson.dumps(
        [{"path": f"proj/exp/runs/r{i:06d}/media/step_{i}.png", "size": i * 7} for i in range(rows)]
    )


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pieces of 4 KiB, so a test document of a few hundred KiB has dozens of them."""
    monkeypatch.setattr(compression, "PIECE_BYTES", 4096)
    return 4096


@pytest.mark.parametrize("data", [b"", b"x", b"ab" * 5000, _json_like(100)])
def test_a_document_of_one_piece_is_what_the_library_makes_of_it_in_one_call(deflate, data: bytes):
    assert len(data) <= compression.PIECE_BYTES
    assert compress(data) == _gzip_of(deflate, data)
    if deflate is zlib:
        assert compress(data) == gzip.compress(data, compresslevel=6, mtime=0)


def test_zlib_ng_is_the_library_in_use_where_it_is_installed():
    """In a fresh interpreter, since the fixture here chooses the library."""
    probe = "from runicorn.format import compression; print(compression.DEFLATE.__name__)"
    chosen = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
    assert chosen.stdout.decode().strip() == "zlib_ng.zlib_ng"


def test_either_library_reads_what_the_other_wrote(small_pieces: int):
    data = _json_like(5000)
    for writer in LIBRARIES.values():
        compression.DEFLATE = writer  # the fixture's monkeypatch restores it
        packed = compress(data, threads=2)
        for reader in LIBRARIES.values():
            compression.DEFLATE = reader
            assert decompress_capped(packed, len(data)) == data


def test_pieces_join_into_one_gzip_stream_every_reader_accepts(small_pieces: int):
    data = _json_like(5000)
    assert len(data) > 20 * small_pieces
    packed = compress(data, threads=2)
    assert gzip.decompress(packed) == data
    assert decompress_capped(packed, len(data)) == data
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    assert inflater.decompress(packed) == data
    assert inflater.eof and inflater.unused_data == b""  # one member, not several


@pytest.mark.parametrize("length_in_pieces", [1.0, 2.0, 2.5, 7.3])
def test_the_bytes_do_not_depend_on_the_thread_count(small_pieces: int, length_in_pieces: float):
    data = _json_like(2000)[: int(length_in_pieces * small_pieces)]
    one = compress(data, threads=1)
    assert compress(data, threads=2) == one
    assert compress(data, threads=5) == one
    assert gzip.decompress(one) == data


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the library, unchanged
@given(cuts=st.lists(st.integers(0, 30_000), max_size=5), threads=st.sampled_from([1, 2]))
def test_a_document_given_in_parts_compresses_as_their_concatenation(deflate, cuts, threads):
    """How the generator hands over a manifest (header, experiments, brace): parts of any
    length, empty ones too, cut anywhere across the pieces."""
    data = _json_like(1000)
    bounds = [0, *sorted(cuts), len(data)]
    parts = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert b"".join(parts) == data
    original = compression.PIECE_BYTES
    compression.PIECE_BYTES = 4096  # hypothesis reruns the test: no function-scoped fixture
    try:
        assert compress(parts, threads=threads) == compress(data, threads=1)
        assert compress([bytearray(part) for part in parts]) == compress(data)
    finally:
        compression.PIECE_BYTES = original
    assert compress(parts) == _gzip_of(deflate, data)


def test_pieces_cost_little_compression(deflate, small_pieces: int):
    """Even at 4 KiB (a thousandth of the real piece size) the loss is small."""
    data = _json_like(20000)
    whole = len(_gzip_of(deflate, data))
    assert len(compress(data)) < whole * 1.5


def test_a_truncated_piece_stream_is_refused(small_pieces: int):
    packed = compress(_json_like(5000))
    with pytest.raises(ValueError, match="truncated"):
        decompress_capped(packed[: len(packed) // 2], 10**9)

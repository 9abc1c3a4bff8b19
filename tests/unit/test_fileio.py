"""runicorn._sys.fileio: positional reads that return fewer bytes only at EOF (``pread_upto``)
or never (``pread_exact``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runicorn._sys import fileio
from runicorn._sys.fileio import MAX_CHUNK, pread_exact, pread_upto

CONTENT = bytes(range(256)) * 40  # 10,240 bytes


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "data.bin"
    path.write_bytes(CONTENT)
    descriptor = os.open(path, os.O_RDONLY)
    yield descriptor
    os.close(descriptor)


def test_a_range_inside_the_file_is_read_whole(fd: int) -> None:
    assert pread_upto(fd, 100, 1000) == CONTENT[100:1100]
    assert pread_exact(fd, 100, 1000) == CONTENT[100:1100]


def test_a_range_crossing_eof_returns_everything_up_to_eof(fd: int) -> None:
    assert pread_upto(fd, len(CONTENT) - 10, 100) == CONTENT[-10:]


def test_a_range_at_or_past_eof_is_empty(fd: int) -> None:
    assert pread_upto(fd, len(CONTENT), 10) == b""
    assert pread_upto(fd, len(CONTENT) + 5000, 10) == b""


def test_zero_length_reads_nothing_even_past_eof(fd: int) -> None:
    assert pread_upto(fd, 0, 0) == b""
    assert pread_exact(fd, len(CONTENT) + 1, 0) == b""


def test_pread_exact_raises_eof_error_naming_where_the_file_ended(fd: int) -> None:
    with pytest.raises(EOFError, match=f"ends at byte {len(CONTENT)}"):
        pread_exact(fd, len(CONTENT) - 10, 100)


def test_negative_offset_or_length_is_refused(fd: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        pread_upto(fd, -1, 10)
    with pytest.raises(ValueError, match="negative"):
        pread_exact(fd, 0, -1)


def test_the_file_position_is_neither_used_nor_moved(fd: int) -> None:
    os.lseek(fd, 500, os.SEEK_SET)
    assert pread_upto(fd, 0, 10) == CONTENT[:10]
    assert os.lseek(fd, 0, os.SEEK_CUR) == 500


def test_short_reads_before_eof_are_retried(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pread that returns less than asked (as on NFS, or after a signal) is not EOF."""
    real_pread = os.pread
    calls: list[int] = []

    def stingy_pread(descriptor: int, length: int, offset: int) -> bytes:
        calls.append(length)
        return real_pread(descriptor, min(length, 7), offset)

    monkeypatch.setattr(fileio, "pread", stingy_pread)
    assert pread_upto(fd, 3, 50) == CONTENT[3:53]
    assert pread_exact(fd, len(CONTENT) - 20, 20) == CONTENT[-20:]
    assert len(calls) > 2


def test_a_large_length_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    """A generous length on a small file never asks the kernel for more than MAX_CHUNK."""
    big = os.urandom(MAX_CHUNK * 2 + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(big)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert pread_upto(descriptor, 0, 100 * MAX_CHUNK) == big
        assert pread_exact(descriptor, 1, len(big) - 1) == big[1:]
    finally:
        os.close(descriptor)


def test_a_bounded_chunk_is_what_each_call_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 10)
    asked: list[int] = []
    real_pread = os.pread

    def recording_pread(descriptor: int, length: int, offset: int) -> bytes:
        asked.append(length)
        return real_pread(descriptor, length, offset)

    monkeypatch.setattr(fileio, "pread", recording_pread)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert pread_upto(descriptor, 0, 10 * MAX_CHUNK) == b"x" * 10
    finally:
        os.close(descriptor)
    assert asked == [MAX_CHUNK, MAX_CHUNK]  # the data, then the empty answer that is EOF

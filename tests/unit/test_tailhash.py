"""Behaviour of ``hash_tails`` (runs on both backends through the ``backend`` fixture).

A request is ``(path relative to root, size, cut_at_newline)``; a result ``(size hashed up
to, 32-hex BLAKE3 digest)`` or ``None``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from blake3 import blake3


def tail_hash(data: bytes) -> str:
    return blake3(data).hexdigest(length=16)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "log.txt").write_bytes(b"first line\nsecond line\nhalf a li")
    (tmp_path / "complete.jsonl").write_bytes(b'{"a": 1}\n{"a": 2}\n')
    (tmp_path / "no-newline").write_bytes(b"x" * 50)
    (tmp_path / "big").write_bytes(bytes(range(256)) * 40)
    return tmp_path


def test_digest_is_blake3_of_the_last_window_bytes(backend, root):
    data = (root / "big").read_bytes()
    assert backend.hash_tails(str(root), [("big", len(data), False)]) == [
        (len(data), tail_hash(data[-4096:]))
    ]


def test_digest_is_32_hex_characters(backend, root):
    [(_, digest)] = backend.hash_tails(str(root), [("big", 10_240, False)])
    assert len(digest) == 32 and int(digest, 16) >= 0


def test_file_shorter_than_the_window_is_hashed_whole(backend, root):
    assert backend.hash_tails(str(root), [("no-newline", 50, False)]) == [
        (50, tail_hash(b"x" * 50))
    ]


def test_window_ends_at_the_recorded_size_not_at_the_end_of_file(backend, root):
    assert backend.hash_tails(str(root), [("big", 300, False)], window=100) == [
        (300, tail_hash((bytes(range(256)) * 2)[200:300]))
    ]


def test_cut_at_newline_drops_a_half_written_last_line(backend, root):
    size = len(b"first line\nsecond line\n")
    assert backend.hash_tails(str(root), [("log.txt", 32, True)]) == [
        (size, tail_hash(b"first line\nsecond line\n"))
    ]


def test_cut_at_newline_keeps_a_file_that_ends_with_a_complete_line(backend, root):
    data = (root / "complete.jsonl").read_bytes()
    assert backend.hash_tails(str(root), [("complete.jsonl", len(data), True)]) == [
        (len(data), tail_hash(data))
    ]


def test_cut_at_newline_finds_a_newline_several_windows_back(backend, root):
    assert backend.hash_tails(str(root), [("log.txt", 32, True)], window=3) == [
        (23, tail_hash(b"ne\n"))
    ]


def test_file_without_any_newline_is_cut_to_nothing(backend, root):
    assert backend.hash_tails(str(root), [("no-newline", 50, True)]) == [(0, tail_hash(b""))]


def test_file_now_shorter_than_its_recorded_size_has_no_hash(backend, root):
    assert backend.hash_tails(str(root), [("no-newline", 51, False)]) == [None]


def test_missing_file_has_no_hash(backend, root):
    assert backend.hash_tails(str(root), [("vanished.txt", 1, False)]) == [None]


def test_symbolic_link_is_not_followed(backend, root):
    os.symlink("big", root / "link")
    assert backend.hash_tails(str(root), [("link", 10, False)]) == [None]


def test_directory_has_no_hash(backend, root):
    (root / "media").mkdir()
    assert backend.hash_tails(str(root), [("media", 1, False)]) == [None]


def test_results_follow_the_order_of_the_requests(backend, root):
    results = backend.hash_tails(
        str(root), [("no-newline", 50, False), ("missing", 1, False), ("big", 5, False)]
    )
    assert [result and result[0] for result in results] == [50, None, 5]


def test_many_files_are_hashed_like_one_at_a_time(backend, root):
    for i in range(300):
        (root / f"f{i}").write_bytes(b"line\n" * i + b"tail")
    requests = [(f"f{i}", 5 * i + 4, bool(i % 2)) for i in range(300)]
    assert backend.hash_tails(str(root), requests) == [
        backend.hash_tails(str(root), [request])[0] for request in requests
    ]


def test_negative_size_is_rejected(backend, root):
    with pytest.raises(ValueError, match="size of 'big' must not be negative"):
        backend.hash_tails(str(root), [("big", -1, False)])


def test_window_below_one_byte_is_rejected(backend, root):
    with pytest.raises(ValueError, match="window must be at least 1 byte"):
        backend.hash_tails(str(root), [], window=0)


# --- MD5, the tail hash of manifests that name no algorithm (0.5.x generators) --------------


def test_md5_is_of_the_same_window(backend, root):
    import hashlib

    data = (root / "big").read_bytes()
    assert backend.hash_tails(str(root), [("big", len(data) - 7, False)], 4096, "md5") == [
        (len(data) - 7, hashlib.md5(data[-4096 - 7 : -7]).hexdigest())
    ]


def test_md5_cuts_at_a_newline_like_blake3(backend, root):
    import hashlib

    size = len(b"first line\nsecond line\nhalf a li")
    [(end, md5)] = backend.hash_tails(str(root), [("log.txt", size, True)], 4096, "md5")
    [(blake_end, _)] = backend.hash_tails(str(root), [("log.txt", size, True)])
    assert end == blake_end and md5 == hashlib.md5(b"first line\nsecond line\n").hexdigest()


@pytest.mark.parametrize("algorithm", ["sha256", "", "MD5"])
def test_unknown_algorithm_is_rejected(backend, root, algorithm):
    with pytest.raises(ValueError, match="unknown tail hash algorithm"):
        backend.hash_tails(str(root), [("big", 1, False)], 4096, algorithm)

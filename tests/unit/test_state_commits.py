"""When the sync commits its state: every ``BATCH_SIZE`` files, spaced while files land fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from runicorn.sync import transfer
from runicorn.sync.cache import FileRecord, LocalCacheManager


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(transfer.time, "monotonic", fake)
    return fake


def _batch(tmp_path: Path, batch_size: int = 5) -> tuple[transfer._StateBatch, LocalCacheManager]:
    cache = LocalCacheManager(tmp_path / "cache")
    return transfer._StateBatch(cache, "remote", batch_size), cache


def _land(batch: transfer._StateBatch, number: int, size: int = 10) -> None:
    batch.synced.append(FileRecord(f"p/n/runs/r/f{number}", size, 1.0, None))
    batch.bytes += size
    batch.maybe_flush()


def test_files_landing_fast_are_committed_together(tmp_path: Path, clock: _Clock) -> None:
    batch, cache = _batch(tmp_path)
    for number in range(1000):
        clock.now += 0.0001  # 10,000 files a second
        _land(batch, number)
    # 0.1 s of files: one commit when the first 0.05 s had passed, the rest still waiting
    assert len(cache.file_entries()) == 501
    assert len(batch.synced) == 499
    batch.flush()
    assert len(cache.file_entries()) == 1000


def test_slow_files_are_committed_every_batch_size(tmp_path: Path, clock: _Clock) -> None:
    batch, cache = _batch(tmp_path)
    for number in range(12):
        clock.now += 0.02
        _land(batch, number)
    # the 5th file came 0.1 s after the start, the 10th 0.1 s after that commit
    assert len(cache.file_entries()) == 10
    assert len(batch.synced) == 2


def test_large_files_are_committed_without_waiting(tmp_path: Path, clock: _Clock) -> None:
    batch, cache = _batch(tmp_path)
    for number in range(5):
        _land(batch, number, size=transfer.COMMIT_BYTES // 4)
    assert len(cache.file_entries()) == 5


def test_anything_waiting_is_committed_after_the_interval(tmp_path: Path, clock: _Clock) -> None:
    batch, cache = _batch(tmp_path, batch_size=1000)
    _land(batch, 0)
    assert cache.file_entries() == []
    clock.now += transfer.COMMIT_INTERVAL
    _land(batch, 1)
    assert len(cache.file_entries()) == 2

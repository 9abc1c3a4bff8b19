"""When the client puts what it wrote on the disk: once per sync, before the sync is done.

The state commits every few files so that a killed sync resumes; the in-progress mark set
before the first commit makes the next sync lstat every recorded file, which finds a file a
power loss cut short. So the one barrier that matters is the one before the mark is
cleared: these tests record the order of the barrier, the state commits and the mark.
No test can pull the power here; what is checked is the order that makes it safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.lab import Lab, assert_cache_equals_server, local_client, make_lab, server_files
from runicorn.core.backend import Backend
from runicorn.sync import transfer
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> Lab:
    return make_lab(tmp_path, backend, runs=4)




@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the sync did, in order: ``barrier``, ``commit`` (files recorded), ``done``."""
    seen: list[str] = []
    real_barrier = transfer.sync_file_system
    real_commit = LocalCacheManager.save_progress
    real_dirty = LocalCacheManager.set_dirty

    def barrier(path: str) -> bool:
        seen.append("barrier")
        return real_barrier(path)

    def commit(self: LocalCacheManager, **kwargs: object) -> None:
        if kwargs.get("synced"):
            seen.append("commit")
        real_commit(self, **kwargs)  # type: ignore[arg-type]

    def dirty(self: LocalCacheManager, value: bool) -> None:
        seen.append("start" if value else "done")
        real_dirty(self, value)

    monkeypatch.setattr(transfer, "sync_file_system", barrier)
    # a commit every BATCH_SIZE files, however fast they land, and the local copy's
    # chunks (recorded a chunk at a time) small: several commits to order
    monkeypatch.setattr(transfer, "COMMIT_SPACING", 0.0)
    monkeypatch.setattr(transfer, "COPY_CHUNK_FILES", 5)
    monkeypatch.setattr(LocalCacheManager, "save_progress", commit)
    monkeypatch.setattr(LocalCacheManager, "set_dirty", dirty)
    return seen


def test_one_barrier_after_the_last_commit_and_before_the_sync_is_done(
    lab: Lab, tmp_path: Path, events: list[str]
) -> None:
    cache = tmp_path / "cache"
    stats = local_client(lab, cache).sync()

    # several commits, so that the order below means something
    assert stats["files_synced"] > ManifestSyncClient.BATCH_SIZE
    assert events.count("barrier") == 1
    assert events.count("commit") >= 2
    last_commit = len(events) - 1 - events[::-1].index("commit")
    assert events.index("start") < events.index("commit")
    assert last_commit < events.index("barrier") < events.index("done")
    assert_cache_equals_server(lab.root, cache)


def test_flushes_ahead_leave_the_last_barrier_after_the_last_commit(
    lab: Lab, tmp_path: Path, events: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flushes during the sync (every byte, here) come on top of the one that ends it."""
    monkeypatch.setattr(transfer, "FLUSH_AHEAD_BYTES", 1)
    cache = tmp_path / "cache"
    stats = local_client(lab, cache).sync()

    assert stats["files_synced"] > ManifestSyncClient.BATCH_SIZE
    assert events.count("barrier") >= 2  # at least one ahead, and the last one
    last_commit = len(events) - 1 - events[::-1].index("commit")
    last_barrier = len(events) - 1 - events[::-1].index("barrier")
    assert last_commit < last_barrier < events.index("done")
    assert_cache_equals_server(lab.root, cache)


def test_a_sync_that_writes_nothing_needs_no_barrier(
    lab: Lab, tmp_path: Path, events: list[str]
) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    events.clear()

    stats = local_client(lab, cache).sync()

    assert stats["files_synced"] == 0
    assert "barrier" not in events


def test_without_syncfs_every_written_file_is_fsynced_once(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "syncfs_available", lambda: False)
    monkeypatch.setattr(transfer, "sync_file_system", lambda path: False)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(transfer.os, "fsync", fsync)
    cache = tmp_path / "cache"

    stats = local_client(lab, cache).sync()

    written = {(cache / path).stat().st_ino for path in server_files(lab.root)}
    assert stats["files_synced"] == len(written)
    assert written <= set(synced)  # (the state database may fsync files of its own)
    assert_cache_equals_server(lab.root, cache)

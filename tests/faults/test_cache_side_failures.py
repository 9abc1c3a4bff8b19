"""Failures on this side (the cache, its disk, its lock) and the generator's own files.

Issue 20, items 3 to 5: a broken state database or a cache held by another sync is
reported as the cache's problem and never sends the service into a legacy walk of the
server; a sync that would not fit on the cache's disk says so before fetching; an append
never writes through a hard link; ``remove_run`` removes exactly one run's records; the
generator refuses a symlinked ``.runicorn`` directory or lock file and publishes with the
umask's modes. Over the local remote: what is tested is this side, not the transport.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.lab import Lab, assert_cache_equals_server, local_client, local_service, make_lab
from runicorn._sys.atomic import exclusive_lock
from runicorn.core.backend import Backend
from runicorn.format.layout import MANIFEST_DIRNAME
from runicorn.manifest import ManifestGenerator
from runicorn.sync.cache import LOCK_NAME, CacheError, FileRecord, LocalCacheManager
from runicorn.sync.cache.state_db import RunRecord


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> Lab:
    return make_lab(tmp_path, backend, runs=4)






# --------------------------------------------------------------------------- the cache's errors


def test_a_broken_state_database_is_the_caches_error_and_no_legacy_walk_follows(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    client = local_client(lab, cache)
    client.sync()
    client.close()
    (cache / ".runicorn-cache" / "state.sqlite3").write_bytes(b"not a database at all " * 100)
    for suffix in ("-wal", "-shm"):
        (cache / ".runicorn-cache" / f"state.sqlite3{suffix}").unlink(missing_ok=True)

    with pytest.raises(CacheError, match=r"the cache.s state database .*state.sqlite3 failed"):
        local_client(lab, cache).sync()

    service = local_service(lab, cache)
    assert service.sync_all() is False
    assert service.fallback_reason is None, "a cache failure sent the service to the server"
    assert service.progress.mode == "manifest"
    assert "state database" in (service.progress.last_error or "")


def test_a_lock_held_by_another_sync_times_out_with_a_message(lab: Lab, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    with exclusive_lock(cache / ".runicorn-cache" / LOCK_NAME):
        with pytest.raises(CacheError, match=r"another sync .* for more than 0.2 s"):
            local_client(lab, cache, lock_timeout=0.2).sync()
        service = local_service(lab, cache, lock_timeout=0.2)
        assert service.sync_all() is False
        assert service.fallback_reason is None
        assert "--lock-timeout" in (service.progress.last_error or "")


def test_files_that_would_not_fit_on_the_disk_fail_before_they_are_fetched(
    lab: Lab, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    real = os.statvfs

    def nearly_full(path: object) -> os.statvfs_result:
        result = real(path)  # type: ignore[arg-type]
        fields = list(result)
        fields[3] = fields[4] = 10  # f_bfree, f_bavail: ten blocks
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", nearly_full)
    stats = local_client(lab, cache).sync()
    monkeypatch.undo()

    assert stats["files_synced"] == 0
    assert stats["failed_count"] == lab.info.listed_files
    assert all(
        "not enough free space on the cache's disk" in reason
        for reason in stats["failed_files"].values()
    )
    assert [path.name for path in cache.iterdir()] == [".runicorn-cache"]
    assert stats["bytes_downloaded"] < 1024 * 1024  # the manifest only: no file was read
    stats = local_client(lab, cache).sync()
    assert stats["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def test_an_unwritable_cache_is_named_as_the_cache_not_the_server(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.write_bytes(b"a file where the cache directory should be")
    service = local_service(lab, tmp_path / "cache")
    assert service.sync_all() is False
    assert service.fallback_reason is None
    assert "cannot use the cache directory" in (service.progress.last_error or "")


# --------------------------------------------------------------------------- hard links, remove_run


def test_an_append_never_writes_through_a_hard_link(lab: Lab, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    log = next(path for path in sorted(cache.rglob("events.jsonl")))
    relative = log.relative_to(cache).as_posix()
    backup = tmp_path / "backup-events.jsonl"
    os.link(log, backup)  # what `cp -al cache backup` makes
    before = backup.read_bytes()
    with open(lab.root / relative, "a") as handle:
        handle.write('{"step": 999}\n')
    lab.publish(now=lab.now + 60)

    stats = local_client(lab, cache).sync()

    assert stats["incremental_count"] >= 1
    assert backup.read_bytes() == before
    assert log.read_bytes() == (lab.root / relative).read_bytes()
    assert log.stat().st_nlink == 1


def test_remove_run_removes_exactly_its_own_records(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    runs = [("p", "e", "r_1"), ("P", "E", "R_1"), ("p", "e", "rx1"), ("p", "e", "r_10")]
    cache.save_runs("remote", [RunRecord(*key, "finished", 1.0, 1.0, None, 1.0) for key in runs])
    cache.state.save_progress(
        remote_id="remote",
        synced=[FileRecord(f"{p}/{e}/runs/{r}/meta.json", 1, 1.0, None) for p, e, r in runs],
        failed=[(f"{p}/{e}/runs/{r}/logs.txt", "x") for p, e, r in runs],
    )

    assert cache.remove_run("p", "e", "r_1") is True

    assert sorted(entry[0] for entry in cache.file_entries()) == [
        "P/E/runs/R_1/meta.json",
        "p/e/runs/r_10/meta.json",
        "p/e/runs/rx1/meta.json",
    ]
    assert sorted(failure.path for failure in cache.failed_files()) == [
        "P/E/runs/R_1/logs.txt",
        "p/e/runs/r_10/logs.txt",
        "p/e/runs/rx1/logs.txt",
    ]
    cache.close()


# --------------------------------------------------------------------------- the generator's files


def test_a_symlinked_manifest_directory_is_refused(lab: Lab, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    manifests = lab.root / MANIFEST_DIRNAME
    for item in manifests.iterdir():
        item.unlink()
    manifests.rmdir()
    manifests.symlink_to(elsewhere)

    with pytest.raises(Exception, match="is a symbolic link; refusing to publish through it"):
        ManifestGenerator(lab.root, backend=lab.backend).generate()
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_lock_file_is_refused(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    lock = lab.root / MANIFEST_DIRNAME / ".full_manifest.json.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    before = (lab.root / MANIFEST_DIRNAME / "full_manifest.json").read_bytes()

    with pytest.raises(Exception, match="lock file is a symbolic link"):
        ManifestGenerator(lab.root, backend=lab.backend).generate()
    assert not target.exists()
    assert (lab.root / MANIFEST_DIRNAME / "full_manifest.json").read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_published_files_get_the_umasks_modes(
    tmp_path: Path, backend: Backend, umask: int
) -> None:
    lab = make_lab(tmp_path, backend, runs=2, publish=False)
    previous = os.umask(umask)
    try:
        lab.publish()
    finally:
        os.umask(previous)
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        mode = stat.S_IMODE((lab.root / MANIFEST_DIRNAME / name).stat().st_mode)
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"

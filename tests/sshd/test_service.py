"""MetadataSyncService: manifest first, the legacy walk only when the manifest cannot be used,
and never two syncs at once."""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import orjson
import paramiko
import pytest

from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator
from runicorn.remote_storage import MetadataSyncService, SyncProgress
from runicorn.sync import service as service_module
from runicorn.sync.cache import STATE_DIRNAME, LocalCacheManager

pytestmark = pytest.mark.sshd

NOW = 1_700_000_000.0


@pytest.fixture
def lab(tmp_path: Path) -> LabInfo:
    return build_sample_lab(tmp_path / "lab", runs=10, seed=11, now=NOW)


@pytest.fixture
def cache(tmp_path: Path) -> LocalCacheManager:
    return LocalCacheManager(tmp_path / "cache")


@pytest.fixture
def make_service(backend: Backend, sftp: paramiko.SFTPClient, lab: LabInfo, cache):
    def make(**options) -> MetadataSyncService:
        options.setdefault("manifest_sync_jitter", 0.0)
        return MetadataSyncService(None, sftp, str(lab.root), cache, backend=backend, **options)

    return make


def _tree(root: Path) -> dict[str, bytes]:
    files = {}
    for directory, dirnames, filenames in os.walk(root):
        if Path(directory) == root:
            dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
        for name in filenames:
            path = Path(directory, name)
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def _server_tree(lab: LabInfo) -> dict[str, bytes]:
    return {
        f"{run.rel}/{path}": (run.path / path).read_bytes()
        for run in lab.listed_runs
        for path in run.synced_files
    }


def _publish(lab: LabInfo, backend: Backend) -> Path:
    _, path = ManifestGenerator(lab.root, backend=backend).generate()
    return path


def _replace_manifest(path: Path, document: bytes) -> None:
    path.write_bytes(document)
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(document))


def test_manifest_sync_is_used_when_the_manifest_is_valid(
    make_service, lab: LabInfo, backend: Backend, cache
) -> None:
    _publish(lab, backend)
    service = make_service()
    assert service.sync_all()
    assert service.progress.mode == "manifest"
    assert service.fallback_reason is None
    assert _tree(cache.root_dir) == _server_tree(lab)


def test_missing_manifest_falls_back_to_the_legacy_walk(make_service, lab: LabInfo, cache) -> None:
    service = make_service()
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert "missing or unreachable" in (service.fallback_reason or "")
    assert _tree(cache.root_dir) == _server_tree(lab)


def test_invalid_manifest_falls_back_to_the_legacy_walk(
    make_service, lab: LabInfo, backend: Backend, cache
) -> None:
    _replace_manifest(_publish(lab, backend), b'{"format_version": "1.0", "revision": ')
    service = make_service()
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert "invalid" in (service.fallback_reason or "")
    assert _tree(cache.root_dir) == _server_tree(lab)


@pytest.mark.parametrize("hostile_path", ["../../escaped.txt", "/etc/escaped.txt"])
def test_hostile_manifest_falls_back_and_writes_nothing_outside_the_cache(
    make_service, lab: LabInfo, backend: Backend, cache, tmp_path: Path, hostile_path: str
) -> None:
    path = _publish(lab, backend)
    document = orjson.loads(path.read_bytes())
    document["experiments"][0]["files"][0]["path"] = hostile_path
    _replace_manifest(path, orjson.dumps(document))
    service = make_service()
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    assert not Path("/etc/escaped.txt").exists()
    assert _tree(cache.root_dir) == _server_tree(lab)


def test_no_change_does_not_fall_back(
    make_service, lab: LabInfo, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(lab, backend)
    assert make_service().sync_all()

    def no_walk(*_args, **_kwargs):
        raise AssertionError("the legacy walk ran although the manifest said nothing changed")

    monkeypatch.setattr(service_module, "walk_remote", no_walk)
    service = make_service()
    assert service.sync_all()
    assert service.last_stats is not None and service.last_stats["skipped"]
    assert service.progress.mode == "manifest"


def test_legacy_only_service_never_reads_the_manifest(
    make_service, lab: LabInfo, backend: Backend, cache
) -> None:
    _publish(lab, backend)
    service = make_service(use_manifest_sync=False)
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert service.fallback_reason is None


def test_unreadable_root_fails_both_ways_and_returns_false(
    backend: Backend, sftp: paramiko.SFTPClient, cache, tmp_path: Path
) -> None:
    service = MetadataSyncService(
        None, sftp, str(tmp_path / "missing"), cache, manifest_sync_jitter=0.0, backend=backend
    )
    assert service.sync_all() is False
    assert service.last_stats is None
    assert service.progress.phase == "failed"
    assert "cannot list the remote experiments root" in (service.progress.last_error or "")


def test_progress_reports_files_bytes_and_totals(
    make_service, lab: LabInfo, backend: Backend
) -> None:
    _publish(lab, backend)
    seen: list[SyncProgress] = []
    service = make_service(on_progress=seen.append)
    assert service.sync_all()
    stats = service.last_stats
    assert stats is not None
    progress = service.progress
    assert progress.phase == "done"
    assert progress.synced_files == stats["files_synced"] == lab.listed_files
    assert progress.total_files == lab.listed_files
    assert progress.synced_bytes == stats["bytes_downloaded"]
    completed = [p.synced_files for p in seen if p.phase == "transferring"]
    assert completed == sorted(completed)
    assert completed[-1] == lab.listed_files


def test_a_second_concurrent_sync_all_returns_false_at_once(
    make_service, lab: LabInfo, backend: Backend
) -> None:
    _publish(lab, backend)
    inside = threading.Event()
    release = threading.Event()

    def hold(progress: SyncProgress) -> None:
        if progress.phase == "transferring" and not inside.is_set():
            inside.set()
            release.wait(timeout=60)

    service = make_service(on_progress=hold)
    results: list[bool] = []
    first = threading.Thread(target=lambda: results.append(service.sync_all()))
    first.start()
    try:
        assert inside.wait(timeout=60)
        assert service.is_running
        assert service.sync_all() is False
    finally:
        release.set()
        first.join(timeout=60)
    assert results == [True]
    assert service.last_stats is not None and service.last_stats["failed_count"] == 0


def test_waiting_sync_all_calls_run_one_after_the_other(
    make_service, lab: LabInfo, backend: Backend
) -> None:
    _publish(lab, backend)
    lock = threading.Lock()
    running = [0]
    overlap = [0]
    original = MetadataSyncService._sync_locked

    def counting(self: MetadataSyncService) -> bool:
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        try:
            return original(self)
        finally:
            with lock:
                running[0] -= 1

    service = make_service()
    service._sync_locked = counting.__get__(service)  # type: ignore[method-assign]
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(service.sync_all(wait=True)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [True, True, True]
    assert overlap[0] == 1

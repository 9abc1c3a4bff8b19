"""Syncing an SDK 0.6+ root (``runs/<path...>/<run_id>/``) over a real sshd, on both backends:
by manifest and by the legacy walk, with appends, deletions and the upstream viewer's recycle
bin; the SDK's root index and archive never reach the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import paramiko
import pytest

from harness.lab import (
    NOW,
    assert_cache_equals_server,
    cache_files,
    make_client,
    make_lab,
    server_files,
)
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import training_step
from runicorn.format import layout
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.service import MetadataSyncService

pytestmark = pytest.mark.sshd

RUNS_PATH = layout.LAYOUT_RUNS_PATH


def _add_archive(root: Path) -> None:
    (root / "archive" / "blobs").mkdir(parents=True)
    (root / "archive" / "blobs" / "0f1e2d").write_bytes(b"code snapshot")


def _nothing_outside_runs(cache: Path) -> None:
    files = cache_files(cache)
    assert files
    assert all(path.startswith("runs/") for path in files), sorted(files)[:3]
    assert not [path for path in files if path.startswith("runs/.recycle/")]
    assert not [path for path in files if path.rsplit("/", 1)[-1].startswith("runicorn.db")]


def test_manifest_sync_mirrors_every_run_file_of_a_runs_path_root(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=12, run_layout=RUNS_PATH, publish=False)
    _add_archive(lab.root)
    manifest = lab.publish()
    assert {exp.project for exp in manifest.experiments} == {"runs"}
    assert len(manifest.experiments) == len(lab.info.listed_runs)
    cache = tmp_path / "cache"
    stats = make_client(sftp, lab.root, cache, backend).sync()
    assert stats["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)
    _nothing_outside_runs(cache)
    cached = {run.run_id: run for run in LocalCacheManager(cache).list_runs()}
    for run in lab.info.listed_runs:
        entry = cached[run.run_id]
        assert (entry.project, entry.name, entry.status) == ("runs", run.name, run.status)
        assert entry.path == cache / run.rel and entry.path.is_dir()
        assert entry.size == sum(run.synced_files.values())


def test_appends_and_new_runs_of_a_runs_path_root_are_synced_incrementally(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=10, run_layout=RUNS_PATH)
    cache = tmp_path / "cache"
    make_client(sftp, lab.root, cache, backend).sync()
    step = training_step(lab.root, seed=3, now=NOW + 300)
    lab.publish(now=NOW + 300)
    stats = make_client(sftp, lab.root, cache, backend, delete=True).sync()
    assert stats["failed_count"] == 0
    grown = [path for path in step.appended if path.startswith("runs/")]
    assert grown and stats["incremental_count"] >= len(grown)
    assert step.gone_runs() and all(not (cache / rel).exists() for rel in step.gone_runs())
    assert_cache_equals_server(lab.root, cache)


def test_a_run_deleted_or_recycled_on_the_server_leaves_only_its_own_directory(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=12, run_layout=RUNS_PATH)
    cache = tmp_path / "cache"
    make_client(sftp, lab.root, cache, backend).sync()
    removed, recycled = [r for r in lab.info.listed_runs if r.status != "running"][:2]
    shutil.rmtree(removed.path)
    (lab.root / "runs" / ".recycle").mkdir(exist_ok=True)
    recycled.path.rename(lab.root / "runs" / ".recycle" / recycled.run_id)
    lab.publish(now=NOW + 60)
    stats = make_client(sftp, lab.root, cache, backend, delete=True).sync()
    assert stats["failed_count"] == 0
    assert not (cache / removed.rel).exists() and not (cache / recycled.rel).exists()
    assert (cache / removed.rel).parent.is_dir()  # the path components stay
    assert_cache_equals_server(lab.root, cache)


def test_legacy_walk_of_a_runs_path_root_gives_the_manifest_sync_cache(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=10, run_layout=RUNS_PATH, publish=False)
    _add_archive(lab.root)
    cache = LocalCacheManager(tmp_path / "cache")
    service = MetadataSyncService(
        None, sftp, str(lab.root), cache, use_manifest_sync=False, backend=backend
    )
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert cache_files(cache.root_dir) == server_files(lab.root)
    _nothing_outside_runs(cache.root_dir)
    statuses = {run.run_id: (run.name, run.status) for run in cache.list_runs()}
    assert statuses == {run.run_id: (run.name, run.status) for run in lab.info.listed_runs}


def test_both_layouts_on_one_root_are_both_mirrored(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=6, publish=False)
    old_style = tmp_path / "other"
    make_lab(old_style, backend, runs=6, run_layout=RUNS_PATH, publish=False)
    shutil.move(old_style / "lab" / "runs", lab.root / "runs")
    manifest = lab.publish()
    assert {exp.path is None for exp in manifest.experiments} == {True, False}
    cache = tmp_path / "cache"
    assert make_client(sftp, lab.root, cache, backend).sync()["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)

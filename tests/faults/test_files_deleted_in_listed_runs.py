"""Files deleted on the server inside a run it still lists (issue 20).

Without ``delete`` they stay in the cache, as runs do; with it they go, and their records
with them, so that the cache equals the server again. Runs outside the selection and paths
the manifest reports as problems are never touched. Over the local remote, both backends:
what is tested is the client's decision, not the transport.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.lab import (
    Lab,
    assert_cache_equals_server,
    cache_files,
    local_client,
    make_lab,
    server_files,
)
from runicorn.core.backend import Backend
from runicorn.remote_storage import MetadataSyncService
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.stats import SyncStats
from runicorn.transport.local_remote import LocalRemote


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> Lab:
    return make_lab(tmp_path, backend, runs=6)




def _media_file(lab: Lab) -> str:
    """A media file of a run that keeps other files (the run stays listed)."""
    return next(
        path.relative_to(lab.root).as_posix()
        for path in sorted(lab.root.rglob("*"))
        if path.is_file() and "media" in path.relative_to(lab.root).parts
    )


def test_a_file_deleted_on_the_server_stays_without_delete_and_goes_with_it(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    gone = _media_file(lab)
    kept_bytes = (cache / gone).read_bytes()
    (lab.root / gone).unlink()
    lab.publish(now=lab.now + 60)

    kept = local_client(lab, cache).sync()
    assert (cache / gone).read_bytes() == kept_bytes
    assert "files_deleted" not in kept

    preview = local_client(lab, cache, delete=True, dry_run=True).sync()
    assert preview["files_deleted"] == 1
    assert (cache / gone).exists()

    deleted = local_client(lab, cache, delete=True).sync()
    assert deleted["files_deleted"] == 1
    assert deleted["failed_count"] == 0
    assert not (cache / gone).exists()
    assert_cache_equals_server(lab.root, cache)

    # The record went with the file: the next sync neither fetches nor misses it.
    again = local_client(lab, cache, delete=True).sync()
    assert again["files_synced"] == 0
    assert again.get("files_deleted", 0) == 0


def test_files_of_runs_outside_the_selection_are_never_deleted(lab: Lab, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    gone = _media_file(lab)
    project = gone.split("/")[0]
    others = sorted({p.name for p in lab.root.iterdir() if p.is_dir()} - {project, ".runicorn"})
    assert others, "the lab needs a second project"
    (lab.root / gone).unlink()
    lab.publish(now=lab.now + 60)

    stats = local_client(lab, cache, delete=True, projects=[others[0]]).sync()

    assert stats.get("files_deleted", 0) == 0
    assert (cache / gone).exists()


def test_a_file_under_a_problem_path_is_kept(lab: Lab, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    local_client(lab, cache).sync()
    gone = _media_file(lab)
    (lab.root / gone).unlink()
    manifest = lab.publish(now=lab.now + 60)
    # What a scan that could not read the media directory reports (as root, chmod 000 does
    # not stop a scan here, so the problem is written into the published manifest).
    media_dir = gone.rsplit("/", 1)[0]
    problem = type(manifest).from_json(manifest.to_json())
    problem.problems = [(media_dir, "unreadable: Permission denied")]
    (lab.manifest_dir / "full_manifest.json").write_bytes(problem.to_json())
    (lab.manifest_dir / "full_manifest.json.gz").unlink(missing_ok=True)

    stats = local_client(lab, cache, delete=True).sync()

    assert stats.get("files_deleted", 0) == 0
    assert (cache / gone).exists()


def _legacy_sync(lab: Lab, cache: Path, *, delete: bool, dry_run: bool = False) -> SyncStats:
    """A legacy walk of the lab (no manifest read), as ``runicorn sync --legacy`` does."""
    manager = LocalCacheManager(cache)
    remote = LocalRemote(lab.root)
    try:
        service = MetadataSyncService(
            None,
            None,
            str(lab.root),
            manager,
            use_manifest_sync=False,
            delete=delete,
            dry_run=dry_run,
            remote=remote,
            backend=lab.backend,
        )
        assert service.sync_all()
    finally:
        remote.close()
        manager.close()
    assert service.progress.mode == "legacy"
    assert service.last_stats is not None
    return service.last_stats


def test_the_legacy_walk_deletes_files_of_listed_runs_only_with_delete(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _legacy_sync(lab, cache, delete=False)
    gone = _media_file(lab)
    kept_bytes = (cache / gone).read_bytes()
    (lab.root / gone).unlink()

    kept = _legacy_sync(lab, cache, delete=False)
    assert (cache / gone).read_bytes() == kept_bytes
    assert "files_deleted" not in kept

    preview = _legacy_sync(lab, cache, delete=True, dry_run=True)
    assert preview["files_deleted"] == 1
    assert (cache / gone).exists()

    deleted = _legacy_sync(lab, cache, delete=True)
    assert deleted["files_deleted"] == 1
    assert deleted["failed_count"] == 0
    assert not (cache / gone).exists()
    # (The walk sees whole-second mtimes: the bytes are compared, not the mtimes.)
    assert cache_files(cache) == server_files(lab.root)

    again = _legacy_sync(lab, cache, delete=True)
    assert again["files_synced"] == 0
    assert again.get("files_deleted", 0) == 0


def test_an_incomplete_legacy_walk_deletes_no_file(lab: Lab, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _legacy_sync(lab, cache, delete=False)
    gone = _media_file(lab)
    (lab.root / gone).unlink()
    # A name the walk skips makes it incomplete: nothing may be deleted then.
    other = next(run for run in lab.info.listed_runs if not gone.startswith(run.rel + "/"))
    (other.path / "bell\x07name.txt").write_bytes(b"skipped by the name rule")

    stats = _legacy_sync(lab, cache, delete=True)

    assert stats.get("files_deleted", 0) == 0
    assert (cache / gone).exists()

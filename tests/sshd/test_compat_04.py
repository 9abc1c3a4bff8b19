"""Code written against Runicorn 0.4.x keeps running (issue 21, item 6), over a real sshd:
``from runicorn.remote_storage import LocalCacheManager`` and the service's ``legacy_*``
keywords, honoured as a selection of the legacy walk (or ignored with a warning)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import paramiko
import pytest

from harness.lab import Lab, cache_files, server_files
from runicorn.core.backend import Backend
from runicorn.sync.service import LEGACY_ACTIVE_WINDOW

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=10)]


def _service(sftp: paramiko.SFTPClient, lab: Lab, cache_dir: Path, backend: Backend, **kw):
    from runicorn.remote_storage import LocalCacheManager, MetadataSyncService

    return MetadataSyncService(
        None,
        sftp,
        str(lab.root),
        LocalCacheManager(cache_dir),
        manifest_sync_jitter=0.0,
        backend=backend,
        **kw,
    )


def _files_of(lab: Lab, runs: list) -> dict[str, bytes]:
    prefixes = tuple(run.rel + "/" for run in runs)
    return {p: d for p, d in server_files(lab.root).items() if p.startswith(prefixes)}


def _newest(run) -> float:
    return max(run.created_at, run.updated_at)


def test_local_cache_manager_imports_from_remote_storage_and_syncs(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    from runicorn.remote_storage import LocalCacheManager
    from runicorn.sync.cache import LocalCacheManager as current

    assert LocalCacheManager is current
    service = _service(sftp, lab, tmp_path / "cache", backend)
    assert service.sync_all()
    assert cache_files(tmp_path / "cache") == server_files(lab.root)
    runs = LocalCacheManager(tmp_path / "cache").list_runs()
    assert len(runs) == len(lab.info.listed_runs)


def test_legacy_max_experiments_walks_the_most_recent_runs(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    # the walk's updated_at is a run's newest file time, as the lab records it
    newest = sorted(lab.info.listed_runs, key=lambda r: r.updated_at, reverse=True)
    assert newest[2].updated_at > newest[3].updated_at
    service = _service(
        sftp, lab, tmp_path / "cache", backend, use_manifest_sync=False, legacy_max_experiments=3
    )
    assert service.sync_all()

    assert cache_files(tmp_path / "cache") == _files_of(lab, newest[:3])
    assert service.last_stats is not None
    assert service.last_stats["runs_filtered_out"] == len(newest) - 3


def test_legacy_active_only_walks_the_runs_of_the_recent_window(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    runs = sorted(lab.info.listed_runs, key=lambda r: r.updated_at)
    cut = len(runs) // 2
    while cut < len(runs) and runs[cut].updated_at - runs[cut - 1].updated_at < 2:
        cut += 1
    assert cut < len(runs)
    window = time.time() - (runs[cut - 1].updated_at + runs[cut].updated_at) / 2
    service = _service(
        sftp,
        lab,
        tmp_path / "cache",
        backend,
        use_manifest_sync=False,
        legacy_active_only=True,
        legacy_recent_seconds=window,
    )
    assert service.sync_all()
    # created_at of a walked run is its oldest file time: never newer than updated_at
    assert cache_files(tmp_path / "cache") == _files_of(lab, runs[cut:])


def test_legacy_keywords_leave_the_manifest_path_alone(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    service = _service(
        sftp, lab, tmp_path / "cache", backend, legacy_active_only=True, legacy_max_experiments=1
    )
    assert service.sync_all()
    assert service.progress.mode == "manifest"
    assert cache_files(tmp_path / "cache") == server_files(lab.root)


def test_legacy_recent_seconds_alone_is_ignored_with_a_deprecation_warning(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    with pytest.warns(DeprecationWarning, match="only with legacy_active_only=True"):
        service = _service(
            sftp,
            lab,
            tmp_path / "cache",
            backend,
            use_manifest_sync=False,
            legacy_recent_seconds=60.0,
        )
    assert service.legacy_selection.is_everything
    assert service.sync_all()
    assert cache_files(tmp_path / "cache") == server_files(lab.root)


def _bare(tmp_path: Path, backend: Backend, **keywords):
    """A service built but never run: what its constructor makes of the keywords."""
    from runicorn.remote_storage import LocalCacheManager, MetadataSyncService

    return MetadataSyncService(
        None, None, "/nowhere", LocalCacheManager(tmp_path / "cache"), backend=backend, **keywords
    )


def test_legacy_active_only_defaults_to_the_generators_window(
    tmp_path: Path, backend: Backend
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # honoured keywords warn nothing
        service = _bare(tmp_path, backend, legacy_active_only=True)
    assert service.legacy_selection.since == LEGACY_ACTIVE_WINDOW == 3600.0
    assert service.selection.is_everything  # the manifest path is not narrowed


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("legacy_recent_seconds", 0),
        ("legacy_recent_seconds", -5.0),
        ("legacy_max_experiments", 0),
        ("legacy_max_experiments", True),
    ],
)
def test_bad_legacy_values_are_refused(
    tmp_path: Path, backend: Backend, keyword: str, value: object
) -> None:
    with pytest.raises(ValueError, match=keyword):
        _bare(tmp_path, backend, legacy_active_only=True, **{keyword: value})

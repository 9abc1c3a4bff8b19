"""Runs and files whose paths differ only in case, synced to a case-insensitive client
(macOS, Windows: the platform forced): the later twin is left out and reported, and never
overwrites the run or file the cache holds -- by manifest over a real sshd, by the legacy
walk, and from a local directory.

The name rule already leaves the later of two twins out of every manifest a client reads
(and of the legacy walk's), so a twin reaches a client when its cache holds the other one
from an earlier sync: the server renamed a run or a file, or kept the old one beside it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import paramiko
import pytest

from harness.lab import Lab, cache_files, make_client, make_lab, server_files
from runicorn.core.backend import Backend
from runicorn.remote_storage import MetadataSyncService
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.cache import tree as tree_module
from runicorn.sync.stats import SyncStats
from runicorn.transport.local_remote import LocalRemote

pytestmark = [pytest.mark.sshd]


def _add_twins(lab: Lab) -> dict[str, str]:
    """A copy of a finished run under a name differing only in case (its log rewritten, so
    a mix-up would show), and a file beside one of another run differing only in case:
    ``{twin: original}``, runs as prefixes."""
    finished = [run for run in lab.info.listed_runs if run.status == "finished"]
    run = finished[0].rel
    run_twin = run.replace(finished[0].name, finished[0].name.title(), 1)
    file = f"{finished[1].rel}/media/loss_curve_epoch001.png"
    file_twin = f"{finished[1].rel}/media/Loss_Curve_epoch001.png"
    assert run_twin != run and (lab.root / file).is_file()
    shutil.copytree(lab.root / run, lab.root / run_twin)
    (lab.root / run_twin / "logs.txt").write_bytes(b"the twin's own log\n")
    (lab.root / file_twin).write_bytes(b"not the loss curve")
    lab.publish(now=lab.now + 60)
    return {run_twin + "/": run + "/", file_twin: file}


def _sync(
    how: str, lab: Lab, cache: Path, backend: Backend, request: pytest.FixtureRequest
) -> SyncStats:
    manager = LocalCacheManager(cache)
    local = how.startswith("local")
    remote = LocalRemote(str(lab.root)) if local else None
    sftp = None if local else request.getfixturevalue("sftp")
    try:
        service = MetadataSyncService(
            None,
            sftp,
            str(lab.root),
            manager,
            manifest_sync_jitter=0.0,
            use_manifest_sync=not how.endswith("legacy"),
            remote=remote,
            backend=backend,
        )
        assert service.sync_all()
    finally:
        if remote is not None:
            remote.close()
        manager.close()
    assert service.last_stats is not None
    assert service.progress.mode == ("legacy" if how.endswith("legacy") else "manifest")
    return service.last_stats


def _without(files: dict[str, bytes], *left_out: str) -> dict[str, bytes]:
    return {
        path: data
        for path, data in files.items()
        if not any(path == out or path.startswith(out + "/") for out in left_out)
    }


@pytest.mark.parametrize("platform", ["darwin", "win32"])
@pytest.mark.parametrize("how", ["sftp", "legacy", "local"])
def test_a_twin_never_overwrites_what_the_cache_holds(
    tmp_path: Path,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    platform: str,
    how: str,
) -> None:
    monkeypatch.setattr(tree_module, "CLIENT_PLATFORM", platform)
    lab = make_lab(tmp_path, backend, runs=4)
    cache = tmp_path / "cache"
    first = _sync(how, lab, cache, backend, request)
    assert "case_twins" not in first and first["failed_count"] == 0
    twins = _add_twins(lab)

    # The twins sort before what the cache holds, and still the cache's copies stay.
    stats = _sync(how, lab, cache, backend, request)

    assert stats["case_twins"] == twins
    assert stats["failed_count"] == 0
    left_out = [path.rstrip("/") for path in twins]
    assert cache_files(cache) == _without(server_files(lab.root), *left_out)
    recorded = LocalCacheManager(cache).list_runs()  # the twin run is not among them
    assert sorted(run.name for run in recorded) == sorted(r.name for r in lab.info.listed_runs)


def test_a_renamed_run_arrives_once_delete_removed_the_old_name(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch, sftp: paramiko.SFTPClient
) -> None:
    monkeypatch.setattr(tree_module, "CLIENT_PLATFORM", "darwin")
    lab = make_lab(tmp_path, backend, runs=4)
    cache = tmp_path / "cache"
    finished = next(run for run in lab.info.listed_runs if run.status == "finished")
    renamed = finished.rel.replace(finished.name, finished.name.upper(), 1)

    def sync() -> SyncStats:
        client = make_client(sftp, lab.root, cache, backend, delete=True, allow_mass_delete=True)
        try:
            return client.sync()
        finally:
            client.close()

    sync()
    (lab.root / renamed).parent.mkdir(parents=True)
    os.rename(lab.root / finished.rel, lab.root / renamed)
    lab.publish(now=lab.now + 60)

    # The old name is deleted, the new one would land on it: left out this time ...
    stats = sync()
    assert stats["case_twins"] == {renamed + "/": finished.rel + "/"}
    assert stats["deleted_count"] == 1
    assert not (cache / finished.rel).exists() and not (cache / renamed).exists()

    # ... and fetched by the next sync of the same manifest, nothing in its way now.
    stats = sync()
    assert "case_twins" not in stats and not stats["skipped"]
    assert cache_files(cache) == server_files(lab.root)

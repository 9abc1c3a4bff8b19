"""Syncing part of a lab over a real sshd (issue 21, item 2): ``projects``, ``include``,
``exclude`` and ``since`` select the runs a sync fetches -- by manifest and by the legacy
walk, in both layouts -- and runs outside the selection are never fetched nor deleted."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner

from harness.lab import Lab, cache_files, make_lab, server_files
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.format import layout
from runicorn.remote_storage import MetadataSyncService
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.selection import RunSelection

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=12)]


def _files_of(files: dict[str, bytes], runs: list) -> dict[str, bytes]:
    prefixes = tuple(run.rel + "/" for run in runs)
    return {path: data for path, data in files.items() if path.startswith(prefixes)}


def _project_of(run) -> str:
    return run.name.split("/", 1)[0] if run.project == layout.RUNS_DIRNAME else run.project


def _remove(run) -> None:
    shutil.rmtree(run.path)


@pytest.mark.parametrize(
    "run_layout", [layout.LAYOUT_PROJECT_NAME, layout.LAYOUT_RUNS_PATH], ids=["pn", "rp"]
)
def test_a_project_sync_fetches_exactly_that_projects_runs(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient, run_layout: str
) -> None:
    lab = make_lab(tmp_path, backend, runs=12, run_layout=run_layout)
    runs = lab.info.listed_runs
    project = _project_of(runs[0])
    chosen = [run for run in runs if _project_of(run) == project]
    assert 0 < len(chosen) < len(runs)

    client = _client(sftp, lab, tmp_path / "cache", backend, projects=[project])
    try:
        stats = client.sync()
    finally:
        client.close()

    assert cache_files(tmp_path / "cache") == _files_of(server_files(lab.root), chosen)
    assert stats["runs_filtered_out"] == len(runs) - len(chosen)
    assert stats["failed_count"] == 0
    recorded = LocalCacheManager(tmp_path / "cache").list_runs()
    assert sorted(r.run_id for r in recorded) == sorted(r.run_id for r in chosen)


def test_bytes_moved_grow_with_the_selection(lab: Lab, tmp_path: Path, client_for) -> None:
    project = _project_of(lab.info.listed_runs[0])
    part = _client_stats(client_for, projects=[project])
    full = _client_stats(client_for)
    chosen = [run for run in lab.info.listed_runs if _project_of(run) == project]
    run_bytes = sum(len(v) for v in _files_of(server_files(lab.root), chosen).values())
    # the selected sync moved its runs' bytes and the manifest, not the rest of the lab
    assert part["bytes_total"] == run_bytes
    assert full["bytes_total"] == sum(len(v) for v in server_files(lab.root).values()) - run_bytes


def _client_stats(client_for, **options: object) -> dict:
    return dict(client_for(**options).sync())


def test_runs_outside_the_selection_are_never_deleted(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    runs = lab.info.listed_runs
    project = _project_of(runs[0])
    inside = next(run for run in runs if _project_of(run) == project and run.status != "running")
    outside = [run for run in runs if _project_of(run) != project][:3]
    for run in [inside, *outside]:
        _remove(run)
    lab.publish(now=lab.now + 60)

    stats = client_for(projects=[project], delete=True, allow_mass_delete=True).sync()

    kept = {run.run_id for run in LocalCacheManager(cache).list_runs()}
    assert inside.run_id not in kept
    assert {run.run_id for run in outside} <= kept
    assert stats["deleted_count"] == 1
    left = cache_files(cache)
    for run in outside:
        assert any(path.startswith(run.rel + "/") for path in left)


def test_a_wider_selection_after_an_unchanged_manifest_fetches_the_new_runs(
    lab: Lab, cache: Path, client_for
) -> None:
    project = _project_of(lab.info.listed_runs[0])
    client_for(projects=[project]).sync()
    again = client_for(projects=[project]).sync()
    assert again["skipped"] is True

    stats = client_for().sync()  # every run now, the manifest unchanged

    assert stats["skipped"] is False
    assert cache_files(cache) == server_files(lab.root)


def test_since_selects_runs_created_or_updated_within_the_window(
    lab: Lab, cache: Path, client_for
) -> None:
    runs = sorted(lab.info.listed_runs, key=lambda r: max(r.created_at, r.updated_at))
    newest = [max(r.created_at, r.updated_at) for r in runs]
    cut = len(runs) // 2
    while cut < len(runs) and newest[cut] - newest[cut - 1] < 2:
        cut += 1  # a cut between two runs at least two seconds apart
    assert cut < len(runs)
    boundary = (newest[cut - 1] + newest[cut]) / 2
    since = time.time() - boundary

    stats = client_for(since=since).sync()

    assert cache_files(cache) == _files_of(server_files(lab.root), runs[cut:])
    assert stats["runs_filtered_out"] == cut


def test_exclude_and_include_over_the_legacy_walk(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    runs = lab.info.listed_runs
    project = _project_of(runs[0])
    excluded = next(run for run in runs if _project_of(run) == project)
    selection = RunSelection.of(
        include=[project], exclude=[f"{project}/{excluded.name}/{excluded.run_id}"]
    )
    chosen = [run for run in runs if _project_of(run) == project and run.run_id != excluded.run_id]
    cache = LocalCacheManager(tmp_path / "cache")
    service = MetadataSyncService(
        None,
        sftp,
        str(lab.root),
        cache,
        use_manifest_sync=False,
        backend=backend,
        include=selection.include,
        exclude=selection.exclude,
    )
    assert service.sync_all()
    cache.close()

    assert service.progress.mode == "legacy"
    assert cache_files(tmp_path / "cache") == _files_of(server_files(lab.root), chosen)
    assert service.last_stats is not None
    assert service.last_stats["runs_filtered_out"] == len(runs) - len(chosen)


def test_a_project_legacy_walk_never_lists_the_other_projects(
    lab: Lab, tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    project = _project_of(lab.info.listed_runs[0])
    cache = LocalCacheManager(tmp_path / "cache")
    service = MetadataSyncService(
        None,
        sftp,
        str(lab.root),
        cache,
        use_manifest_sync=False,
        backend=backend,
        projects=[project],
    )
    assert service.sync_all()
    cache.close()
    assert service.last_walk is not None
    walked = {exp.project for exp in service.last_walk.manifest.experiments}
    assert walked == {project}


def _client(sftp, lab: Lab, cache: Path, backend: Backend, **options: object):
    from harness.lab import make_client

    return make_client(sftp, lab.root, cache, backend, **options)


# ----------------------------------------------------------------------------------- the CLI


def test_cli_project_and_exclude_over_ssh(
    lab: Lab, tmp_path: Path, sshd_server: SshServer, cli_backend: Backend
) -> None:
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    runs = lab.info.listed_runs
    project = _project_of(runs[0])
    names = sorted({run.name for run in runs if _project_of(run) == project})
    chosen = [r for r in runs if _project_of(r) == project and r.name != names[0]]
    result = CliRunner().invoke(
        main,
        [
            "sync",
            f"labserver:{lab.root}",
            str(tmp_path / "cache"),
            "--ssh-config",
            str(config),
            "--project",
            project,
            "--exclude",
            f"*/{names[0]}",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    stats = orjson.loads(result.stdout)
    assert stats["runs_filtered_out"] == len(runs) - len(chosen)
    assert cache_files(tmp_path / "cache") == _files_of(server_files(lab.root), chosen)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--since", "3 fortnights", "not a duration"),
        ("--include", "/abs", "bad glob"),
        ("--project", "a/b", "one visible name"),
    ],
)
def test_cli_bad_selection_is_a_usage_error(
    tmp_path: Path, cli_backend: Backend, option: str, value: str, message: str
) -> None:
    (tmp_path / "lab").mkdir()
    result = CliRunner().invoke(
        main, ["sync", str(tmp_path / "lab"), str(tmp_path / "cache"), option, value]
    )
    assert result.exit_code == 2
    assert message in result.stderr

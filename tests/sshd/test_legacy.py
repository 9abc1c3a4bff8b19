"""The legacy walk: a server without a manifest is listed level by level, by the layout rules,
and synced through the same engine as a manifest, into the same cache."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from harness.sshd import SshServer
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import build_sample_lab
from runicorn.manifest import ManifestGenerator, ManifestType
from runicorn.sync.cache import STATE_DIRNAME, LocalCacheManager
from runicorn.sync.legacy import walk_remote

NOW = 1_700_000_000.0


@dataclass
class _Entry:
    name: str
    is_dir: bool
    is_symlink: bool
    size: int
    mtime: float


class FsLister:
    """A tiny local stand-in for ``Remote`` (lstat semantics, whole-second mtimes like SFTP
    v3) that counts ``listdirs`` calls and can make chosen directories fail."""

    def __init__(self, root: Path, failing: dict[str, BaseException] | None = None) -> None:
        self.root = root
        self.failing = failing or {}
        self.calls: list[list[str]] = []

    def _list(self, rel: str) -> list[_Entry]:
        if rel in self.failing:
            raise self.failing[rel]
        base = self.root if rel == "." else self.root / rel
        entries = []
        for name in os.listdir(base):
            st = os.lstat(base / name)
            entries.append(
                _Entry(
                    name,
                    stat.S_ISDIR(st.st_mode),
                    stat.S_ISLNK(st.st_mode),
                    st.st_size,
                    float(int(st.st_mtime)),
                )
            )
        return entries

    def listdirs(self, paths: Sequence[str]) -> dict[str, list[_Entry] | BaseException]:
        self.calls.append(list(paths))
        result: dict[str, list[_Entry] | BaseException] = {}
        for path in paths:
            try:
                result[path] = self._list(path)
            except OSError as error:
                result[path] = error
        return result

    def read_file(self, path: str, max_bytes: int) -> bytes:
        with open(self.root / path, "rb") as handle:
            return handle.read(max_bytes)


def _make_run(root: Path, rel: str, files: dict[str, bytes]) -> Path:
    run = root / rel
    for name, data in files.items():
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return run


RUN = "proj/exp/runs/20240101_000000_abcdef"


def _paths(report) -> list[str]:
    return [entry.path for entry in report.manifest.iter_files()]


def test_walk_lists_run_files_by_the_layout_rules(tmp_path: Path) -> None:
    _make_run(
        tmp_path,
        RUN,
        {
            "meta.json": b"{}",
            "status.json": b"{}",
            "events.jsonl": b"{}\n",
            "events.jsonl.lock": b"",
            "media/step_1.png": b"png",
        },
    )
    report = walk_remote(FsLister(tmp_path), str(tmp_path), hostname="lab")
    assert _paths(report) == [
        f"{RUN}/events.jsonl",
        f"{RUN}/media/step_1.png",
        f"{RUN}/meta.json",
        f"{RUN}/status.json",
    ]
    entries = {entry.path.rsplit("/", 1)[-1]: entry for entry in report.manifest.iter_files()}
    assert entries["events.jsonl"].is_append_only
    assert entries["meta.json"].priority == 1
    assert entries["step_1.png"].priority == 4
    manifest = report.manifest
    assert (manifest.manifest_type, manifest.revision) == (ManifestType.FULL, 0)
    assert all(entry.tail_hash is None for entry in manifest.iter_files())
    assert report.complete


def test_walk_skips_hidden_names_and_soft_deleted_runs(tmp_path: Path) -> None:
    _make_run(tmp_path, RUN, {"meta.json": b"{}"})
    _make_run(
        tmp_path, "proj/exp/runs/20240101_000001_aaaaaa", {"meta.json": b"{}", ".deleted": b""}
    )
    _make_run(tmp_path, ".hidden/exp/runs/20240101_000002_bbbbbb", {"meta.json": b"{}"})
    _make_run(tmp_path, "proj/exp/runs/.half_created", {"meta.json": b"{}"})
    (tmp_path / ".runicorn").mkdir()
    report = walk_remote(FsLister(tmp_path), str(tmp_path), hostname="lab")
    assert _paths(report) == [f"{RUN}/meta.json"]
    assert report.soft_deleted == 1


def test_walk_does_not_follow_symbolic_links(tmp_path: Path) -> None:
    _make_run(tmp_path, RUN, {"meta.json": b"{}"})
    outside = _make_run(tmp_path / "outside", "secret", {"meta.json": b"{}"})
    (tmp_path / "proj/exp/runs/20240101_000009_cccccc").symlink_to(outside)
    (tmp_path / RUN / "linked.json").symlink_to(outside / "meta.json")
    lab = tmp_path / "lab"
    lab.mkdir()
    os.rename(tmp_path / "proj", lab / "proj")
    report = walk_remote(FsLister(lab), str(lab), hostname="lab")
    assert _paths(report) == [f"{RUN}/meta.json"]
    assert any("symbolic link not followed" in line for line in report.warnings)
    assert not report.complete


def test_unreadable_directory_is_a_warning_and_the_rest_is_synced(tmp_path: Path) -> None:
    _make_run(tmp_path, RUN, {"meta.json": b"{}"})
    other = "proj/other/runs/20240101_000003_dddddd"
    _make_run(tmp_path, other, {"meta.json": b"{}"})
    lister = FsLister(tmp_path, failing={other: PermissionError(13, "Permission denied")})
    report = walk_remote(lister, str(tmp_path), hostname="lab")
    assert _paths(report) == [f"{RUN}/meta.json"]
    assert report.warnings == [f"{other}: unreadable: Permission denied"]


def test_unreadable_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot list the remote experiments root"):
        walk_remote(FsLister(tmp_path / "missing"), str(tmp_path / "missing"))


def test_walk_cost_is_one_listing_call_per_level_whatever_the_lab_size(tmp_path: Path) -> None:
    levels = []
    for runs in (5, 40):
        lab = tmp_path / f"lab{runs}"
        build_sample_lab(lab, runs=runs, seed=3, now=NOW)
        lister = FsLister(lab)
        report = walk_remote(lister, str(lab), hostname="lab")
        assert report.levels == len(lister.calls)
        levels.append(report.levels)
    # root, projects, experiments, runs/, run directories, media/
    assert levels == [6, 6]


def test_walk_lists_what_the_generator_lists(tmp_path: Path, backend: Backend) -> None:
    lab = tmp_path / "lab"
    build_sample_lab(lab, runs=30, seed=4, now=NOW)
    generated, _ = ManifestGenerator(lab, backend=backend, clock=lambda: NOW).generate()
    walked = walk_remote(FsLister(lab), str(lab), hostname="lab").manifest
    assert [(e.project, e.name, e.run_id, e.tags) for e in walked.experiments] == [
        (e.project, e.name, e.run_id, e.tags) for e in generated.experiments
    ]
    assert [(f.path, f.priority, f.is_append_only) for f in walked.iter_files()] == [
        (f.path, f.priority, f.is_append_only) for f in generated.iter_files()
    ]


# --- over real SSH, through the client engine -----------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` except the cache's own state."""
    files = {}
    for directory, dirnames, filenames in os.walk(root):
        if Path(directory) == root:
            dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
        for name in filenames:
            path = Path(directory, name)
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def _server_tree(lab) -> dict[str, bytes]:
    return {
        f"{run.rel}/{path}": (run.path / path).read_bytes()
        for run in lab.listed_runs
        for path in run.synced_files
    }


@pytest.mark.sshd
def test_legacy_sync_over_ssh_gives_the_same_cache_as_manifest_sync(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    from runicorn.sync.client import ManifestSyncClient
    from runicorn.sync.service import MetadataSyncService

    lab = build_sample_lab(tmp_path / "lab", runs=12, seed=5, now=NOW)
    ManifestGenerator(lab.root, backend=backend).generate()
    by_manifest = tmp_path / "by_manifest"
    stats = ManifestSyncClient(sftp, str(lab.root), by_manifest, 0.0, backend=backend).sync()
    assert stats["failed_count"] == 0

    by_walk = LocalCacheManager(tmp_path / "by_walk")
    service = MetadataSyncService(
        None, sftp, str(lab.root), by_walk, use_manifest_sync=False, backend=backend
    )
    assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert _tree(by_walk.root_dir) == _tree(by_manifest) == _server_tree(lab)


@pytest.mark.sshd
def test_legacy_sync_records_each_runs_real_status(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    from runicorn.sync.service import MetadataSyncService

    lab = build_sample_lab(tmp_path / "lab", runs=8, seed=6, now=NOW)
    cache = LocalCacheManager(tmp_path / "cache")
    service = MetadataSyncService(
        None, sftp, str(lab.root), cache, use_manifest_sync=False, backend=backend
    )
    assert service.sync_all()
    statuses = {run.run_id: run.status for run in cache.list_runs()}
    assert statuses == {run.run_id: run.status for run in lab.listed_runs}


@pytest.mark.sshd
def test_walk_over_ssh_costs_a_bounded_number_of_requests_per_directory(
    tmp_path: Path, sshd_server: SshServer, sftp: paramiko.SFTPClient
) -> None:
    from runicorn.transport.sftp_remote import SftpRemote

    lab = build_sample_lab(tmp_path / "lab", runs=20, seed=7, now=NOW)
    remote = SftpRemote(sftp, str(lab.root))
    try:
        sshd_server.reset_request_counts()
        report = walk_remote(remote, str(lab.root), hostname="lab")
    finally:
        remote.close()
    counts = sshd_server.sftp_request_count()
    assert report.manifest.total_files == lab.listed_files
    assert report.levels == 6
    # opendir, a readdir or two, close: a handful per directory, never per file.
    assert counts.total <= 5 * report.directories + 10


@pytest.mark.sshd
def test_fallback_after_a_manifest_sync_fetches_nothing_unchanged(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    from runicorn.sync.service import MetadataSyncService

    lab = build_sample_lab(tmp_path / "lab", runs=8, seed=9, now=NOW)
    ManifestGenerator(lab.root, backend=backend).generate()
    cache = LocalCacheManager(tmp_path / "cache")
    for use_manifest in (True, False):
        service = MetadataSyncService(
            None, sftp, str(lab.root), cache, use_manifest, 0.0, backend=backend
        )
        assert service.sync_all()
    assert service.progress.mode == "legacy"
    assert service.last_stats is not None
    assert (service.last_stats["files_synced"], service.last_stats["bytes_downloaded"]) == (0, 0)


def test_whole_second_mtimes_adopt_the_recorded_ones_only_when_size_and_second_match(
    tmp_path: Path,
) -> None:
    from runicorn.sync.legacy import adopt_cached_mtimes

    files = {"meta.json": b"{}", "status.json": b"{}", "summary.json": b"{}"}
    run = _make_run(tmp_path, RUN, files)
    for name in files:
        os.utime(run / name, (NOW + 0.25, NOW + 0.25))
    manifest = walk_remote(FsLister(tmp_path), str(tmp_path), hostname="lab").manifest
    local = [
        (f"{RUN}/meta.json", 2, NOW + 0.25, None),  # same size, same second: adopted
        (f"{RUN}/status.json", 3, NOW + 0.25, None),  # other size: fetched again
        (f"{RUN}/summary.json", 2, NOW + 1.25, None),  # other second: fetched again
    ]
    assert adopt_cached_mtimes(manifest, local) == 1
    assert [entry.mtime for entry in manifest.iter_files()] == [NOW + 0.25, NOW, NOW]

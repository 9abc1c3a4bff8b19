"""LocalCacheManager: safe paths inside the cache, the state a sync leaves, and what users ask
of a cache (its runs, its size, removing a run, leftovers of a killed sync)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import paramiko
import pytest

from harness.lab import Lab, cache_files, make_client, make_lab, server_files
from runicorn._sys import dirs
from runicorn._sys.atomic import TEMP_PREFIX
from runicorn.core.backend import Backend
from runicorn.sync.cache import (
    STATE_DIRNAME,
    FileRecord,
    LocalCacheManager,
    RunRecord,
)
from runicorn.sync.cache.tree import CacheTree

RUN = "proj/exp/runs/20240101_000000_abcdef"


@pytest.fixture
def manager(tmp_path: Path) -> LocalCacheManager:
    cache = LocalCacheManager(tmp_path / "cache")
    yield cache
    cache.close()


@pytest.fixture
def synced(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> tuple[Lab, LocalCacheManager]:
    """A lab and a cache holding a full sync of it."""
    lab = make_lab(tmp_path, backend, runs=6)
    cache = LocalCacheManager(tmp_path / "cache")
    client = make_client(sftp, lab.root, cache.root_dir, backend, cache_manager=cache)
    client.sync()
    yield lab, cache
    client.close()


# --------------------------------------------------------------------------- safe paths

UNSAFE_PATHS = [
    f"{RUN}/../../../../../etc/passwd",
    "/etc/passwd",
    "C:/Windows/win.ini",
    f"{RUN}/a\\b",
    f"{RUN}/nul\0byte",
    f"{RUN}//meta.json",
    f"{RUN}/./meta.json",
    f"{STATE_DIRNAME}/state.sqlite3",
    f"{RUN}/{TEMP_PREFIX}x.part",
    "",
]
"""Paths a manifest could name that would leave or corrupt the cache."""


def test_path_for_resolves_a_manifest_path_inside_the_cache(manager: LocalCacheManager) -> None:
    assert manager.path_for(f"{RUN}/meta.json") == manager.root_dir / RUN / "meta.json"


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_path_for_refuses_paths_that_could_leave_or_corrupt_the_cache(
    manager: LocalCacheManager, path: str
) -> None:
    with pytest.raises(ValueError):
        manager.path_for(path)


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_open_parent_refuses_the_same_paths_when_their_directory_is_kept_open(
    manager: LocalCacheManager, path: str
) -> None:
    # The kept-handle shortcut checks only the last component: it must refuse all the same.
    with manager.directory_handles():
        manager.open_parent(f"{RUN}/media/x.png")[0].close()
        with pytest.raises(ValueError):
            manager.open_parent(path)[0].close()


def test_path_for_refuses_a_symlinked_directory_pointing_outside(
    manager: LocalCacheManager, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (manager.root_dir / "proj").mkdir(parents=True)
    (manager.root_dir / "proj" / "exp").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError, match="symbolic link"):
        manager.path_for(f"{RUN}/meta.json")


def test_open_parent_creates_directories_but_never_through_a_link(
    manager: LocalCacheManager, tmp_path: Path
) -> None:
    directory, name = manager.open_parent(f"{RUN}/media/a.png")
    directory.close()
    assert name == "a.png"
    assert (manager.root_dir / RUN / "media").is_dir()

    outside = tmp_path / "outside"
    outside.mkdir()
    os.rmdir(manager.root_dir / RUN / "media")
    (manager.root_dir / RUN / "media").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        manager.open_parent(f"{RUN}/media/b.png")
    assert list(outside.iterdir()) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_kept_directory_handles_save_the_walk_and_are_closed_after_the_block(
    manager: LocalCacheManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = []
    descend = CacheTree._descend
    monkeypatch.setattr(
        CacheTree,
        "_descend",
        staticmethod(lambda at, part, *rest: walks.append(part) or descend(at, part, *rest)),
    )
    before = _open_fds()
    with manager.directory_handles():
        for name in ("meta.json", "status.json", "events.jsonl"):
            directory, got = manager.open_parent(f"{RUN}/{name}")
            try:
                os.close(directory.open(got, os.O_WRONLY | os.O_CREAT, 0o644))
            finally:
                directory.close()
        assert len(walks) == len(RUN.split("/"))  # one walk for three files
        manager.open_parent(f"{RUN}/media/step_0.png")[0].close()
        assert walks[-1] == "media" and len(walks) == len(RUN.split("/")) + 1  # from the run
        # root, 4 levels, media (by path, where there is no dir_fd, none is held)
        assert _open_fds() == before + (len(RUN.split("/")) + 2) * dirs.USE_DIR_FD
    assert _open_fds() == before
    assert sorted(p.name for p in (manager.root_dir / RUN).iterdir()) == [
        "events.jsonl",
        "media",
        "meta.json",
        "status.json",
    ]


def test_kept_directory_handles_never_follow_a_link_planted_before_the_first_open(
    manager: LocalCacheManager, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (manager.root_dir / RUN).parent.mkdir(parents=True)
    (manager.root_dir / RUN).symlink_to(outside, target_is_directory=True)
    with manager.directory_handles():
        for _ in range(2):
            with pytest.raises(ValueError, match="symbolic link"):
                manager.open_parent(f"{RUN}/meta.json")
    assert list(outside.iterdir()) == []


def test_removing_a_run_drops_the_kept_handles_so_new_files_land_in_the_new_directory(
    manager: LocalCacheManager,
) -> None:
    with manager.directory_handles():
        manager.open_parent(f"{RUN}/meta.json")[0].close()
        project, name, _runs, run_id = RUN.split("/")
        manager.remove_run(project, name, run_id)
        directory, got = manager.open_parent(f"{RUN}/meta.json")
        try:
            os.close(directory.open(got, os.O_WRONLY | os.O_CREAT, 0o644))
        finally:
            directory.close()
    assert (manager.root_dir / RUN / "meta.json").is_file()


# --------------------------------------------------------------------------- state


def test_nothing_is_created_before_the_first_write(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "new-cache")

    assert cache.list_runs() == []
    assert cache.file_entries() == []
    assert cache.disk_usage() == 0
    assert not (tmp_path / "new-cache").exists()


def test_state_survives_a_new_manager_on_the_same_directory(manager: LocalCacheManager) -> None:
    manager.save_progress(
        remote_id="r",
        synced=[FileRecord(f"{RUN}/meta.json", 10, 1.5, None)],
        failed=[(f"{RUN}/logs.txt", "vanished on the server")],
    )
    manager.save_progress(remote_id="r", failed=[(f"{RUN}/logs.txt", "vanished on the server")])
    manager.close()

    reopened = LocalCacheManager(manager.root_dir)
    assert reopened.file_entries() == [(f"{RUN}/meta.json", 10, 1.5, None)]
    (failure,) = reopened.failed_files()
    assert (failure.path, failure.attempts) == (f"{RUN}/logs.txt", 2)
    reopened.close()


def test_a_synced_file_clears_its_failure(manager: LocalCacheManager) -> None:
    manager.save_progress(remote_id="r", failed=[(f"{RUN}/meta.json", "permission denied")])
    manager.save_progress(remote_id="r", synced=[FileRecord(f"{RUN}/meta.json", 3, 1.0, None)])

    assert manager.failed_files() == []


def test_damaged_files_are_those_missing_or_resized_on_disk(manager: LocalCacheManager) -> None:
    root = manager.root_dir / RUN
    root.mkdir(parents=True)
    (root / "meta.json").write_bytes(b"{}")
    (root / "status.json").write_bytes(b"{}")
    manager.save_progress(
        remote_id="r",
        synced=[
            FileRecord(f"{RUN}/meta.json", 2, 1.0, None),
            FileRecord(f"{RUN}/status.json", 5, 1.0, None),
            FileRecord(f"{RUN}/summary.json", 2, 1.0, None),
        ],
    )

    for name in ("meta.json", "status.json"):
        os.utime(root / name, (1.0, 1.0))  # as a sync leaves them: the server's mtime

    assert manager.damaged_files() == {f"{RUN}/status.json", f"{RUN}/summary.json"}


def test_a_file_written_locally_after_the_sync_is_damaged_even_at_the_same_size(
    manager: LocalCacheManager,
) -> None:
    """A viewer rewriting a cached ``status.json`` (same size or not) leaves it newer than
    the server's mtime the sync gave it: the next sync must put the server's copy back."""
    root = manager.root_dir / RUN
    root.mkdir(parents=True)
    synced_at = 1_700_000_000.0
    for name in ("meta.json", "status.json"):
        (root / name).write_bytes(b'{"status": "running"}')
        os.utime(root / name, (synced_at, synced_at))
    manager.save_progress(
        remote_id="r",
        synced=[
            FileRecord(f"{RUN}/meta.json", 21, synced_at, None),
            FileRecord(f"{RUN}/status.json", 21, synced_at, None),
        ],
    )
    assert manager.damaged_files() == set()

    (root / "status.json").write_bytes(b'{"status": "failed!"}')  # same size, now

    assert manager.damaged_files() == {f"{RUN}/status.json"}


def test_a_coarse_or_clamped_mtime_on_disk_is_not_a_local_write(
    manager: LocalCacheManager,
) -> None:
    """File systems round installed mtimes down and clamp far-future ones: older than
    recorded is never a local write (no re-download on every sync)."""
    root = manager.root_dir / RUN
    root.mkdir(parents=True)
    (root / "meta.json").write_bytes(b"{}")
    (root / "status.json").write_bytes(b"{}")
    os.utime(root / "meta.json", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    os.utime(root / "status.json", (4_000_000_000.0, 4_000_000_000.0))
    manager.save_progress(
        remote_id="r",
        synced=[
            FileRecord(f"{RUN}/meta.json", 2, 1_700_000_000.987654, None),
            FileRecord(f"{RUN}/status.json", 2, 1e30, None),
        ],
    )

    assert manager.damaged_files() == set()


# --------------------------------------------------------------------------- user-facing queries


def test_damaged_runs_lstats_running_runs_and_moved_containers_only(
    manager: LocalCacheManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished = RUN.replace("runs/", "runs/finished-")
    elsewhere = "proj/other/runs/20240101_000000_fedcba"
    records = []
    for run in (RUN, finished, elsewhere):
        for name, data in (("status.json", b"{}"), ("summary.json", b"{}")):
            path = manager.root_dir / run / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            records.append(FileRecord(f"{run}/{name}", 2, path.stat().st_mtime, None))
    manager.save_progress(remote_id="r", synced=records)
    statuses = {RUN: "running", finished: "finished", elsewhere: "failed"}
    manager.save_runs(
        "r",
        [
            RunRecord(*run.replace("/runs/", "/").split("/"), status, 0.0, 0.0, None, None)
            for run, status in statuses.items()
        ],
    )
    manager.stamp_containers()
    looked_at: list[str] = []
    lstat = os.lstat

    def counting(path, *args, **kwargs):
        looked_at.append(os.path.relpath(path, manager.root_dir))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counting)
    assert manager.damaged_runs() == set()
    # the two containers and the running run's status: not one lstat per run
    assert sorted(looked_at) == sorted(["proj/exp/runs", "proj/other/runs", f"{RUN}/status.json"])
    monkeypatch.setattr(os, "lstat", lstat)

    (manager.root_dir / finished / "status.json").write_bytes(b"{ }")  # in place: no run moved
    (manager.root_dir / finished / "summary.json").unlink()
    assert manager.damaged_runs() == set()  # left to the full check
    (manager.root_dir / RUN / "status.json").write_bytes(b"{ }")  # a viewer's rewrite
    assert manager.damaged_runs() == {f"{RUN}/status.json"}
    shutil.rmtree(manager.root_dir / elsewhere)  # its container's mtime moves
    assert manager.damaged_runs() == {f"{RUN}/status.json", f"{elsewhere}/status.json"}

    entries = manager.file_entries()
    assert manager.damaged_under(entries, [f"{RUN}/"]) == {f"{RUN}/status.json"}
    assert manager.damaged_files() == {
        f"{RUN}/status.json",
        f"{finished}/status.json",
        f"{finished}/summary.json",
        f"{elsewhere}/status.json",
        f"{elsewhere}/summary.json",
    }


def test_verified_at_is_remembered(manager: LocalCacheManager) -> None:
    assert manager.verified_at() is None
    manager.set_verified_at(1735689600.25)
    assert manager.verified_at() == 1735689600.25


def test_list_runs_reports_every_synced_run(synced: tuple[Lab, LocalCacheManager]) -> None:
    lab, cache = synced

    runs = cache.list_runs()

    expected = {r.run_id: r for r in lab.info.listed_runs}
    assert sorted(r.run_id for r in runs) == sorted(expected)
    for run in runs:
        assert run.status == expected[run.run_id].status
        assert run.path == cache.root_dir / expected[run.run_id].rel
        assert run.size == sum(expected[run.run_id].synced_files.values())
        assert run.last_synced is not None


def test_get_run_finds_a_run_by_id(synced: tuple[Lab, LocalCacheManager]) -> None:
    lab, cache = synced
    wanted = lab.info.listed_runs[0]

    run = cache.get_run(wanted.run_id)

    assert run is not None and (run.project, run.name) == (wanted.project, wanted.name)
    assert cache.get_run("19700101_000000_000000") is None


def test_disk_usage_counts_the_mirror_and_the_state(synced: tuple[Lab, LocalCacheManager]) -> None:
    lab, cache = synced
    mirrored = sum(len(data) for data in server_files(lab.root).values())

    usage = cache.disk_usage()

    assert usage > mirrored  # the state database is part of what the cache costs
    assert usage - mirrored < 4 * 1024 * 1024


def test_remove_run_deletes_its_files_and_its_state(synced: tuple[Lab, LocalCacheManager]) -> None:
    lab, cache = synced
    victim = lab.info.listed_runs[0]

    assert cache.remove_run(victim.project, victim.name, victim.run_id) is True

    assert not (cache.root_dir / victim.rel).exists()
    assert cache.get_run(victim.run_id) is None
    assert not any(path.startswith(victim.rel + "/") for path, *_ in cache.file_entries())
    assert cache.remove_run(victim.project, victim.name, victim.run_id) is False


def test_remove_run_refuses_a_symlinked_run_directory(
    manager: LocalCacheManager, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (manager.root_dir / "proj" / "exp" / "runs").mkdir(parents=True)
    (manager.root_dir / RUN).symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError, match="symbolic link"):
        manager.remove_run("proj", "exp", RUN.rsplit("/", 1)[-1])
    assert (outside / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- killed syncs


def test_temp_files_are_listed_and_cleaned(manager: LocalCacheManager) -> None:
    (manager.root_dir / RUN).mkdir(parents=True)
    leftover = manager.root_dir / RUN / f"{TEMP_PREFIX}0123.part"
    leftover.write_bytes(b"half a file")
    (manager.root_dir / RUN / "meta.json").write_bytes(b"{}")

    assert manager.temp_files() == [leftover]
    assert manager.clean_temp_files() == 1
    assert manager.temp_files() == []
    assert (manager.root_dir / RUN / "meta.json").exists()


def test_a_sync_after_an_interrupted_one_removes_its_temp_files(
    synced: tuple[Lab, LocalCacheManager], backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab, cache = synced
    run_dir = cache.root_dir / lab.info.listed_runs[0].rel
    leftover = run_dir / f"{TEMP_PREFIX}dead.part"
    leftover.write_bytes(b"partial")
    cache.set_dirty(True)  # what a killed sync leaves behind

    client = make_client(sftp, lab.root, cache.root_dir, backend, cache_manager=cache)
    stats = client.sync()

    assert not leftover.exists()
    assert stats["skipped"] is False  # an interrupted sync is never trusted to be complete
    assert cache_files(cache.root_dir) == server_files(lab.root)


def test_file_entries_under_reads_only_the_files_of_the_runs_named(
    manager: LocalCacheManager,
):
    """A run whose id extends another's (``…abcdef`` and ``…abcdef0``) and a sibling file
    beside the run directory are not below its prefix."""
    paths = [
        f"{RUN}/events.jsonl",
        f"{RUN}/media/a.png",
        f"{RUN}/meta.json",
        f"{RUN}0/meta.json",
        f"{RUN}.txt",
        "proj/exp/runs/20240101_000000_000000/meta.json",
        "proj/zzz/runs/20240101_000000_ffffff/meta.json",
    ]
    manager.save_progress(
        remote_id="r", synced=[FileRecord(path, 1, 1.0, None) for path in reversed(paths)]
    )
    wanted = [f"{RUN}/", "proj/zzz/runs/20240101_000000_ffffff/", "proj/none/runs/x/"]
    under = manager.file_entries_under(wanted)
    expected = {paths[0], paths[1], paths[2], paths[6]}
    assert under == [row for row in manager.file_entries() if row[0] in expected]
    assert [row[0] for row in under] == sorted(expected)
    assert manager.file_entries_under([]) == []
    with pytest.raises(ValueError, match="ends with '/'"):
        manager.file_entries_under([RUN])

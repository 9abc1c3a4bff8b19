"""ManifestSyncClient against a real OpenSSH server, on both backends: what a sync moves, what
it skips, what it refuses, and how it recovers."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import paramiko
import pytest

from harness.lab import (
    NOW,
    SEED,
    Lab,
    assert_cache_equals_server,
    cache_files,
    make_client,
    make_lab,
    server_files,
    settle,
    temp_files,
)
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import training_step
from runicorn.format.compression import compress
from runicorn.format.layout import priority_for
from runicorn.manifest import ManifestType, SyncManifest
from runicorn.sync import transfer as file_transfer
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.transfer import TRUNCATED_JSON
from runicorn.transport.sftp_remote import SftpRemote

pytestmark = pytest.mark.sshd


def _step(lab: Lab, dt: float = 60.0, **options: object):
    """One training step on the server, then the server's timer publishes the manifest."""
    info = training_step(lab.root, seed=SEED, now=lab.now + dt, **options)
    lab.publish(now=lab.now + dt)
    return info


def _a_run(lab: Lab, *, running: bool | None = None):
    runs = [
        r for r in lab.info.listed_runs if running is None or (r.status == "running") == running
    ]
    return runs[0]


# --------------------------------------------------------------------------- cold and no-change


def test_cold_sync_mirrors_the_server_byte_for_byte(lab: Lab, cache: Path, client_for) -> None:
    stats = client_for().sync()

    assert_cache_equals_server(lab.root, cache)
    assert stats["skipped"] is False
    assert stats["failed_count"] == 0
    assert stats["files_synced"] == stats["full_count"] == lab.info.listed_files
    assert stats["incremental_count"] == 0
    assert stats["manifest_revision"] == 1
    assert stats["manifest_type"] == "full"


def test_cold_sync_records_every_run_for_the_ui(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()

    runs = LocalCacheManager(cache).list_runs()
    assert sorted(r.run_id for r in runs) == sorted(r.run_id for r in lab.info.listed_runs)
    assert all(r.last_synced is not None and r.size > 0 for r in runs)


def test_unchanged_manifest_is_skipped_with_at_most_four_sftp_requests(
    lab: Lab, client_for, sshd_server: SshServer, sftp: paramiko.SFTPClient
) -> None:
    sshd_server.reset_request_counts()
    first_client = client_for()
    first_client.sync()
    first_client.close()  # as a process that exits: its worker channels end
    fresh_client = client_for()  # a new process would start like this: state from disk only

    # The first sync's last closes are not the second's requests: its worker channels'
    # sessions must have ended, and its own channel's requests been answered.
    sshd_server.wait_sftp_sessions_closed()
    settle(sftp)
    sshd_server.reset_request_counts()
    stats = fresh_client.sync()
    counts = sshd_server.sftp_request_count(wait_for_close=True)

    assert stats["skipped"] is True
    assert stats["reason"] == "manifest revision 1 unchanged"
    assert stats["files_synced"] == 0
    assert counts.total <= 4, counts.by_type


def test_stats_are_per_call(lab: Lab, client_for) -> None:
    client = client_for()
    client.sync()
    stats = client.sync()
    assert (stats["files_synced"], stats["full_count"], stats["failed_count"]) == (0, 0, 0)


# --------------------------------------------------------------------------- incremental


def test_after_a_training_step_only_the_changes_move(lab: Lab, cache: Path, client_for) -> None:
    client = client_for(delete=True)
    client.sync()
    step = _step(lab)

    stats = client.sync()

    assert_cache_equals_server(lab.root, cache)
    appended = sum(step.appended.values())
    small = sum((lab.root / p).stat().st_size for p in step.rewritten) + sum(
        step.added_files.values()
    )
    gz = (lab.manifest_dir / "full_manifest.json.gz").stat().st_size
    manifest = gz if gz < 4096 else gz + 4096  # the header probe reads 4 KiB first
    expected = appended + small + manifest
    assert abs(stats["bytes_downloaded"] - expected) <= 0.1 * expected, (stats, expected)
    assert stats["incremental_count"] == len(step.appended)
    assert stats["full_count"] == len(set(step.rewritten) | set(step.added_files))
    assert stats["deleted_count"] == len(step.gone_runs())
    assert stats["failed_count"] == 0


def test_appends_spilled_to_disk_are_verified_and_applied_the_same(
    lab: Lab, cache: Path, client_for, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_transfer, "SPOOL_MEMORY_BYTES", 16)
    client = client_for()
    client.sync()
    step = _step(lab)

    stats = client.sync()

    assert stats["incremental_count"] == len(step.appended)
    leftovers = os.listdir(cache / ".runicorn-cache")
    own = ("state.sqlite3", "sync.lock", "mirrors.json")
    assert all(name.startswith(own) for name in leftovers)
    expected = server_files(lab.root)
    assert all(cache_files(cache)[path] == expected[path] for path in step.appended)


def test_append_only_file_rewritten_longer_on_server_is_fetched_whole(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    events = lab.root / _a_run(lab).rel / "events.jsonl"
    old = events.read_bytes()
    events.write_bytes(b'{"rewritten": true, "pad": "%s"}\n' % (b"x" * 64) * (len(old) // 40 + 5))
    assert events.stat().st_size > len(old)
    lab.publish(now=NOW + 60)

    stats = client.sync()

    assert (stats["incremental_count"], stats["full_count"]) == (0, 1)
    assert_cache_equals_server(lab.root, cache)


def test_append_only_file_shrunk_on_server_is_fetched_whole(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    logs = lab.root / _a_run(lab).rel / "logs.txt"
    lines = logs.read_bytes().splitlines(keepends=True)
    logs.write_bytes(b"".join(lines[: len(lines) // 2]))
    lab.publish(now=NOW + 60)

    stats = client.sync()

    assert (stats["incremental_count"], stats["full_count"]) == (0, 1)
    assert_cache_equals_server(lab.root, cache)


def test_appended_file_keeps_its_inode_for_tailing_viewers(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    run = _a_run(lab, running=True)
    inode = (cache / run.rel / "events.jsonl").stat().st_ino

    _step(lab)
    client.sync()

    assert (cache / run.rel / "events.jsonl").stat().st_ino == inode


def test_locally_damaged_file_is_fetched_again(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    victim = cache / _a_run(lab).rel / "summary.json"
    victim.unlink()

    stats = client_for(verify=True).sync()

    assert stats["skipped"] is False
    assert stats["files_synced"] == 1
    assert stats["verified"] is True
    assert_cache_equals_server(lab.root, cache)


@pytest.mark.parametrize("due", ["the slow cadence", "--verify"])
@pytest.mark.parametrize("damage", ["a file removed", "a finished run's status rewritten"])
def test_damage_the_quick_check_does_not_look_at_waits_for_the_full_check(
    lab: Lab, cache: Path, client_for, damage: str, due: str
) -> None:
    client_for().sync()
    run = cache / _a_run(lab, running=False).rel
    if damage == "a file removed":
        victim = run / "summary.json"
        victim.unlink()
    else:  # in place: neither a running run's nor in a container that moved
        victim = run / "status.json"
        victim.write_bytes(victim.read_bytes() + b" ")

    quick = client_for().sync()  # within VERIFY_INTERVAL of the cold sync's full check

    assert quick["skipped"] is True and "verified" not in quick
    assert damage != "a file removed" or not victim.exists()
    client = client_for(verify=True) if due == "--verify" else client_for()
    if due == "the slow cadence":
        client.VERIFY_INTERVAL = 0.0  # come round
    checked = client.sync()
    assert (checked["files_synced"], checked["verified"]) == (1, True)
    assert_cache_equals_server(lab.root, cache)


@pytest.mark.parametrize("damage", ["run directory removed", "status rewritten"])
def test_the_quick_check_of_every_sync_finds_a_run_or_status_changed_locally(
    lab: Lab, cache: Path, client_for, damage: str
) -> None:
    client_for().sync()
    if damage == "run directory removed":
        shutil.rmtree(cache / _a_run(lab, running=False).rel)
    else:  # what the upstream viewer does to a running run whose process it cannot find
        run = cache / _a_run(lab, running=True).rel
        (run / "status.json").write_bytes(b'{"status": "failed", "rewritten": "by a viewer"}')

    stats = client_for().sync()

    assert stats["skipped"] is False and "verified" not in stats
    assert_cache_equals_server(lab.root, cache)


@pytest.mark.parametrize("damage", ["removed", "a fifo"])
def test_a_grown_log_damaged_locally_between_full_checks_is_fetched_whole(
    lab: Lab, cache: Path, client_for, damage: str
) -> None:
    client_for().sync()
    run = _a_run(lab, running=True)
    cached_log = cache / run.rel / "events.jsonl"
    cached_log.unlink()
    if damage == "a fifo":
        os.mkfifo(cached_log)  # an append must neither hang on it nor write into it
    _step(lab)

    stats = client_for(delete=True).sync()

    assert stats["failed_count"] == 0 and "verified" not in stats
    assert_cache_equals_server(lab.root, cache)


def test_a_no_change_sync_lstats_running_runs_and_run_containers_only(
    lab: Lab, cache: Path, client_for, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_for().sync()
    cached: list[str] = []
    lstat = os.lstat

    def counting(path, *args, **kwargs):
        if str(path).startswith(str(cache)):
            cached.append(os.path.relpath(path, cache))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counting)
    stats = client_for().sync()

    running = {run.rel for run in lab.info.listed_runs if run.status == "running"}
    containers = {os.path.dirname(run.rel) for run in lab.info.listed_runs}
    assert stats["skipped"] is True
    checked = [path for path in cached if path.endswith("/status.json")]
    assert running and {os.path.dirname(path) for path in checked} == running
    assert len(checked) == len(running) < len(lab.info.listed_runs)
    assert containers <= set(cached)
    # the containers twice (checked, then stamped), the state directory and lock
    assert len(cached) - len(checked) <= 2 * len(containers) + 8


def test_an_interrupted_sync_makes_the_next_one_check_every_file(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    (cache / _a_run(lab).rel / "summary.json").unlink()
    client.cache.set_dirty(True)  # what a sync killed mid-way leaves behind

    stats = client_for().sync()

    assert (stats["files_synced"], stats["verified"]) == (1, True)
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- ordering, progress


def test_progress_rises_monotonically_to_total_on_the_calling_thread(lab: Lab, client_for) -> None:
    calls: list[tuple[int, int, str, int]] = []

    stats = client_for().sync(
        lambda done, total, path: calls.append((done, total, path, threading.get_ident()))
    )

    done = [c[0] for c in calls]
    assert done == sorted(done)
    assert done[-1] == calls[-1][1] == stats["files_total"] == lab.info.listed_files
    assert {c[3] for c in calls} == {threading.get_ident()}


def test_files_are_fetched_in_priority_order_across_runs(
    lab: Lab, sftp: paramiko.SFTPClient, client_for
) -> None:
    # One request in flight on one channel: the engine then finishes jobs in the order it
    # was given them, which is what this test observes.
    remote = SftpRemote(sftp, str(lab.root), depth=1)
    order: list[str] = []

    client_for(remote=remote, max_workers=1).sync(
        lambda done, total, path: order.append(path) if path else None
    )
    remote.close()

    priorities = [priority_for(path.split("/", 4)[4]) for path in order]
    assert priorities == sorted(priorities)
    assert priorities.count(1) == 2 * len(lab.info.listed_runs)


# --------------------------------------------------------------------------- failures and retries


def test_file_vanished_on_server_is_retried_even_if_the_revision_is_unchanged(
    lab: Lab, cache: Path, client_for
) -> None:
    victim = lab.root / _a_run(lab).rel / "summary.json"
    content, mtime_ns = victim.read_bytes(), victim.stat().st_mtime_ns
    victim.unlink()
    client = client_for()

    first = client.sync()
    victim.write_bytes(content)
    os.utime(victim, ns=(mtime_ns, mtime_ns))
    second = client.sync()
    third = client.sync()

    rel = victim.relative_to(lab.root).as_posix()
    assert first["failed_count"] == 1
    assert first["failed_files"] == {rel: "vanished on the server"}
    assert second["skipped"] is False
    assert (second["files_synced"], second["failed_count"]) == (1, 0)
    assert third["skipped"] is True
    assert_cache_equals_server(lab.root, cache)


def test_truncated_json_on_server_keeps_the_previous_local_copy(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    rel = f"{_a_run(lab).rel}/status.json"
    good = (cache / rel).read_bytes()
    server_copy = (lab.root / rel).read_bytes()
    (lab.root / rel).write_bytes(server_copy[: len(server_copy) // 2])
    lab.publish(now=NOW + 60)

    stats = client.sync()

    assert stats["failed_files"] == {rel: TRUNCATED_JSON}
    assert (cache / rel).read_bytes() == good
    (lab.root / rel).write_bytes(server_copy + b"\n")
    lab.publish(now=NOW + 120)
    assert client.sync()["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def _connect_through(proxy: WanProxy, server: SshServer) -> paramiko.SSHClient:
    ssh = paramiko.SSHClient()
    ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # loopback test proxy only
    ssh.connect(
        proxy.address[0],
        proxy.port,
        username=server.username,
        pkey=server.client_key(),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return ssh


def test_connection_cut_mid_sync_fails_the_rest_and_the_next_sync_completes(
    tmp_path: Path, backend: Backend, sshd_server: SshServer
) -> None:
    lab = make_lab(tmp_path, backend, runs=10, scale=1.0)
    cache = tmp_path / "cache"
    with WanProxy(sshd_server.port) as proxy:
        ssh = _connect_through(proxy, sshd_server)
        client = make_client(ssh.open_sftp(), lab.root, cache, backend, timeout=5.0)

        def cut_when_started(done: int, total: int, path: str) -> None:
            if done == 0:
                proxy.cut_after_bytes(lab.info.listed_bytes // 2)

        stats = client.sync(cut_when_started)
        client.close()
        ssh.close()

        assert stats["failed_count"] > 0
        assert stats["files_synced"] + stats["failed_count"] == lab.info.listed_files
        assert temp_files(cache) == []
        expected = server_files(lab.root)
        assert all(data == expected[path] for path, data in cache_files(cache).items())

        proxy.cancel_cut()
        ssh = _connect_through(proxy, sshd_server)
        retry = make_client(ssh.open_sftp(), lab.root, cache, backend).sync()
        ssh.close()

    assert retry["files_synced"] == stats["failed_count"]
    assert retry["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


_CHILD = """
import sys
from pathlib import Path
import paramiko
from runicorn.core.backend import load_backend
from runicorn.sync import transfer
from runicorn.sync.client import ManifestSyncClient

# Commits every BATCH_SIZE files, however fast they land: the bound the parent checks.
transfer.COMMIT_SPACING = 0.0
host, port, user, key, known_hosts, lab, cache, backend, stop_at = sys.argv[1:]
ssh = paramiko.SSHClient()
ssh.load_host_keys(known_hosts)
ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
ssh.connect(host, int(port), username=user, key_filename=key, look_for_keys=False,
            allow_agent=False)

def progress(done, total, path):
    print(done, total, flush=True)
    if done == int(stop_at):
        sys.stdin.readline()  # parked here until the parent kills us

client = ManifestSyncClient(ssh.open_sftp(), lab, Path(cache), 0.0,
                            backend=load_backend(backend), max_workers=2)
client.sync(progress)
print("finished", flush=True)
"""


def test_sync_killed_mid_way_resumes_without_refetching_finished_files(
    tmp_path: Path, backend: Backend, sshd_server: SshServer, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=12, scale=0.3)
    cache = tmp_path / "cache"
    stop_at = lab.info.listed_files // 2
    args = [
        sshd_server.host,
        str(sshd_server.port),
        sshd_server.username,
        str(sshd_server.client_key_path),
        str(sshd_server.known_hosts_path),
        str(lab.root),
        str(cache),
        backend.name,
        str(stop_at),
    ]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if int(line.split()[0]) == stop_at:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        with child:  # leaving it waits and closes the pipes
            child.kill()

    expected = server_files(lab.root)
    landed = {p: data for p, data in cache_files(cache).items() if p not in temp_files(cache)}
    assert len(landed) >= stop_at
    assert all(landed[path] == expected[path] for path in landed), "a partial file is visible"

    client = make_client(sftp, lab.root, cache, backend)
    stats = client.sync()
    client.close()

    assert_cache_equals_server(lab.root, cache)
    assert temp_files(cache) == []
    committed_at_least = stop_at - (ManifestSyncClient.BATCH_SIZE - 1)
    assert stats["files_synced"] <= lab.info.listed_files - committed_at_least


# --------------------------------------------------------------------------- hostile manifests


def _publish_document(lab: Lab, document: dict | bytes, *, gz: bool = True) -> None:
    data = document if isinstance(document, bytes) else orjson.dumps(document)
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        (lab.manifest_dir / name).unlink(missing_ok=True)
    if gz:
        (lab.manifest_dir / "full_manifest.json.gz").write_bytes(compress(data))
    else:
        (lab.manifest_dir / "full_manifest.json").write_bytes(data)


def _valid_document(lab: Lab) -> dict:
    return orjson.loads((lab.manifest_dir / "full_manifest.json").read_bytes())


def _first_file(document: dict) -> dict:
    return document["experiments"][0]["files"][0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _first_file(d).update(path=_first_file(d)["path"] + "/../../../../../x"), ".."),
        (lambda d: _first_file(d).update(path="/tmp/runicorn-escape"), "absolute"),
        (lambda d: _first_file(d).update(size="12"), "integer"),
        (lambda d: _first_file(d).update(mtime="__NaN__"), "not valid JSON"),
        (lambda d: d["experiments"][0].update(project=".runicorn-cache"), "safe path component"),
        (lambda d: d.update(remote_root="/somewhere/else"), "remote_root"),
        (lambda d: d["experiments"].append(d["experiments"][0]), "twice"),
    ],
    ids=["dotdot", "absolute", "bad-type", "nan-mtime", "hidden-project", "wrong-root", "dup"],
)
def test_hostile_manifest_is_refused_and_nothing_is_written(
    lab: Lab, cache: Path, client_for, tmp_path: Path, mutate, message: str
) -> None:
    document = _valid_document(lab)
    mutate(document)
    _publish_document(lab, orjson.dumps(document).replace(b'"__NaN__"', b"NaN"))

    with pytest.raises(ValueError, match=message):
        client_for().sync()

    assert cache_files(cache) == {}
    assert not Path("/tmp/runicorn-escape").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "lab"}


def test_gzip_bomb_is_refused(lab: Lab, cache: Path, client_for) -> None:
    bomb = gzip.compress(b" " * (8 * 1024 * 1024), compresslevel=9)
    _publish_document(lab, b"")
    (lab.manifest_dir / "full_manifest.json.gz").write_bytes(bomb)

    with pytest.raises(ValueError, match="decompresses to more than"):
        client_for(max_manifest_bytes=1024 * 1024).sync()

    assert cache_files(cache) == {}


def test_manifest_file_over_the_cap_is_refused(lab: Lab, cache: Path, client_for) -> None:
    with pytest.raises(ValueError, match="larger than"):
        client_for(max_manifest_bytes=64).sync()
    assert cache_files(cache) == {}


def test_missing_manifest_raises_oserror(lab: Lab, cache: Path, client_for) -> None:
    for path in lab.manifest_dir.glob("full_manifest.json*"):
        path.unlink()

    with pytest.raises(OSError, match="generate-manifest"):
        client_for().sync()
    assert cache_files(cache) == {}


def test_symlinked_directory_in_the_cache_is_never_followed(
    lab: Lab, cache: Path, client_for, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    project = lab.info.listed_runs[0].project
    cache.mkdir()
    (cache / project).symlink_to(outside, target_is_directory=True)

    stats = client_for().sync()

    assert list(outside.iterdir()) == []
    in_project = [p for p in server_files(lab.root) if p.startswith(project + "/")]
    assert stats["failed_count"] == len(in_project)
    assert all("symbolic link" in reason for reason in stats["failed_files"].values())
    assert (cache / project).is_symlink()


# --------------------------------------------------------------------------- deletion


def _remove_runs(lab: Lab, count: int) -> list[str]:
    victims = [r for r in lab.info.listed_runs if r.status != "running"][:count]
    for run in victims:
        for path in sorted(run.path.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        run.path.rmdir()
    lab.publish(now=lab.now + 60)
    return [run.rel for run in victims]


def test_vanished_runs_are_kept_unless_delete_is_asked(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    gone = _remove_runs(lab, 1)

    stats = client_for().sync()

    assert stats["deleted_count"] == 0
    assert (cache / gone[0]).is_dir()


def test_delete_removes_runs_that_vanished_from_the_server(
    lab: Lab, cache: Path, client_for
) -> None:
    client_for().sync()
    gone = _remove_runs(lab, 2)

    stats = client_for(delete=True).sync()

    assert stats["deleted_count"] == 2
    assert not any((cache / rel).exists() for rel in gone)
    assert {r.run_id for r in LocalCacheManager(cache).list_runs()} == {
        r.run_id for r in lab.info.listed_runs if r.rel not in gone
    }
    assert_cache_equals_server(lab.root, cache)


def test_an_empty_manifest_never_deletes_anything(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    before = cache_files(cache)
    document = _valid_document(lab)
    document.update(revision=document["revision"] + 1, snapshot_id="empty", experiments=[])
    document["statistics"] = {"total_experiments": 0, "total_files": 0, "total_bytes": 0}
    _publish_document(lab, document)

    stats = client_for(delete=True, allow_mass_delete=True).sync()

    assert stats["deleted_count"] == 0
    assert "refusing" in stats["reason"]
    assert cache_files(cache) == before


def test_mass_deletion_needs_an_explicit_flag(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    gone = _remove_runs(lab, 6)

    refused = client_for(delete=True).sync()
    allowed = client_for(delete=True, allow_mass_delete=True).sync()

    assert refused["deleted_count"] == 0
    assert "mass deletion" in refused["deletion_refused"]
    assert allowed["deleted_count"] == len(gone) == 6
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- dry run


def test_dry_run_on_a_new_cache_writes_nothing(lab: Lab, cache: Path, client_for) -> None:
    stats = client_for(dry_run=True).sync()

    assert not cache.exists()
    assert stats["files_total"] == lab.info.listed_files
    assert stats["bytes_total"] == lab.info.listed_bytes
    assert stats["files_synced"] == 0


def test_dry_run_reports_the_plan_and_changes_nothing(lab: Lab, cache: Path, client_for) -> None:
    client_for().sync()
    step = _step(lab)
    before = cache_files(cache)

    plan = client_for(dry_run=True, delete=True).sync()
    real = client_for(delete=True).sync()

    assert cache_files(cache) != before
    assert plan["files_total"] == real["files_total"]
    assert (plan["incremental_count"], plan["full_count"]) == (
        real["incremental_count"],
        real["full_count"],
    )
    assert plan["deleted_count"] == real["deleted_count"] == len(step.gone_runs())


# --------------------------------------------------------------------------- active manifests


def test_active_manifest_is_applied_when_the_full_one_is_unchanged(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for(delete=True)
    client.sync()
    step = training_step(lab.root, seed=SEED, now=NOW + 60)
    lab.publish(ManifestType.ACTIVE, now=NOW + 60)

    stats = client.sync()
    again = client.sync()

    assert stats["manifest_type"] == "active"
    assert stats["incremental_count"] == len(step.appended)
    assert stats["deleted_count"] == 0  # an active manifest never deletes
    for rel in step.gone_runs():
        assert (cache / rel).is_dir()
    assert again["skipped"] is True


def _step_published_full_then_active(lab: Lab):
    """A training step, then the full manifest and the active one, as cron or a publisher
    following a full generation with an active one publish them."""
    step = training_step(lab.root, seed=SEED, now=NOW + 60)
    lab.publish(ManifestType.FULL, now=NOW + 60)
    lab.publish(ManifestType.ACTIVE, now=NOW + 60)
    return step


def _holds_every_server_file(lab: Lab, cache: Path) -> None:
    """Every file the server lists, byte for byte (runs it removed may stay: no delete)."""
    expected = server_files(lab.root)
    actual = cache_files(cache)
    assert {path: actual.get(path) for path in expected} == expected


def test_a_step_applies_the_active_manifest_in_place_of_the_moved_full_one(
    lab: Lab, cache: Path, client_for, sshd_server: SshServer, sftp: paramiko.SFTPClient
) -> None:
    lab.publish(ManifestType.ACTIVE)  # names full revision 1
    sshd_server.reset_request_counts()
    client = client_for()
    client.sync()
    step = _step_published_full_then_active(lab)
    client.close()
    fresh_client = client_for()  # a new process: what it knows comes from the cache state
    sshd_server.wait_sftp_sessions_closed()
    settle(sftp)
    sshd_server.reset_request_counts()

    stats = fresh_client.sync()
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    again = fresh_client.sync()

    assert stats["manifest_type"] == "active"
    assert (stats["delta_from"], stats["delta_to"]) == (1, 2)
    assert "in place of full revision 2" in stats["reason"]
    assert stats["incremental_count"] == len(step.appended)
    _holds_every_server_file(lab, cache)
    # the manifests' probe and the changed files only: nothing read the full manifest
    assert counts.by_type.get("READ", 0) <= 2 + stats["files_synced"], counts.by_type
    assert again["skipped"] is True
    assert again["reason"] == "manifest revision 2 unchanged"


def test_delete_reads_the_full_manifest_even_when_the_active_one_covers_the_step(
    lab: Lab, cache: Path, client_for
) -> None:
    lab.publish(ManifestType.ACTIVE)
    client = client_for(delete=True)
    client.sync()
    step = _step_published_full_then_active(lab)

    stats = client.sync()

    assert stats["manifest_type"] == "full"
    assert "delta_from" not in stats
    assert stats["deleted_count"] == len(step.gone_runs()) > 0
    assert_cache_equals_server(lab.root, cache)


@pytest.mark.parametrize("why", ["verify", "full-not-named-yet"])
def test_the_full_manifest_is_read_when_the_active_one_cannot_stand_in(
    lab: Lab, cache: Path, client_for, why: str
) -> None:
    lab.publish(ManifestType.ACTIVE)
    client = client_for(verify=why == "verify")
    client.sync()
    training_step(lab.root, seed=SEED, now=NOW + 60)
    lab.publish(ManifestType.FULL, now=NOW + 60)
    if why == "verify":
        lab.publish(ManifestType.ACTIVE, now=NOW + 60)
    # else: the active manifest still names full revision 1 only, not the newest

    stats = client.sync()

    assert stats["manifest_type"] == "full"
    assert "delta_from" not in stats
    _holds_every_server_file(lab, cache)


def test_first_sync_uses_the_full_manifest_even_when_active_is_asked(
    lab: Lab, cache: Path, client_for
) -> None:
    lab.publish(ManifestType.ACTIVE)

    stats = client_for(manifest_type="active").sync()

    assert stats["manifest_type"] == "full"
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- synthesised manifests


def test_sync_with_manifest_applies_a_synthesised_legacy_manifest(
    lab: Lab, cache: Path, client_for
) -> None:
    manifest = SyncManifest.from_json((lab.manifest_dir / "full_manifest.json").read_bytes())
    manifest.revision = 0
    for entry in manifest.iter_files():
        entry.tail_hash = None
        entry.mtime = float(int(entry.mtime))
    client = client_for()

    stats = client.sync_with_manifest(manifest)

    assert stats["files_synced"] == lab.info.listed_files
    assert {p: d for p, d in cache_files(cache).items()} == server_files(lab.root)


def test_sync_with_manifest_refuses_another_root(lab: Lab, cache: Path, client_for) -> None:
    manifest = SyncManifest.from_json((lab.manifest_dir / "full_manifest.json").read_bytes())
    manifest.remote_root = "/elsewhere"

    with pytest.raises(ValueError, match="remote_root"):
        client_for().sync_with_manifest(manifest)
    assert cache_files(cache) == {}

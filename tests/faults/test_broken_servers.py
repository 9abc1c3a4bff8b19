"""Hostile or broken servers, through the sync client against a real sshd (issue 5, item 5).

A file that changes under the client, a manifest that lies about the files, a run the login user
may not read and a server that allows a single channel each end with every readable file synced,
the others failed with a reason, nothing partial visible in the cache, and the next sync repairing
what the server repaired. Proven elsewhere: a file replaced by a directory making the CLI exit 3
and the next sync retrying it (test_cli_sync.py::test_partial_sync_exits_3_and_the_next_sync_
retries), a file vanished between manifest and download (test_manifest_sync.py::test_file_
vanished_on_server_is_retried_even_if_the_revision_is_unchanged), the transfer engine alone on a
one-session server (test_remote.py::test_a_server_allowing_one_session_still_fetches).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from harness.lab import (
    NOW,
    Lab,
    assert_cache_equals_server,
    cache_files,
    make_client,
    server_files,
    temp_files,
)
from harness.sshd import SshServer
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import build_sample_lab
from runicorn.remote_storage import MetadataSyncService
from runicorn.sync.cache import LocalCacheManager

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=6)]

# One user per test process: test runs of two checkouts on one machine each create and
# remove their own, so one never deletes the user the other is logged in as.
UNPRIVILEGED_USER = f"runicorn-unpriv-{os.getpid()}"


def _rel(lab: Lab, name: str, *, running: bool = False) -> str:
    run = next(r for r in lab.info.listed_runs if (r.status == "running") == running)
    return f"{run.rel}/{name}"


def _rewrite(path: Path, data: bytes, mtime: float) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def _edit_manifest(lab: Lab, edit) -> None:
    """Change the published full manifest (both copies) the way a lying server would."""
    plain = lab.manifest_dir / "full_manifest.json"
    document = orjson.loads(plain.read_bytes())
    document["revision"] += 1
    document["snapshot_id"] = f"edited-{document['revision']}"
    edit(document)
    files = [f for exp in document["experiments"] for f in exp["files"]]
    document["statistics"]["total_bytes"] = sum(f["size"] for f in files)
    plain.write_bytes(orjson.dumps(document))
    (lab.manifest_dir / "full_manifest.json.gz").unlink()


def _entry(document: dict, path: str) -> dict:
    return next(f for exp in document["experiments"] for f in exp["files"] if f["path"] == path)


# --------------------------------------------------------------------------- files that change


def test_file_shrunk_after_the_manifest_fails_keeps_the_cached_copy_and_is_retried(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    rel = _rel(lab, "summary.json")
    old = (cache / rel).read_bytes()
    new = orjson.dumps({"loss": 0.125, "note": "x" * 200})
    _rewrite(lab.root / rel, new, NOW + 60)
    lab.publish(now=NOW + 60)
    _rewrite(lab.root / rel, new[:10], NOW + 61)  # shrinks after the manifest was published

    shrunk = client.sync()

    assert shrunk["failed_files"] == {rel: shrunk["failed_files"][rel]}
    assert "shrank" in shrunk["failed_files"][rel]
    assert (cache / rel).read_bytes() == old
    assert temp_files(cache) == []
    _rewrite(lab.root / rel, new, NOW + 60)  # back to what the unchanged manifest says
    retried = client.sync()
    assert (retried["skipped"], retried["files_synced"], retried["failed_count"]) == (False, 1, 0)
    assert_cache_equals_server(lab.root, cache)


def test_manifest_claiming_more_log_than_the_server_has_fails_it_without_touching_the_cache(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    rel = _rel(lab, "events.jsonl", running=True)
    before = (cache / rel).read_bytes()
    inode = (cache / rel).stat().st_ino

    def claim_more(document: dict) -> None:
        entry = _entry(document, rel)
        entry["size"] += 4096
        entry["mtime"] += 60
        entry.pop("tail_hash", None)

    _edit_manifest(lab, claim_more)

    stats = client.sync()

    assert list(stats["failed_files"]) == [rel]
    assert "shrank" in stats["failed_files"][rel]
    assert (cache / rel).read_bytes() == before
    assert (cache / rel).stat().st_ino == inode
    assert temp_files(cache) == []
    lab.publish(now=NOW + 120)
    assert client.sync()["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def test_manifest_with_mtimes_newer_than_the_files_syncs_the_servers_bytes(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()

    def from_the_future(document: dict) -> None:
        for exp in document["experiments"]:
            for entry in exp["files"]:
                entry["mtime"] += 3600.0

    _edit_manifest(lab, from_the_future)

    stats = client.sync()

    assert stats["failed_count"] == 0
    assert cache_files(cache) == server_files(lab.root)
    assert temp_files(cache) == []


def test_file_replaced_by_a_directory_fails_and_keeps_the_cached_copy(
    lab: Lab, cache: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    rel = _rel(lab, "summary.json")
    old = (cache / rel).read_bytes()
    _rewrite(lab.root / rel, old + b" ", NOW + 60)
    lab.publish(now=NOW + 60)
    (lab.root / rel).unlink()
    (lab.root / rel).mkdir()

    stats = client.sync()

    assert list(stats["failed_files"]) == [rel]
    assert (cache / rel).read_bytes() == old
    assert temp_files(cache) == []


# --------------------------------------------------------------------------- one channel only


def test_server_allowing_one_channel_still_syncs_everything_with_fewer_workers(
    lab: Lab,
    cache: Path,
    backend: Backend,
    sshd_factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = sshd_factory(max_sessions=1)
    ssh = server.connect()
    try:
        sftp = ssh.open_sftp()
        client = make_client(sftp, lab.root, cache, backend, max_workers=4)
        try:
            with caplog.at_level(logging.WARNING, logger="runicorn"):
                stats = client.sync()
        finally:
            client.close()
        assert sftp.listdir(str(lab.root))  # the user's own channel still works
    finally:
        ssh.close()

    assert stats["failed_count"] == 0
    assert stats["files_synced"] == lab.info.listed_files
    assert "MaxSessions" in caplog.text
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- permission denied


@pytest.fixture(scope="session")
def unprivileged_user() -> Iterator[str]:
    """A login user without privileges (sshd runs as root here, so chmod alone blocks nothing
    for a root login). Created with useradd when the tests run as root, removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create an unprivileged login user")
    created = False
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        subprocess.run(
            # '*': no password can match, yet the account is not locked (sshd refuses those)
            ["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", "-p", "*", UNPRIVILEGED_USER],
            check=True,
            capture_output=True,
        )
        created = True
    yield UNPRIVILEGED_USER
    if created:
        subprocess.run(["userdel", UNPRIVILEGED_USER], check=False, capture_output=True)


@pytest.fixture
def unprivileged_server(unprivileged_user: str) -> Iterator[SshServer]:
    server = SshServer()
    server.username = unprivileged_user
    server.start()
    try:
        # sshd reads authorized_keys as the login user; the private keys in it stay 0600.
        os.chmod(server.directory, 0o755)
        yield server
    finally:
        server.stop()


@pytest.fixture
def world_readable_lab(backend: Backend) -> Iterator[Lab]:
    """A lab outside pytest's private (0700) temp tree, so another user can read it."""
    base = Path(tempfile.mkdtemp(prefix="runicorn-shared-lab-"))
    try:
        os.chmod(base, 0o755)
        info = build_sample_lab(base / "lab", runs=6, seed=11, scale=0.05, now=NOW)
        lab = Lab(root=base / "lab", info=info, now=NOW, backend=backend)
        lab.publish()
        for path in lab.manifest_dir.iterdir():
            os.chmod(path, 0o644)
        yield lab
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_permission_denied_on_one_run_fails_only_its_files_and_the_next_sync_completes(
    world_readable_lab: Lab, unprivileged_server: SshServer, tmp_path: Path, backend: Backend
) -> None:
    lab = world_readable_lab
    locked = lab.info.listed_runs[0]
    cache = tmp_path / "cache"
    ssh = unprivileged_server.connect()
    try:
        client = make_client(ssh.open_sftp(), lab.root, cache, backend)
        try:
            os.chmod(locked.path, 0o700)
            denied = client.sync()
            os.chmod(locked.path, 0o755)
            repaired = client.sync()
        finally:
            os.chmod(locked.path, 0o755)
            client.close()
    finally:
        ssh.close()

    expected = {f"{locked.rel}/{name}" for name in locked.synced_files}
    assert set(denied["failed_files"]) == expected
    assert set(denied["failed_files"].values()) == {"permission denied on the server"}
    assert denied["files_synced"] == lab.info.listed_files - len(expected)
    assert temp_files(cache) == []
    assert (repaired["files_synced"], repaired["failed_count"]) == (len(expected), 0)
    assert_cache_equals_server(lab.root, cache)


def test_legacy_walk_denied_one_run_syncs_the_rest_and_deletes_nothing(
    world_readable_lab: Lab, unprivileged_server: SshServer, tmp_path: Path, backend: Backend
) -> None:
    lab = world_readable_lab
    locked = lab.info.listed_runs[0]
    cache = tmp_path / "cache"
    ssh = unprivileged_server.connect()
    manager = LocalCacheManager(cache)
    try:
        sftp = ssh.open_sftp()
        first = make_client(sftp, lab.root, cache, backend, cache_manager=manager)
        try:
            first.sync()
        finally:
            first.close()
        before = cache_files(cache)
        shutil.rmtree(lab.manifest_dir)  # no manifest: the service walks the tree
        os.chmod(locked.path, 0o700)
        service = MetadataSyncService(
            None,
            sftp,
            str(lab.root),
            manager,
            manifest_sync_jitter=0.0,
            backend=backend,
            delete=True,
            allow_mass_delete=True,
        )
        try:
            service.sync_all()
        finally:
            os.chmod(locked.path, 0o755)
    finally:
        manager.close()
        ssh.close()

    assert service.progress.mode == "legacy"
    assert service.last_walk is not None and not service.last_walk.complete
    assert cache_files(cache) == before
    assert locked.run_id in {run.run_id for run in LocalCacheManager(cache).list_runs()}

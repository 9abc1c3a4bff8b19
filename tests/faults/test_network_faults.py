"""Network faults between the client and a real sshd, injected by the loopback WanProxy (issue 5,
item 1): the link cut during the manifest download, during a whole-file fetch and during an
append, and a server that stops answering. Each faulted sync ends with a clear error, leaves no
temp or partial file under a real name and a state that matches the disk; the next sync over a
fresh connection leaves the cache equal to the server, byte for byte."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from click.testing import CliRunner

from harness.lab import (
    Lab,
    assert_cache_equals_server,
    cache_files,
    make_client,
    make_lab,
    server_files,
    temp_files,
)
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.sync import service as service_module
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.service import MetadataSyncService
from runicorn.transport import sftp_pipeline

pytestmark = pytest.mark.sshd

PROBE_BYTES = 4096
"""What the client's no-change check reads of the manifest before deciding to download it."""
SFTP_SLACK = 1024
"""Generous upper bound of the SFTP/SSH framing around the few requests before a transfer."""
BIG = 2 * 1024 * 1024
"""Size of the file (or append) the link dies in the middle of."""
WATCHDOG = 60.0
"""A faulted sync that has not returned by then is hanging (the bug this file guards against)."""
TIMEOUT = 2.0


@pytest.fixture
def proxy(sshd_server: SshServer) -> Iterator[WanProxy]:
    with WanProxy(sshd_server.port) as wan:
        yield wan


def _trust(proxy: WanProxy, sshd_server: SshServer, path: Path) -> Path:
    """A known_hosts file trusting the test server's host key at the proxy's address."""
    path.write_text(f"[{proxy.address[0]}]:{proxy.port} {sshd_server.host_public_key}\n")
    return path


def _open_sftp(
    proxy: WanProxy, sshd_server: SshServer, known_hosts: Path, opened: list[paramiko.SSHClient]
) -> paramiko.SFTPClient:
    ssh = paramiko.SSHClient()
    opened.append(ssh)
    ssh.load_host_keys(str(known_hosts))
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    ssh.connect(
        proxy.address[0],
        proxy.port,
        username=sshd_server.username,
        pkey=sshd_server.client_key(),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return ssh.open_sftp()


@pytest.fixture
def proxy_known_hosts(proxy: WanProxy, sshd_server: SshServer, tmp_path: Path) -> Path:
    return _trust(proxy, sshd_server, tmp_path / "known_hosts")


@pytest.fixture
def connect(
    proxy: WanProxy, sshd_server: SshServer, proxy_known_hosts: Path
) -> Iterator[Callable[[], paramiko.SFTPClient]]:
    """Open SSH connections through the proxy (each a fresh TCP link); all closed afterwards."""
    opened: list[paramiko.SSHClient] = []
    yield lambda: _open_sftp(proxy, sshd_server, proxy_known_hosts, opened)
    for ssh in opened:
        ssh.close()


def _sync(
    sftp: paramiko.SFTPClient, lab: Lab, cache: Path, backend: Backend, **options: Any
) -> dict[str, Any]:
    client = make_client(sftp, lab.root, cache, backend, timeout=TIMEOUT, **options)
    try:
        return client.sync()
    finally:
        client.close()


def _within_watchdog(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``call`` on a thread; fail the test if it has not returned within WATCHDOG."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WATCHDOG)
    assert not thread.is_alive(), f"the sync still hangs after {WATCHDOG} s"
    return outcome.get("value"), outcome.get("error")


def _gz_size(lab: Lab) -> int:
    return (lab.manifest_dir / "full_manifest.json.gz").stat().st_size


def _cut_after_manifest(proxy: WanProxy, lab: Lab, into_transfer: int) -> None:
    """Arm the cut ``into_transfer`` bytes past the probe and the manifest download."""
    proxy.reset_counters()
    proxy.cut_after_bytes(PROBE_BYTES + _gz_size(lab) + SFTP_SLACK + into_transfer)


def _assert_state_matches_disk(cache: Path, failed: set[str]) -> None:
    """Every recorded file is on disk with its recorded size and mtime; every failure is
    remembered for the next sync."""
    manager = LocalCacheManager(cache)
    try:
        assert manager.damaged_files() == set()
        for path, size, mtime, _hash in manager.file_entries():
            st = os.lstat(cache / path)
            assert st.st_size == size, path
            assert abs(st.st_mtime_ns - round(mtime * 1e9)) < 1_000, path
        assert {f.path for f in manager.failed_files()} == failed
        assert manager.temp_files() == []
    finally:
        manager.close()


def _assert_every_cached_file_is_a_server_version(
    cache: Path, expected: dict[str, bytes], old: dict[str, bytes]
) -> None:
    for path, data in cache_files(cache).items():
        assert data in (expected.get(path), old.get(path)), f"{path} is neither version"


def _big_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _big_lines(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    total = 0
    step = 0
    while total < size:
        line = b'{"step": %d, "noise": "%s"}\n' % (step, rng.randbytes(48).hex().encode())
        lines.append(line)
        total += len(line)
        step += 1
    return b"".join(lines)


# --------------------------------------------------------------------------- cut links


def test_link_cut_during_the_manifest_download_raises_oserror_and_writes_nothing(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=60)
    cache = tmp_path / "cache"
    assert _gz_size(lab) > 2 * PROBE_BYTES  # the cut below lands inside the download
    sftp = connect()
    proxy.reset_counters()
    proxy.cut_after_bytes(PROBE_BYTES + SFTP_SLACK + _gz_size(lab) // 2)

    _result, error = _within_watchdog(lambda: _sync(sftp, lab, cache, backend))

    assert proxy.cuts == 1
    assert isinstance(error, OSError)
    assert "cannot read the manifest" in str(error)
    assert cache_files(cache) == {}
    retry = _sync(connect(), lab, cache, backend)
    assert (retry["failed_count"], retry["files_synced"]) == (0, lab.info.listed_files)
    assert_cache_equals_server(lab.root, cache)


def test_link_cut_during_the_manifest_download_makes_the_service_fail_cleanly(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=60)
    cache = tmp_path / "cache"
    sftp = connect()
    proxy.reset_counters()
    proxy.cut_after_bytes(PROBE_BYTES + SFTP_SLACK + _gz_size(lab) // 2)
    manager = LocalCacheManager(cache)
    service = MetadataSyncService(
        None,
        sftp,
        str(lab.root),
        manager,
        manifest_sync_jitter=0.0,
        backend=backend,
        timeout=TIMEOUT,
    )

    ok, error = _within_watchdog(service.sync_all)
    manager.close()

    assert error is None
    assert ok is False
    assert service.fallback_reason is not None
    assert "cannot read the manifest" in service.fallback_reason
    assert service.progress.phase == service_module.PHASE_FAILED
    assert service.progress.last_error
    assert temp_files(cache) == []
    retry = _sync(connect(), lab, cache, backend)
    assert retry["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def test_link_cut_during_a_whole_file_keeps_the_old_file_and_the_next_sync_completes(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=10)
    cache = tmp_path / "cache"
    assert _sync(connect(), lab, cache, backend)["failed_count"] == 0
    run = lab.info.listed_runs[0]
    media = sorted(p for p in run.synced_files if p.startswith("media/"))[0]
    rel = f"{run.rel}/{media}"
    old = server_files(lab.root)
    (lab.root / rel).write_bytes(_big_bytes(1, BIG))
    lab.publish(now=lab.now + 60)
    sftp = connect()
    _cut_after_manifest(proxy, lab, BIG // 2)

    stats, error = _within_watchdog(lambda: _sync(sftp, lab, cache, backend))

    assert error is None
    assert proxy.cuts == 1
    assert stats["failed_count"] == 1
    assert stats["files_synced"] == 0
    assert stats["failed_files"][rel].startswith("connection lost")
    assert (cache / rel).read_bytes() == old[rel]
    assert temp_files(cache) == []
    _assert_every_cached_file_is_a_server_version(cache, server_files(lab.root), old)
    _assert_state_matches_disk(cache, {rel})
    retry = _sync(connect(), lab, cache, backend)
    assert (retry["files_synced"], retry["full_count"], retry["failed_count"]) == (1, 1, 0)
    assert_cache_equals_server(lab.root, cache)
    _assert_state_matches_disk(cache, set())


def test_link_cut_during_an_append_leaves_the_cached_log_untouched_and_the_next_sync_appends(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=10)
    cache = tmp_path / "cache"
    assert _sync(connect(), lab, cache, backend)["failed_count"] == 0
    run = lab.info.running_runs[0]
    rel = f"{run.rel}/events.jsonl"
    old = server_files(lab.root)
    inode = (cache / rel).stat().st_ino
    with open(lab.root / rel, "ab") as handle:
        handle.write(_big_lines(2, BIG))
    lab.publish(now=lab.now + 60)
    sftp = connect()
    _cut_after_manifest(proxy, lab, BIG // 2)

    stats, error = _within_watchdog(lambda: _sync(sftp, lab, cache, backend))

    assert error is None
    assert proxy.cuts == 1
    assert stats["failed_count"] == 1
    assert stats["failed_files"][rel].startswith("connection lost")
    assert (cache / rel).read_bytes() == old[rel]
    assert temp_files(cache) == []
    _assert_every_cached_file_is_a_server_version(cache, server_files(lab.root), old)
    _assert_state_matches_disk(cache, {rel})
    retry = _sync(connect(), lab, cache, backend)
    assert (retry["incremental_count"], retry["full_count"], retry["failed_count"]) == (1, 0, 0)
    assert (cache / rel).stat().st_ino == inode
    assert_cache_equals_server(lab.root, cache)


def test_link_cut_in_a_cold_sync_fails_the_unfinished_files_and_the_next_sync_fetches_them(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=10, scale=1.0)
    cache = tmp_path / "cache"
    sftp = connect()
    _cut_after_manifest(proxy, lab, lab.info.listed_bytes // 2)

    stats, error = _within_watchdog(lambda: _sync(sftp, lab, cache, backend))

    assert error is None
    assert stats["failed_count"] > 0
    assert stats["files_synced"] + stats["failed_count"] == lab.info.listed_files
    assert temp_files(cache) == []
    _assert_every_cached_file_is_a_server_version(cache, server_files(lab.root), {})
    _assert_state_matches_disk(cache, set(stats["failed_files"]))
    retry = _sync(connect(), lab, cache, backend)
    assert retry["files_synced"] == stats["failed_count"]
    assert retry["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


# --------------------------------------------------------------------------- stalled server


def test_stalled_server_fails_the_manifest_read_after_the_timeout(
    tmp_path: Path, backend: Backend, proxy: WanProxy, connect
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    cache = tmp_path / "cache"
    sftp = connect()
    proxy.stall()

    _result, error = _within_watchdog(lambda: _sync(sftp, lab, cache, backend))

    assert isinstance(error, OSError)
    assert "sent nothing for 2.0 s" in str(error)
    assert cache_files(cache) == {}
    proxy.resume()
    assert _sync(connect(), lab, cache, backend)["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def test_server_stalled_mid_transfer_fails_the_remaining_files_after_the_timeout(
    tmp_path: Path, backend: Backend, sshd_server: SshServer
) -> None:
    lab = make_lab(tmp_path, backend, runs=10, scale=1.0)
    cache = tmp_path / "cache"
    opened: list[paramiko.SSHClient] = []
    # A slow link (1 MB/s, small queue): most of the lab is still on the wire when it stalls.
    with WanProxy(sshd_server.port, bandwidth_bps=8e6, buffer_bytes=64 * 1024) as slow:
        known_hosts = _trust(slow, sshd_server, tmp_path / "known_hosts")
        sftp = _open_sftp(slow, sshd_server, known_hosts, opened)

        def stall_after_first_file(done: int, total: int, path: str) -> None:
            if done == 1:
                slow.stall()

        def faulted() -> dict[str, Any]:
            client = make_client(sftp, lab.root, cache, backend, timeout=TIMEOUT)
            try:
                return client.sync(stall_after_first_file)
            finally:
                client.close()

        stats, error = _within_watchdog(faulted)
        slow.close_all()
        slow.resume()
        for ssh in opened:
            ssh.close()

    assert error is None
    assert stats["failed_count"] > 0
    assert stats["files_synced"] + stats["failed_count"] == lab.info.listed_files
    assert any("sent nothing" in reason for reason in stats["failed_files"].values())
    assert temp_files(cache) == []
    _assert_state_matches_disk(cache, set(stats["failed_files"]))
    sftp = sshd_server.connect().open_sftp()
    try:
        retry = _sync(sftp, lab, cache, backend)
    finally:
        sftp.get_channel().get_transport().close()
    assert retry["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def _cli_args_through(proxy: WanProxy, sshd_server: SshServer, lab, tmp_path: Path, known_hosts):
    return [
        "sync",
        f"{sshd_server.username}@{proxy.address[0]}:{lab.root}",
        str(tmp_path / "cache"),
        "--port",
        str(proxy.port),
        "-i",
        str(sshd_server.client_key_path),
        "--known-hosts",
        str(known_hosts),
        "--ssh-config",
        str(tmp_path / "no_config"),
        "--timeout",
        "1",
    ]


def test_cli_timeout_option_ends_a_sync_against_a_stalled_server_with_exit_1(
    tmp_path: Path,
    backend: Backend,
    proxy: WanProxy,
    sshd_server: SshServer,
    proxy_known_hosts: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    original = sftp_pipeline._first_round_trip

    def stall_then_start(*args: Any, **kwargs: Any) -> Any:
        proxy.stall()  # connected, authenticated, channel open: the server stops answering
        return original(*args, **kwargs)

    monkeypatch.setattr(sftp_pipeline, "_first_round_trip", stall_then_start)
    args = _cli_args_through(proxy, sshd_server, lab, tmp_path, proxy_known_hosts)

    result, error = _within_watchdog(lambda: CliRunner().invoke(main, args, catch_exceptions=False))

    assert error is None
    assert result.exit_code == 1, result.output
    # On a busy machine the automatic compression check can re-key just as the server
    # stalls; then the send waiting for that key exchange gives up after the same timeout.
    assert (
        "sent nothing for 1.0 s" in result.stderr
        or "Key-exchange timed out waiting for key negotiation" in result.stderr
    ), result.stderr
    assert not (tmp_path / "cache").exists() or temp_files(tmp_path / "cache") == []


def test_cli_server_stalling_after_the_manifest_arrived_is_a_partial_sync_exit_3(
    tmp_path: Path,
    backend: Backend,
    proxy: WanProxy,
    sshd_server: SshServer,
    proxy_known_hosts: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    original_sync = ManifestSyncClient.sync

    def stall_then_sync(self: ManifestSyncClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        proxy.stall()  # the manifest came with the session's first round trip; files did not
        return original_sync(self, *args, **kwargs)

    monkeypatch.setattr(ManifestSyncClient, "sync", stall_then_sync)
    args = _cli_args_through(proxy, sshd_server, lab, tmp_path, proxy_known_hosts)

    result, error = _within_watchdog(lambda: CliRunner().invoke(main, args, catch_exceptions=False))

    assert error is None
    assert result.exit_code == 3, result.output
    assert "sent nothing for 1.0 s" in result.stderr
    assert temp_files(tmp_path / "cache") == []

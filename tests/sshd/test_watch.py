"""``ManifestSyncClient.watch`` against a real OpenSSH server, on both backends: what the
server publishes reaches the cache while the watch runs, it costs little while idle, it
survives a dropped session, and it stops when told to from another thread.

The server side is the test's: it changes the lab and publishes manifests as a publisher
would. Every wait is for a condition re-checked after each pass (``on_sync``), with a
deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner

from harness.child_lines import ChildLines
from harness.lab import Lab, assert_cache_equals_server, cache_files
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.manifest import ManifestType
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.watch import CacheWatcher
from runicorn.transport import change_feed
from runicorn.transport.sftp_remote import SftpRemote

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=6, scale=0.02)]

DEADLINE_SECONDS = 30.0


class Watching:
    """A client's watch on a thread, and waits for conditions after its passes."""

    def __init__(self, client: ManifestSyncClient, **options: object) -> None:
        self.client = client
        self.passes: list[dict] = []
        self.errors: list[BaseException] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=client.watch,
            kwargs={
                "interval": 0.02,
                "full_interval": 0.5,
                "on_sync": self._on_sync,
                "on_error": self._on_error,
                **options,
            },
            daemon=True,
        )

    def _on_sync(self, stats: dict) -> None:
        with self._changed:
            self.passes.append(stats)
            self._changed.notify_all()

    def _on_error(self, error: BaseException, _retry_in: float) -> None:
        with self._changed:
            self.errors.append(error)
            self._changed.notify_all()

    def start(self) -> Watching:
        self._thread.start()
        self.wait_for(lambda: len(self.passes) >= 1)
        return self

    def start_pushed(self) -> Watching:
        """:meth:`start`, then wait for the server's push and the catch-up pass it brings;
        the watch is stopped again if that never comes."""
        self.start()
        try:
            watcher = self.client._watcher
            assert watcher is not None
            self.wait_for(lambda: watcher.pushed)
            self.wait_for(lambda: len(self.passes) >= 2)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.client.stop_watch()
        self._thread.join(DEADLINE_SECONDS)
        assert not self._thread.is_alive(), "the watch did not stop"

    def wait_for(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"condition not met; last passes {self.passes[-3:]}")
                self._changed.wait(remaining)


@pytest.fixture
def watching(client_for) -> Iterator[Watching]:
    watch = Watching(client_for()).start()
    yield watch
    watch.stop()


def _running_events(lab: Lab) -> tuple[Path, str]:
    run = next(r for r in lab.info.listed_runs if r.status == "running")
    return run.path / "events.jsonl", f"{run.rel}/events.jsonl"


def test_an_appended_line_reaches_the_cache(watching: Watching, lab: Lab, cache: Path):
    events, rel = _running_events(lab)
    with open(events, "a") as handle:
        handle.write('{"step": 99999}\n')
    lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
    expected = events.read_bytes()
    watching.wait_for(lambda: cache_files(cache).get(rel) == expected)
    # (the file lands during the pass, which is recorded once it ends)
    watching.wait_for(
        lambda: any(p["manifest_type"] == "active" and not p["skipped"] for p in watching.passes)
    )


def test_a_new_run_arrives_and_a_removed_one_is_kept_without_delete(
    watching: Watching, lab: Lab, cache: Path
):
    source = next(r for r in lab.info.listed_runs if r.status == "running")
    new = source.path.with_name(source.run_id + "_copy")
    shutil.copytree(source.path, new)
    removed = next(r for r in lab.info.listed_runs if r.status != "running")
    shutil.rmtree(removed.path)
    lab.publish(ManifestType.FULL, now=lab.now + 60)
    new_rel = f"{source.rel}_copy/meta.json"
    watching.wait_for(lambda: new_rel in cache_files(cache))
    watching.wait_for(lambda: any(p.get("vanished_runs") for p in watching.passes))
    assert (cache / removed.rel / "meta.json").exists()
    runs = {r.run_id for r in LocalCacheManager(cache).list_runs()}
    assert {source.run_id + "_copy", removed.run_id} <= runs


def test_an_idle_watch_costs_at_most_three_requests_a_probe(
    client_for, lab: Lab, sshd_server: SshServer
):
    """OPEN, READ and CLOSE of the active manifest's ``.gz`` (the publisher writes it; a
    server without one costs two failed OPENs more and a probe of the full manifest)."""
    lab.publish(ManifestType.ACTIVE)
    watch = Watching(client_for(), full_interval=3600.0, interval=0.01, push=False).start()
    try:
        watch.wait_for(lambda: len(watch.passes) >= 2)
        sshd_server.reset_request_counts()
        first = len(watch.passes)
        watch.wait_for(lambda: len(watch.passes) >= first + 10)
    finally:
        watch.stop()
    probes = len(watch.passes) - first
    counts = sshd_server.sftp_request_count()
    # A probe in flight when counting started may add its requests to the count.
    assert counts.total <= 3 * (probes + 1), counts.by_type
    assert all(p["skipped"] and p["manifest_type"] == "active" for p in watch.passes[first:])


def test_a_pushed_watch_applies_a_publication_without_polling(client_for, lab: Lab, cache: Path):
    """With the probe interval and the full check an hour away, only the server's push can
    bring the append."""
    lab.publish(ManifestType.ACTIVE)
    client = client_for()
    watch = Watching(client, interval=3600.0, full_interval=3600.0, push=True).start_pushed()
    try:
        passes = len(watch.passes)
        events, rel = _running_events(lab)
        with open(events, "a") as handle:
            handle.write('{"step": 31337}\n')
        lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
        expected = events.read_bytes()
        watch.wait_for(lambda: cache_files(cache).get(rel) == expected)
    finally:
        watch.stop()
    assert [p["manifest_type"] for p in watch.passes[passes:]] == ["active"] * (
        len(watch.passes) - passes
    )


def test_a_pushed_publication_arrives_with_its_content_and_no_manifest_read(
    client_for, sftp: paramiko.SFTPClient, lab: Lab, cache: Path, sshd_server: SshServer
):
    """The server's command sends the new active manifest itself: the pass that applies it
    opens only the appended file over SFTP (the file stream, which would carry that file
    instead, is off here), never the manifest."""
    lab.publish(ManifestType.ACTIVE)
    client = client_for(remote=SftpRemote(sftp, str(lab.root), stream=False))
    watch = Watching(client, interval=3600.0, full_interval=3600.0, push=True).start_pushed()
    try:
        sshd_server.reset_request_counts()
        events, rel = _running_events(lab)
        with open(events, "a") as handle:
            handle.write('{"step": 4242}\n')
        lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
        expected = events.read_bytes()
        watch.wait_for(lambda: cache_files(cache).get(rel) == expected)
    finally:
        watch.stop()
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    assert counts["open"] == 1, counts.by_type


def test_a_pushed_full_publication_is_applied_through_the_active_one_naming_it(
    client_for, lab: Lab, cache: Path
):
    """A new full manifest followed by an active one that names it (what the publisher
    does): the pass takes the pushed active manifest in place of the whole full one."""
    lab.publish(ManifestType.ACTIVE)
    client = client_for()
    watch = Watching(client, interval=3600.0, full_interval=3600.0, push=True).start_pushed()
    try:
        passes = len(watch.passes)
        source = next(r for r in lab.info.listed_runs if r.status == "running")
        shutil.copytree(source.path, source.path.with_name(source.run_id + "_copy"))
        lab.publish(ManifestType.FULL, now=lab.now + 60)
        named = lab.publish(ManifestType.ACTIVE, now=lab.now + 1)
        full = lab.publish(ManifestType.FULL)  # unchanged: the one the active names
        assert named.changes_since and named.changes_since[-1] == full.snapshot_id
        new_rel = f"{source.rel}_copy/meta.json"
        watch.wait_for(lambda: new_rel in cache_files(cache))
        watch.wait_for(lambda: any("in place of full" in p["reason"] for p in watch.passes))
    finally:
        watch.stop()
    assert not any(
        p["manifest_type"] == "full" and not p["skipped"] for p in watch.passes[passes:]
    ), [p["reason"] for p in watch.passes[passes:]]


def test_a_server_without_python3_is_polled_instead(
    client_for, lab: Lab, cache: Path, monkeypatch, caplog
):
    monkeypatch.setattr(change_feed, "PYTHON", "runicorn-test-no-such-python")
    lab.publish(ManifestType.ACTIVE)
    client = client_for()
    with caplog.at_level("INFO", logger="runicorn.remote_storage.manifest_sync"):
        watch = Watching(client, push=True).start()
        try:
            watch.wait_for(lambda: "polling every" in caplog.text)
            watcher = client._watcher
            assert watcher is not None and not watcher.pushed
            events, rel = _running_events(lab)
            with open(events, "a") as handle:
                handle.write('{"step": 27182}\n')
            lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
            expected = events.read_bytes()
            watch.wait_for(lambda: cache_files(cache).get(rel) == expected)
        finally:
            watch.stop()
    assert "runicorn-test-no-such-python was not found on the server" in caplog.text
    assert caplog.text.count("no pushed changes") == 1  # not tried again on this connection


def test_a_pushed_watch_stops_at_once_when_told(client_for, lab: Lab):
    lab.publish(ManifestType.ACTIVE)
    client = client_for()
    watch = Watching(client, interval=3600.0, full_interval=3600.0, push=True).start_pushed()
    watch.stop()  # fails unless the hour-long wait for the next change ends


def test_a_dropped_session_is_reported_and_replaced(
    client_for, lab: Lab, cache: Path, ssh_client: paramiko.SSHClient
):
    dropped = ssh_client.open_sftp()
    client = client_for()
    client.use_sftp_client(dropped)
    watch = Watching(client, reconnect=ssh_client.open_sftp)
    watch.start()
    try:
        dropped.close()
        watch.wait_for(lambda: bool(watch.errors))
        events, rel = _running_events(lab)
        with open(events, "a") as handle:
            handle.write('{"step": 424242}\n')
        lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
        expected = events.read_bytes()
        watch.wait_for(lambda: cache_files(cache).get(rel) == expected)
    finally:
        watch.stop()


def test_stop_before_the_watch_starts_ends_it_at_once(client_for, cache: Path):
    client = client_for()
    client.stop_watch()
    client.watch(interval=0.01, full_interval=1.0)  # returns at once: no pass is made
    assert cache_files(cache) == {}


def test_the_watcher_refuses_intervals_that_cannot_work(client_for):
    client = client_for()
    with pytest.raises(ValueError, match="interval"):
        CacheWatcher(client, interval=0)
    with pytest.raises(ValueError, match="interval"):
        CacheWatcher(client, interval=2.0, full_interval=1.0)


# --- runicorn sync --watch ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sync_watch_applies_changes_until_a_signal_then_exits_0(
    lab: Lab, cache: Path, sshd_server: SshServer, tmp_path: Path, backend, signum
):
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    lab.publish(ManifestType.ACTIVE)
    command = [sys.executable, "-m", "runicorn", "sync", f"labserver:{lab.root}", str(cache)]
    command += ["--ssh-config", str(config), "--watch", "--json"]
    command += ["--interval", "0.02", "--full-interval", "0.5"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        out = ChildLines(child.stdout, DEADLINE_SECONDS)
        try:
            first = orjson.loads(out.expect(lambda line: line.startswith("{")))
            assert first["files_synced"] > 0
            events, _rel = _running_events(lab)
            with open(events, "a") as handle:
                handle.write('{"step": 777}\n')
            lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
            # (the active manifest published before the start may be applied first, moving
            # nothing: the cold full sync brought its files already)
            applied = orjson.loads(
                out.expect(lambda line: line.startswith("{") and '"files_synced":0,' not in line)
            )
            assert (applied["manifest_type"], applied["files_synced"]) == ("active", 1)
            child.send_signal(signum)
            assert child.stderr is not None
            stderr = child.stderr.read()  # to its end: the child has exited
            child.wait(DEADLINE_SECONDS)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            out.join()
    assert child.returncode == 0, stderr
    assert "stopped; the cache is consistent" in stderr
    assert_cache_equals_server(lab.root, cache)


@pytest.mark.parametrize("flag", ["--legacy", "--dry-run"])
def test_sync_watch_refuses_what_it_cannot_follow(tmp_path: Path, flag: str):
    result = CliRunner().invoke(
        main, ["sync", str(tmp_path), str(tmp_path / "cache"), "--watch", flag]
    )
    assert result.exit_code == 2
    assert "--watch follows the server's manifests" in result.output


class _Viewer(ThreadingHTTPServer):
    """Answers the two calls a watch makes of the upstream viewer, and records them."""

    def __init__(self, storage: Path) -> None:
        super().__init__(("127.0.0.1", 0), _ViewerHandler)
        self.storage = storage
        self.calls: list[str] = []
        self.called = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ViewerHandler(BaseHTTPRequestHandler):
    server: _Viewer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, document: object) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = orjson.dumps(document)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.server.called:
            self.server.calls.append(f"{self.command} {self.path}")
            self.server.called.notify_all()

    def do_GET(self) -> None:
        self._answer({"status": "ok", "storage": str(self.server.storage)})

    def do_POST(self) -> None:
        self._answer({"ok": True, "imported_files": 0})


def test_sync_watch_tells_the_viewer_of_each_applied_pass(
    lab: Lab, cache: Path, sshd_server: SshServer, tmp_path: Path, backend
):
    cache.mkdir()
    viewer = _Viewer(cache)
    serving = threading.Thread(target=viewer.serve_forever, args=(0.05,), daemon=True)
    serving.start()
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    command = [sys.executable, "-m", "runicorn", "sync", f"labserver:{lab.root}", str(cache)]
    command += ["--ssh-config", str(config), "--watch", "--json", "--viewer", viewer.url]
    command += ["--interval", "0.02", "--full-interval", "0.2"]

    def called(call: str) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        with viewer.called:
            while call not in viewer.calls:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"the viewer was never called {call}; got {viewer.calls}"
                viewer.called.wait(remaining)

    try:
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            out = ChildLines(child.stdout, DEADLINE_SECONDS)
            try:
                out.expect(lambda line: line.startswith("{"))  # the cold sync
                called("POST /api/import/archive")  # its runs indexed
                with viewer.called:
                    viewer.calls.clear()
                source = next(r for r in lab.info.listed_runs if r.status == "running")
                shutil.copytree(source.path, source.path.with_name(source.run_id + "_new"))
                lab.publish(ManifestType.FULL, now=lab.now + 60)
                called("POST /api/import/archive")  # the new run indexed during the watch
                called("POST /api/status/check")
                child.send_signal(signal.SIGTERM)
                child.wait(DEADLINE_SECONDS)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                out.join()
    finally:
        viewer.shutdown()
        viewer.server_close()
    assert child.returncode == 0
    assert (cache / f"{source.rel}_new" / "meta.json").exists()

"""runicorn.sync.viewer against small loopback HTTP servers: what is sent, in which case
nothing is, and that a missing or strange viewer is a reported problem, never an exception.
(The real upstream viewer is driven in tests/upstream.)"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runicorn.sync.viewer import ViewerChanges, ViewerNotifier, notify_viewer


class _FakeViewer(ThreadingHTTPServer):
    """Answers like the upstream viewer's endpoints the notifier uses, and records requests."""

    def __init__(self, storage: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.storage = storage
        self.requests: list[tuple[str, str, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _FakeViewer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _answer(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, self.rfile.read(length)))

    def do_GET(self) -> None:
        self._record()
        if self.path == "/api/health":
            self._answer(200, {"status": "ok", "storage": str(self.server.storage)})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self._record()
        if self.path == "/api/recycle-bin/restore":
            ids = json.loads(self.server.requests[-1][2])["run_ids"]
            self._answer(200, {"results": {run_id: {"success": True} for run_id in ids}})
        else:
            self._answer(200, {"ok": True, "imported_files": 0})

    def do_DELETE(self) -> None:
        self._record()
        self._answer(200, {"success": True})


@pytest.fixture
def fake_viewer(tmp_path: Path) -> Iterator[_FakeViewer]:
    cache = tmp_path / "cache"
    cache.mkdir()
    server = _FakeViewer(cache)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_each_kind_of_change_reaches_its_endpoint(fake_viewer: _FakeViewer) -> None:
    report = notify_viewer(
        fake_viewer.url,
        ViewerChanges(added=("a1",), changed=("c1",), removed=("r1", "r2")),
        cache_dir=fake_viewer.storage,
    )

    assert report.problem is None
    assert (report.reached, report.reindexed, report.status_checked) == (True, True, True)
    assert report.forgotten == ["r1", "r2"]
    sent = [(method, path) for method, path, _body in fake_viewer.requests]
    assert sent == [
        ("GET", "/api/health"),
        ("DELETE", "/api/runs/r1/permanent"),
        ("DELETE", "/api/runs/r2/permanent"),
        ("POST", "/api/import/archive"),
        ("POST", "/api/status/check"),
    ]
    upload = fake_viewer.requests[3][2]
    assert b'name="mode"\r\n\r\nmerge' in upload
    assert b"PK\x05\x06" + b"\x00" * 18 in upload  # an empty ZIP: nothing to import


def test_restoring_recycled_runs_reports_those_the_viewer_restored(
    fake_viewer: _FakeViewer,
) -> None:
    notifier = ViewerNotifier(fake_viewer.url, fake_viewer.storage)

    assert notifier.restore_runs(["b", "a"]) == ["a", "b"]
    assert json.loads(fake_viewer.requests[-1][2]) == {"run_ids": ["a", "b"]}


def test_a_viewer_of_another_directory_is_told_nothing(
    fake_viewer: _FakeViewer, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()

    report = notify_viewer(
        fake_viewer.url, ViewerChanges(added=("a1",), removed=("r1",)), cache_dir=other
    )

    assert report.reached and not report.reindexed and report.forgotten == []
    assert "not this cache" in (report.problem or "")
    assert [path for _m, path, _b in fake_viewer.requests] == ["/api/health"]


def test_nothing_to_tell_sends_nothing(fake_viewer: _FakeViewer) -> None:
    report = notify_viewer(fake_viewer.url, ViewerChanges(), cache_dir=fake_viewer.storage)

    assert fake_viewer.requests == []
    assert report.problem is None and not report.reached


def test_no_viewer_listening_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        report = notify_viewer(url, ViewerChanges(added=("a",)), cache_dir=tmp_path)

    assert not report.reached
    assert "no viewer answered" in (report.problem or "")


def test_something_else_listening_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def garbage() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=garbage, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        report = notify_viewer(url, ViewerChanges(added=("a",)), cache_dir=tmp_path)
        thread.join()

    assert not report.reached
    assert "no viewer answered" in (report.problem or "")


def test_a_url_that_is_not_http_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an http"):
        ViewerNotifier("ftp://127.0.0.1:21", tmp_path)
    assert ViewerNotifier("127.0.0.1:23300/", tmp_path).url == "http://127.0.0.1:23300"

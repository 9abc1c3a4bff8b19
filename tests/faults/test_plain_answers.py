"""Errors and reports that say what happened (issue 20, item 5).

The API document's own example callback must survive a sync that moves nothing; the
fallback is logged with the document's phrase; the legacy walk never copies a half-written
last line; an older manifest revision is reported; and the command line answers a silent
server, a mistyped ``-i``, a remote root that is a file and a refused deletion with one
line each (and the documented exit code).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from harness.lab import Lab, cache_files, local_client, local_service, make_lab, server_files
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.format.compression import compress
from runicorn.format.layout import MANIFEST_DIRNAME


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> Lab:
    return make_lab(tmp_path, backend, runs=4)






def _percent(completed: int, total: int, current_file: str) -> None:
    """The API document's example progress callback."""
    print(f"{completed / total * 100:.0f}% {current_file}")


def test_the_documents_example_callback_survives_a_sync_that_moves_nothing(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    calls: list[tuple[int, int, str]] = []
    local_client(lab, cache).sync(lambda *call: calls.append(call))
    assert calls and all(total > 0 for _done, total, _name in calls)
    shutil.rmtree(sorted(lab.root.glob("*/*/runs/*"))[0])  # a run leaves the server
    lab.publish(now=lab.now + 60)

    stats = local_client(lab, cache).sync(_percent)  # a new revision, nothing to fetch

    assert not stats["skipped"] and stats["files_synced"] == 0


def test_the_fallback_is_logged_with_the_documents_phrase(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(lab.root / MANIFEST_DIRNAME)
    with caplog.at_level(logging.WARNING, logger="runicorn"):
        assert local_service(lab, tmp_path / "cache").sync_all() is True
    assert "falling back to legacy sync" in caplog.text
    assert cache_files(tmp_path / "cache") == server_files(lab.root)


def test_the_legacy_walk_copies_append_only_files_up_to_their_last_complete_line(
    lab: Lab, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    log = sorted(lab.root.glob("*/*/runs/*/events.jsonl"))[0]
    relative = log.relative_to(lab.root)
    complete = log.read_bytes()
    with open(log, "ab") as handle:
        handle.write(b'{"step": 77, "loss": 0.')  # the trainer is mid-line

    assert local_service(lab, cache, use_manifest_sync=False).sync_all() is True
    assert (cache / relative).read_bytes() == complete

    with open(log, "ab") as handle:
        handle.write(b'5}\n')
    assert local_service(lab, cache, use_manifest_sync=False).sync_all() is True
    assert (cache / relative).read_bytes() == log.read_bytes()


def test_an_older_manifest_revision_is_reported_not_applied_silently(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    lab.publish(now=lab.now + 60)
    with sorted(lab.root.glob("*/*/runs/*/logs.txt"))[0].open("a") as handle:
        handle.write("one more line\n")
    applied = lab.publish(now=lab.now + 120)
    assert local_client(lab, cache).sync()["manifest_revision"] == applied.revision
    document = orjson.loads((lab.manifest_dir / "full_manifest.json").read_bytes())
    document["revision"] = applied.revision - 1  # a restored backup of the manifests
    document["snapshot_id"] = "restored-from-backup"
    (lab.manifest_dir / "full_manifest.json").write_bytes(orjson.dumps(document))
    (lab.manifest_dir / "full_manifest.json.gz").write_bytes(compress(orjson.dumps(document)))

    with caplog.at_level(logging.WARNING, logger="runicorn"):
        stats = local_client(lab, cache).sync()

    assert f"older than revision {applied.revision}" in stats["older_revision"]
    assert "older than revision" in caplog.text


# --------------------------------------------------------------------------- the command line


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.mark.sshd
def test_a_silent_server_is_named_as_such(
    tmp_path: Path, silent_server: int, backend: Backend
) -> None:
    result = _run(
        "sync",
        f"127.0.0.1:{tmp_path}",
        str(tmp_path / "cache"),
        "--port",
        str(silent_server),
        "--ssh-config",
        str(tmp_path / "no_config"),
        "--timeout",
        "1",
    )
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "did not answer the SSH handshake within 1 s" in lines[0]
    assert "No existing session" not in result.stderr


def test_a_mistyped_identity_file_is_named(tmp_path: Path, backend: Backend) -> None:
    result = _run(
        "sync",
        f"127.0.0.1:{tmp_path}",
        str(tmp_path / "cache"),
        "-i",
        str(tmp_path / "id_ed25519_typo"),
        "--ssh-config",
        str(tmp_path / "no_config"),
    )
    assert result.exit_code == 1
    assert "id_ed25519_typo (-i) does not exist" in result.stderr


@pytest.mark.sshd
def test_a_remote_root_that_is_a_file_is_named(
    tmp_path: Path, sshd_server: SshServer, backend: Backend
) -> None:
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    root = tmp_path / "not-a-directory"
    root.write_bytes(b"experiments?\n")
    result = _run(
        "sync", f"labserver:{root}", str(tmp_path / "cache"), "--ssh-config", str(config)
    )
    assert result.exit_code == 1
    assert f"the remote root {root} is a file, not a directory" in result.stderr

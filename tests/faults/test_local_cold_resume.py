"""A cold sync from a local-directory remote (the chunked ``copy_files`` path) killed with
SIGKILL part way: no partial file is ever visible, the next sync removes the temp files,
fetches only what was not recorded, and leaves the cache equal to the server."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.lab import (
    assert_cache_equals_server,
    cache_files,
    make_lab,
    server_files,
    temp_files,
)
from runicorn.core.backend import Backend
from runicorn.sync import transfer
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote

CHUNK = 7

# The client in a child process, with small chunks and a commit every BATCH_SIZE files. It
# kills itself at an exact point: after the N-th progress callback ("progress"), or right
# after the N-th ``copy_files`` call returned, its files renamed into place (or, for JSON
# files, still temp files) and none of them recorded yet, the chunk before it perhaps
# being recorded meanwhile ("copied").
_KILLED_SYNC = r"""
import os, signal, sys
from pathlib import Path
from runicorn.core.backend import load_backend
from runicorn.sync import transfer
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote

lab, cache, backend_name, mode, stop_at, chunk = sys.argv[1:]
transfer.COPY_CHUNK_FILES = int(chunk)
transfer.COMMIT_SPACING = 0.0
backend = load_backend(backend_name)
calls = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Killing:
    def __getattr__(self, name):
        return getattr(backend, name)

    releases_gil = backend.releases_gil

    def copy_files(self, *args, **options):
        global calls
        results = backend.copy_files(*args, **options)
        calls += 1
        if mode == "copied" and calls == int(stop_at):
            die()
        return results

def progress(done, total, path):
    print(done, total, flush=True)
    if mode == "progress" and done == int(stop_at):
        die()

client = ManifestSyncClient(None, lab, Path(cache), 0.0, backend=Killing(),
                            remote=LocalRemote(lab))
client.sync(progress)
print("finished", flush=True)
"""


def _killed(lab: Path, cache: Path, backend: Backend, mode: str, stop_at: int) -> list[int]:
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_SYNC,
            str(lab),
            str(cache),
            backend.name,
            mode,
            str(stop_at),
            str(CHUNK),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    return [int(line.split()[0]) for line in child.stdout.splitlines()]


def _resume(lab: Path, cache: Path, backend: Backend) -> dict:
    client = ManifestSyncClient(
        None, str(lab), cache, 0.0, backend=backend, remote=LocalRemote(lab)
    )
    try:
        return dict(client.sync())
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["progress", "copied"])
def test_a_killed_cold_copy_resumes_without_refetching_recorded_files(
    tmp_path: Path, backend: Backend, mode: str
) -> None:
    lab = make_lab(tmp_path, backend, runs=6, scale=0.05)
    cache = tmp_path / "cache"
    total = lab.info.listed_files
    stop_at = total // 2 if mode == "progress" else 3
    reported = _killed(lab.root, cache, backend, mode, stop_at)

    expected = server_files(lab.root)
    leftovers = set(temp_files(cache))
    landed = {path: data for path, data in cache_files(cache).items() if path not in leftovers}
    assert all(landed[path] == expected[path] for path in landed), "a partial file is visible"
    if mode == "progress":
        assert reported[-1] == stop_at
        # the state commits every BATCH_SIZE files: all but the last few reported are recorded
        recorded_at_least = stop_at - (ManifestSyncClient.BATCH_SIZE - 1)
    else:
        # killed after the third chunk was copied, before any of it was recorded: its
        # files are in place, its JSON files still temp files awaiting their check. The
        # second chunk is recorded while the third copies, so it may be cut short too;
        # the first is recorded before the third starts.
        assert CHUNK <= reported[-1] <= 2 * CHUNK
        assert len(landed) + len(leftovers) == 3 * CHUNK
        recorded_at_least = reported[-1] - (ManifestSyncClient.BATCH_SIZE - 1)

    stats = _resume(lab.root, cache, backend)

    assert_cache_equals_server(lab.root, cache)
    assert temp_files(cache) == []
    assert stats["failed_files"] == {}
    assert stats["files_synced"] <= total - recorded_at_least
    assert stats["files_synced"] < total


def test_the_local_copy_takes_whole_files_and_leaves_appends_to_the_engine(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold sync goes through ``copy_files`` in chunks; a step's appends do not."""
    lab = make_lab(tmp_path, backend, runs=4, scale=0.05)
    cache = tmp_path / "cache"
    monkeypatch.setattr(transfer, "COPY_CHUNK_FILES", 5)
    chunks: list[int] = []
    real = transfer._LocalCopy.copy

    def counting(self: transfer._LocalCopy, transfers: list[transfer.Transfer]) -> None:
        chunks.append(len(transfers))
        real(self, transfers)

    monkeypatch.setattr(transfer._LocalCopy, "copy", counting)
    stats = _resume(lab.root, cache, backend)
    assert_cache_equals_server(lab.root, cache)
    assert sum(chunks) == stats["files_synced"] == lab.info.listed_files
    assert max(chunks) == 5

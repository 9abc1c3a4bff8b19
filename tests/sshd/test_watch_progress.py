"""``ManifestSyncClient.watch(on_progress=...)`` against a real OpenSSH server, on both
backends: a pass's files are reported as they land, with their bytes when asked, as a
plain ``sync(progress_callback)`` reports them."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.lab import Lab, assert_cache_equals_server

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=4, scale=0.02)]


def test_the_first_pass_reports_each_landed_file_with_its_bytes(
    client_for, lab: Lab, cache: Path
):
    client = client_for()
    calls: list[tuple] = []

    def progress(*args: object) -> None:
        calls.append(args)

    progress.wants_bytes = True  # type: ignore[attr-defined]

    def on_sync(_stats: dict) -> None:
        client.stop_watch()  # after the first pass

    client.watch(interval=0.02, full_interval=0.5, on_sync=on_sync, on_progress=progress)
    assert calls[0][:3] == (0, lab.info.listed_files, "")
    done, total, last_file, moved, planned = calls[-1]
    assert done == total == lab.info.listed_files and last_file
    assert moved >= planned == lab.info.listed_bytes
    assert [call[0] for call in calls] == list(range(len(calls)))
    assert_cache_equals_server(lab.root, cache)

"""A manifest that stopped being regenerated is said so (issue 20, item 2).

The old manifest stays valid, so every sync would say "up to date" while runs go on on the
server. The client warns (``stale_manifest``) when the newest manifest is older than
``STALE_MANIFEST_SECONDS`` while it lists runs as running, and only then.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from harness.lab import Lab, local_client, make_lab
from runicorn.core.backend import Backend
from runicorn.sync.client import ManifestSyncClient


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> Lab:
    return make_lab(tmp_path, backend, runs=6)


def _sync(lab: Lab, cache: Path) -> dict:
    client = local_client(lab, cache)
    try:
        return dict(client.sync())
    finally:
        client.close()


def _running_runs(lab: Lab) -> list[Path]:
    return [
        path
        for path in lab.root.rglob("status.json")
        if json.loads(path.read_text()).get("status") == "running"
    ]


def test_an_old_manifest_listing_running_runs_is_warned_about(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _running_runs(lab), "the sample lab has runs still training"
    lab.publish(now=time.time() - 2 * ManifestSyncClient.STALE_MANIFEST_SECONDS)

    with caplog.at_level(logging.WARNING):
        stats = _sync(lab, tmp_path / "cache")

    assert "generate-manifest still scheduled" in stats["stale_manifest"]
    assert any("generate-manifest still scheduled" in r.getMessage() for r in caplog.records)
    assert stats["failed_count"] == 0  # a warning: the sync itself went on


def test_a_fresh_manifest_is_not_warned_about(tmp_path: Path, backend: Backend) -> None:
    lab = make_lab(tmp_path, backend, runs=6, publish=False)
    assert _running_runs(lab)
    lab.publish(now=time.time())

    stats = _sync(lab, tmp_path / "cache")

    assert "stale_manifest" not in stats


def test_an_old_manifest_of_finished_runs_is_not_warned_about(lab: Lab, tmp_path: Path) -> None:
    for path in _running_runs(lab):
        status = json.loads(path.read_text())
        status.update(status="finished", ended_at=status["started_at"] + 60)
        path.write_text(json.dumps(status))
    lab.publish(now=time.time() - 2 * ManifestSyncClient.STALE_MANIFEST_SECONDS)

    stats = _sync(lab, tmp_path / "cache")

    assert "stale_manifest" not in stats

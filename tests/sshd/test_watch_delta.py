"""The active manifest's delta (``runicorn.format.delta``) against a real OpenSSH server, on
both backends: applied in place of the whole active manifest it gives the same cache, a
client that does not hold its base reads the whole manifest instead, and a watch is pushed
the delta, not the whole manifest.

The server side is a generator keeping its tree, as the long-running publisher does (only
that one writes deltas); each test tells it what changed, as the publisher's change source
would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_watch import Watching

from harness.lab import Lab, assert_cache_equals_server, cache_files, make_client
from runicorn.format.delta import delta_filename, read_delta
from runicorn.generate.generator import ManifestGenerator
from runicorn.manifest import ManifestType
from runicorn.sync.client import ManifestSyncClient

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=8, scale=0.02)]

CLIENT_LOG = "runicorn.remote_storage.manifest_sync"


class Publisher:
    """A generator keeping its tree, told of each change (what the publisher does)."""

    def __init__(self, lab: Lab, backend) -> None:
        self.lab = lab
        self.generator = ManifestGenerator(lab.root, backend=backend, clock=lambda: lab.now)
        self.tree = self.generator.keep_tree()
        self.delta = lab.manifest_dir / delta_filename(ManifestType.ACTIVE.filename)

    def append(self, run_index: int, line: str) -> str:
        """A line appended to the ``run_index``-th running run; its path in the cache."""
        run = [r for r in self.lab.info.listed_runs if r.status == "running"][run_index]
        with open(run.path / "events.jsonl", "a") as handle:
            handle.write(line)
        self.tree.changed([run.rel])
        return f"{run.rel}/events.jsonl"

    def publish_active(self) -> int:
        self.lab.now += 1
        manifest, _ = self.generator.generate(ManifestType.ACTIVE)
        self.snapshot_id = manifest.snapshot_id
        return manifest.revision


def _remote_id(client: ManifestSyncClient) -> str:
    return client.remote_id


def _at_active(client: ManifestSyncClient, revision: int) -> None:
    """Sync until the cache holds active ``revision`` as applied (a first sync applies the
    full manifest, the next the active one when it lists what the full one did not)."""
    for _ in range(3):
        client.sync()
        state = client.cache.applied_manifest(_remote_id(client), ManifestType.ACTIVE.value)
        if state is not None and state.revision == revision and state.clean:
            return
    pytest.fail(f"active revision {revision} never applied")


def _pushed_pass(client: ManifestSyncClient, data: bytes) -> dict:
    """One pass of a watch that was pushed ``data``."""
    client.manifest_type = ManifestType.ACTIVE.value
    client.pushed_active = data
    try:
        return dict(client.sync())
    finally:
        client.manifest_type = "auto"
        client.pushed_active = None


def test_a_pushed_delta_applied_equals_the_whole_manifest_applied(
    client_for, sftp, lab: Lab, cache: Path, tmp_path: Path, backend, caplog
):
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    publisher = Publisher(lab, backend)
    first = publisher.publish_active()
    first_snapshot = publisher.snapshot_id
    assert not publisher.delta.exists()  # nothing to build on yet
    client = client_for()
    _at_active(client, first)

    changed = publisher.append(0, '{"step": 777001}\n')
    second = publisher.publish_active()
    data = publisher.delta.read_bytes()
    delta = read_delta(data, 1 << 24)
    assert delta is not None and delta[:2] == (first, first_snapshot)

    stats = _pushed_pass(client, data)
    assert (stats["manifest_type"], stats["manifest_revision"]) == ("active", second)
    assert "applying the pushed delta from active revision" in caplog.text
    assert_cache_equals_server(lab.root, cache)

    # a cache that read the whole manifests holds the same, at the same revision
    whole = make_client(sftp, lab.root, tmp_path / "whole", backend)
    try:
        _at_active(whole, second)
        assert cache_files(tmp_path / "whole") == cache_files(cache)
        assert changed in cache_files(cache)
    finally:
        whole.close()


def test_a_client_not_at_the_delta_base_reads_the_whole_manifest(
    client_for, lab: Lab, cache: Path, backend, caplog
):
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    publisher = Publisher(lab, backend)
    first = publisher.publish_active()
    client = client_for()
    _at_active(client, first)

    missed = publisher.append(0, '{"step": 777101}\n')
    publisher.publish_active()  # its delta never reaches the client
    publisher.append(1, '{"step": 777102}\n')
    third = publisher.publish_active()
    stats = _pushed_pass(client, publisher.delta.read_bytes())
    assert stats["manifest_revision"] == third
    assert f"not {first}; reading the whole manifest" in caplog.text
    # the line of the publication in between is there: the whole manifest was applied
    assert cache_files(cache)[missed] == (lab.root / missed).read_bytes()
    assert_cache_equals_server(lab.root, cache)


def test_a_watch_is_pushed_the_delta_in_place_of_the_whole_manifest(
    client_for, lab: Lab, cache: Path, backend, caplog
):
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    publisher = Publisher(lab, backend)
    publisher.publish_active()
    publisher.append(1, '{"step": 777200}\n')
    first = publisher.publish_active()  # a delta exists from now on: the command waits for it
    client = client_for()
    _at_active(client, first)
    watch = Watching(client, interval=3600.0, full_interval=3600.0, push=True).start_pushed()
    try:
        # (a publisher so slow that the delta follows the manifest by more than the command's
        # grace sends the manifest whole once: the next publication is tried then)
        for attempt in range(3):
            rel = publisher.append(0, f'{{"step": {777201 + attempt}}}\n')
            revision = publisher.publish_active()
            expected = (lab.root / rel).read_bytes()
            watch.wait_for(lambda r=rel, e=expected: cache_files(cache).get(r) == e)
            watch.wait_for(
                lambda n=revision: any(p["manifest_revision"] == n for p in watch.passes)
            )
            if "applying the pushed delta" in caplog.text:
                break
            first = revision
    finally:
        watch.stop()
    assert f"applying the pushed delta from active revision {first}" in caplog.text

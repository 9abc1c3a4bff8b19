"""Against today's upstream Runicorn: roots its SDK writes, and its viewer on our cache.

Each test has the upstream SDK (0.5.3: ``<project>/<name>/runs/<id>/``, 0.7.2:
``runs/<path>/<id>/``) train a few short runs -- finished, failed, one still logging, one
killed -- on a "server" root, generates our manifest there, and syncs it over a real sshd
into a cache with ``runicorn sync``. The upstream viewer (0.7.2, what users run) then serves
the cache and the server root side by side and must answer the same: runs, statuses, metric
rows, image bytes. The upstream packages come from the package index into virtual
environments of their own (``harness.upstream``); without network access these tests fail
with pip's message, they never skip.

Names here avoid the substrings the viewer takes for a remote cache (``_remote_``,
``remote_cache``): pytest puts test names into ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from harness.sshd import SshServer
from harness.upstream import (
    SDK_VERSIONS,
    VIEWER_VERSION,
    HeldRun,
    UpstreamError,
    UpstreamSdk,
    Viewer,
    upstream_sdk,
)
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.format.models import SyncManifest
from runicorn.manifest import ManifestGenerator
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.viewer import ViewerChanges, notify_viewer

pytestmark = [pytest.mark.upstream, pytest.mark.sshd]

MARKED_CACHE = "lab_remote_cache"
"""A cache directory name the upstream viewer recognises as a remote cache."""
PLAIN_CACHE = "labcache"


def _sdk(version: str) -> UpstreamSdk:
    """The upstream version's venv; without it the test fails (never skips) with pip's word."""
    try:
        return upstream_sdk(version)
    except UpstreamError as error:
        message = str(error)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def viewer_sdk() -> UpstreamSdk:
    return _sdk(VIEWER_VERSION)


@pytest.fixture(params=SDK_VERSIONS, ids=[f"sdk{v}" for v in SDK_VERSIONS])
def sdk(request: pytest.FixtureRequest) -> UpstreamSdk:
    return _sdk(request.param)


@pytest.fixture
def ssh_config(sshd_server: SshServer, tmp_path: Path) -> Path:
    return sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")


@dataclass
class UpstreamRoot:
    """A server root the upstream SDK wrote, and what its runs are."""

    sdk: UpstreamSdk
    root: Path
    home: Path
    statuses: dict[str, str]
    """run id -> status the SDK gave it ("running" for the held and the killed run)."""
    held: HeldRun
    killed: str

    @property
    def ended(self) -> list[str]:
        """Finished and failed runs: their files no longer change."""
        return sorted(r for r, s in self.statuses.items() if s in ("finished", "failed"))

    def train(self, phase: str) -> list[str]:
        runs = self.sdk.train(self.root, phase, self.home)
        self.statuses.update(runs)
        return [run_id for run_id, _status in runs]


@pytest.fixture
def upstream_root(sdk: UpstreamSdk, tmp_path: Path) -> Iterator[UpstreamRoot]:
    root = tmp_path / "server" / "experiments"
    home = tmp_path / "home"
    statuses = dict(sdk.train(root, "initial", home))
    ((killed, _),) = sdk.train(root, "killed", home)
    statuses[killed] = "running"
    with sdk.hold(root, home) as held:
        statuses[held.run_id] = "running"
        yield UpstreamRoot(sdk, root, home, statuses, held, killed)


def _generate(root: Path, backend: Backend | None = None) -> SyncManifest:
    manifest, _path = ManifestGenerator(root, backend=backend).generate()
    return manifest


def _sync(root: Path, cache: Path, ssh_config: Path, *extra: str) -> tuple[dict, Result]:
    result = CliRunner().invoke(
        main,
        [
            "sync",
            f"labserver:{root}",
            str(cache),
            "--ssh-config",
            str(ssh_config),
            "--json",
            *extra,
        ],
        catch_exceptions=False,
    )
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1, result.stdout
    return orjson.loads(lines[0]), result


def _assert_runs_mirrored(manifest: SyncManifest, root: Path, cache: Path) -> None:
    """Every file the manifest lists is byte-identical in the cache."""
    paths = [entry.path for entry in manifest.iter_files()]
    assert paths
    different = [p for p in paths if (cache / p).read_bytes() != (root / p).read_bytes()]
    assert not different, f"differ in the cache: {different[:5]}"


# -- what the viewer answers ---------------------------------------------------------------


def _normalized(document: Any, root: Path) -> Any:
    """The viewer's answer with its storage root's absolute path taken out."""
    text = json.dumps(document, sort_keys=True).replace(str(root), "<root>")
    return json.loads(text)


def _run_view(viewer: Viewer, run_id: str, listing: dict[str, Any]) -> dict[str, Any]:
    """What the viewer shows of one run: its list row, page, metric rows and images."""
    row = dict(listing[run_id])
    row.pop("run_dir")  # an absolute path, different by nature
    images = []
    for image in viewer.get_json(f"/api/runs/{run_id}/images")["images"]:
        query = urllib.parse.urlencode({"path": image["path"]})
        data = viewer.get_bytes(f"/api/runs/{run_id}/assets/download?{query}")
        images.append(
            {"key": image["key"], "step": image["step"], "sha256": hashlib.sha256(data).hexdigest()}
        )
    return {
        "row": row,
        "detail": _normalized(viewer.get_json(f"/api/runs/{run_id}"), viewer.storage),
        "metrics": viewer.get_json(f"/api/runs/{run_id}/metrics_step"),
        "images": images,
    }


def _views(viewer: Viewer, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    listing = {row["id"]: row for row in viewer.wait_for_runs(set(run_ids))}
    return {run_id: _run_view(viewer, run_id, listing) for run_id in run_ids}


_CLOCK_FIELDS = (("row", "created_time"), ("detail", "duration"))
"""Where the viewer on a 0.6+ server root answers from the SDK's own index (``runicorn.db``,
timestamps the SDK took a fraction of a second apart from those in ``meta.json`` and
``status.json``) and on the cache from those files: the index holds server paths and is
never synced, so the viewer rebuilds it from the files."""


def _assert_same_views(cache_views: dict[str, Any], server_views: dict[str, Any]) -> None:
    """Equal, except that the fields of :data:`_CLOCK_FIELDS` may differ by under a second."""
    for views in (cache_views, server_views):
        for view in views.values():
            for part, key in _CLOCK_FIELDS:
                view[part][key] = round(float(view[part][key] or 0.0))
    for run_id, view in cache_views.items():
        for part, key in _CLOCK_FIELDS:
            if abs(view[part][key] - server_views[run_id][part][key]) <= 1:
                view[part][key] = server_views[run_id][part][key]
    assert cache_views == server_views


def _listed(viewer: Viewer) -> set[str]:
    return {row["id"] for row in viewer.get_json("/api/runs")}


# -- the tests --------------------------------------------------------------------------------


def test_every_upstream_run_is_mirrored_file_for_file(
    upstream_root: UpstreamRoot, ssh_config: Path, cli_backend: Backend, tmp_path: Path
) -> None:
    """Both layouts, both backends: every run the SDK wrote is in the manifest and every
    file of it identical in the cache, also after the running run logged more."""
    lab = upstream_root
    manifest = _generate(lab.root, cli_backend)
    assert {exp.run_id for exp in manifest.experiments} == set(lab.statuses)
    cache = tmp_path / MARKED_CACHE
    stats, _ = _sync(lab.root, cache, ssh_config)
    assert stats["failed_count"] == 0
    _assert_runs_mirrored(manifest, lab.root, cache)
    assert not list(cache.glob("runicorn.db*")), "the SDK's index must not be synced"

    lab.held.step()
    lab.train("later")
    manifest = _generate(lab.root, cli_backend)
    stats, _ = _sync(lab.root, cache, ssh_config)
    assert stats["incremental_count"] >= 1  # the running run's logs were appended
    assert {exp.run_id for exp in manifest.experiments} == set(lab.statuses)
    _assert_runs_mirrored(manifest, lab.root, cache)


def test_the_viewer_answers_the_same_on_the_cache_and_on_the_server(
    upstream_root: UpstreamRoot, viewer_sdk: UpstreamSdk, ssh_config: Path, tmp_path: Path
) -> None:
    """Runs, statuses, metric rows and image bytes of every finished and failed run; then a
    later run, a grown running run and a removed run reach the running viewer through one
    ``sync --viewer`` each, without a restart."""
    lab = upstream_root
    cache = tmp_path / MARKED_CACHE
    _generate(lab.root)
    _sync(lab.root, cache, ssh_config)

    with (
        viewer_sdk.viewer(cache, tmp_path / "viewer-cache-home") as on_cache,
        viewer_sdk.viewer(lab.root, tmp_path / "viewer-server-home") as on_server,
    ):
        _assert_same_views(_views(on_cache, lab.ended), _views(on_server, lab.ended))
        listing = {row["id"]: row for row in on_cache.wait_for_runs(set(lab.statuses))}
        assert {run_id: listing[run_id]["status"] for run_id in lab.statuses} == lab.statuses
        # The killed run's process is gone, on this very host: only the remote-cache marker
        # keeps the viewer from rewriting its status in the cache.
        killed_status = json.loads(_status_file(cache, lab.killed).read_text())
        assert killed_status["status"] == "running"

        # A later run, and the running run logs more: one sync with --viewer.
        (later,) = lab.train("later")
        lab.held.step()
        _generate(lab.root)
        assert later not in _listed(on_cache)
        stats, _ = _sync(lab.root, cache, ssh_config, "--viewer", on_cache.url)
        assert stats["viewer"]["reached"] and stats["viewer"]["reindexed"], stats["viewer"]
        assert stats["viewer"]["problem"] is None
        assert later in _listed(on_cache)  # at once: the viewer indexed before answering
        # The server's viewer learns of it through the same public function (the 0.5.x
        # SDK does not write the viewer's index; the 0.6+ SDK does).
        report = notify_viewer(on_server.url, ViewerChanges(added=(later,)), cache_dir=lab.root)
        assert report.problem is None and report.reindexed
        _assert_same_views(_views(on_cache, [later]), _views(on_server, [later]))
        held_metrics = f"/api/runs/{lab.held.run_id}/metrics_step"
        assert on_cache.get_json(held_metrics)["total"] == 11  # its 10 steps and one more
        assert on_cache.get_json(held_metrics) == on_server.get_json(held_metrics)

        # A run removed on the server, synced with --delete: gone from the viewer's list.
        gone = lab.ended[0]
        shutil.rmtree(_status_file(lab.root, gone).parent)
        _generate(lab.root)
        stats, _ = _sync(lab.root, cache, ssh_config, "--delete", "--viewer", on_cache.url)
        assert stats["deleted_count"] == 1
        assert stats["viewer"]["forgotten"] == [gone]
        assert gone not in _listed(on_cache)
        assert on_cache.request("GET", f"/api/runs/{gone}")[0] == 404
        assert later in _listed(on_cache)

        # A viewer serving another directory is never touched.
        lab.train("later")
        _generate(lab.root)
        stats, result = _sync(lab.root, cache, ssh_config, "--viewer", on_server.url)
        assert "not this cache" in stats["viewer"]["problem"]
        assert stats["viewer"]["reindexed"] is False
        assert "not this cache" in result.stderr


def test_edits_the_viewer_makes_in_the_cache_are_put_back_by_the_next_sync(
    upstream_root: UpstreamRoot, viewer_sdk: UpstreamSdk, ssh_config: Path, tmp_path: Path
) -> None:
    """In a cache without the remote-cache marker the viewer marks the killed run failed,
    and deleting a run in the viewer moves it to its recycle bin: the next sync (nothing
    changed on the server) restores the server's status.json and puts the run back -- one
    directory per run id -- and the viewer lists it again."""
    lab = upstream_root
    cache = tmp_path / PLAIN_CACHE
    manifest = _generate(lab.root)
    _sync(lab.root, cache, ssh_config)
    server_status = _status_file(lab.root, lab.killed).read_bytes()
    recycled = lab.ended[0]

    with viewer_sdk.viewer(cache, tmp_path / "viewer-home") as viewer:
        listing = {row["id"]: row for row in viewer.wait_for_runs(set(lab.statuses))}
        assert listing[lab.killed]["status"] == "failed"  # the viewer's rewrite
        assert _status_file(cache, lab.killed).read_bytes() != server_status
        status, body = viewer.request("POST", "/api/runs/soft-delete", {"run_ids": [recycled]})
        assert status == 200 and json.loads(body)["deleted_count"] == 1, body
        assert recycled not in _listed(viewer)
        assert (cache / "runs" / ".recycle" / recycled).is_dir()

        stats, _ = _sync(lab.root, cache, ssh_config, "--viewer", viewer.url)

        assert stats["viewer"]["restored"] == [recycled], stats["viewer"]
        assert _status_file(cache, lab.killed).read_bytes() == server_status
        assert not (cache / "runs" / ".recycle" / recycled).exists()
        assert [p.name for p in cache.rglob(recycled)] == [recycled]
        _assert_runs_mirrored(manifest, lab.root, cache)
        assert recycled in _listed(viewer)
        assert stats["files_synced"] == 1  # only status.json: the recycled run moved back


def test_a_run_put_back_without_a_viewer_is_unhidden_by_the_next_sync_with_one(
    upstream_root: UpstreamRoot, viewer_sdk: UpstreamSdk, ssh_config: Path, tmp_path: Path
) -> None:
    """Deleted in the viewer, synced without ``--viewer``: the run is back on disk at once
    (still marked deleted for the viewer, whose index hides it); the next sync that can
    tell the viewer has it restored."""
    lab = upstream_root
    cache = tmp_path / MARKED_CACHE
    _generate(lab.root)
    _sync(lab.root, cache, ssh_config)
    recycled = lab.ended[-1]
    with viewer_sdk.viewer(cache, tmp_path / "viewer-home") as viewer:
        viewer.wait_for_runs(set(lab.statuses))
        status, body = viewer.request("POST", "/api/runs/soft-delete", {"run_ids": [recycled]})
        assert status == 200, body

        stats, _ = _sync(lab.root, cache, ssh_config)
        assert stats["viewer"] is None
        assert [p.name for p in cache.rglob(recycled)] == [recycled]
        assert LocalCacheManager(cache).viewer_hidden_runs() == {recycled}
        assert recycled not in _listed(viewer)

        # Nothing changed on the server: the cheap no-change check, and the viewer is told.
        stats, _ = _sync(lab.root, cache, ssh_config, "--viewer", viewer.url)
        assert stats["skipped"] is True
        assert stats["viewer"]["restored"] == [recycled]
        assert recycled in _listed(viewer)
        assert LocalCacheManager(cache).viewer_hidden_runs() == set()


def test_no_viewer_answering_is_a_warning_not_a_failure(
    upstream_root: UpstreamRoot, ssh_config: Path, tmp_path: Path
) -> None:
    lab = upstream_root
    _generate(lab.root)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        stats, result = _sync(
            lab.root, tmp_path / PLAIN_CACHE, ssh_config, "--viewer", f"http://127.0.0.1:{port}"
        )
    assert stats["exit_code"] == 0 and stats["files_synced"] > 0
    assert "no viewer answered" in stats["viewer"]["problem"]
    assert "no viewer answered" in result.stderr
    assert "remote_cache" in result.stderr  # the unmarked cache is named in a warning too


def _status_file(root: Path, run_id: str) -> Path:
    """``status.json`` of a run in either layout."""
    (found,) = [p for p in root.rglob(f"{run_id}/status.json") if ".recycle" not in p.parts]
    return found

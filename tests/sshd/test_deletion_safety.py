"""Deletion safety with ``delete=True`` against a real sshd (issue 5, item 6; spec 3.10).

A manifest that is truncated, typed wrongly or about another root never deletes anything from the
cache, an active manifest never deletes, and a mass deletion needs ``--allow-mass-delete``; with
it, exactly the runs that left the server are removed. Proven elsewhere: an empty manifest
(test_manifest_sync.py::test_an_empty_manifest_never_deletes_anything), the library's mass
deletion flag (::test_mass_deletion_needs_an_explicit_flag), an active manifest in auto mode
(::test_active_manifest_is_applied_when_the_full_one_is_unchanged), a legacy walk that could not
read a run (test_broken_servers.py::test_legacy_walk_denied_one_run_syncs_the_rest_and_deletes_
nothing).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from harness.lab import (
    Lab,
    assert_cache_equals_server,
    cache_files,
)
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.manifest import ManifestType
from runicorn.sync.cache import LocalCacheManager

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=10)]


@pytest.fixture
def mirrored(lab: Lab, cache: Path, client_for) -> dict[str, bytes]:
    """The cache after one clean sync, then most runs removed from the server: any manifest
    the client trusted would now delete them."""
    client_for().sync()
    before = cache_files(cache)
    _remove_runs(lab, 7)
    return before


def _remove_runs(lab: Lab, count: int) -> list[str]:
    victims = [r for r in lab.info.listed_runs if r.status != "running"][:count]
    for run in victims:
        for path in sorted(run.path.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        run.path.rmdir()
    return [run.rel for run in victims]


def _cached_runs(cache: Path) -> set[str]:
    manager = LocalCacheManager(cache)
    try:
        return {run.run_id for run in manager.list_runs()}
    finally:
        manager.close()


def _fresh_document(lab: Lab) -> dict:
    """The manifest of the server as it is now (the removed runs are gone from it)."""
    lab.publish(now=lab.now + 60)
    return orjson.loads((lab.manifest_dir / "full_manifest.json").read_bytes())


def _plant(lab: Lab, data: bytes, *, gz: bool) -> None:
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        (lab.manifest_dir / name).unlink(missing_ok=True)
    (lab.manifest_dir / ("full_manifest.json.gz" if gz else "full_manifest.json")).write_bytes(data)


def _cut_json(lab: Lab) -> None:
    data = orjson.dumps(_fresh_document(lab))
    _plant(lab, data[: len(data) // 2], gz=False)


def _cut_gzip(lab: Lab) -> None:
    data = gzip.compress(orjson.dumps(_fresh_document(lab)))
    _plant(lab, data[: len(data) - 200], gz=True)


def _runs_cut_statistics_kept(lab: Lab) -> None:
    document = _fresh_document(lab)
    document["experiments"] = document["experiments"][:1]
    _plant(lab, orjson.dumps(document), gz=False)


def _files_cut_statistics_kept(lab: Lab) -> None:
    document = _fresh_document(lab)
    document["experiments"][-1]["files"] = document["experiments"][-1]["files"][:1]
    _plant(lab, orjson.dumps(document), gz=True)


@pytest.mark.parametrize(
    "truncate",
    [_cut_json, _cut_gzip, _runs_cut_statistics_kept, _files_cut_statistics_kept],
    ids=["cut-json", "cut-gzip", "runs-cut", "files-cut"],
)
def test_a_truncated_manifest_never_deletes_anything(
    lab: Lab, cache: Path, client_for, mirrored: dict[str, bytes], truncate
) -> None:
    runs_before = _cached_runs(cache)
    truncate(lab)

    with pytest.raises(ValueError):
        client_for(delete=True, allow_mass_delete=True).sync()

    assert cache_files(cache) == mirrored
    assert _cached_runs(cache) == runs_before


def test_a_manifest_about_another_root_never_deletes_anything(
    lab: Lab, cache: Path, client_for, mirrored: dict[str, bytes]
) -> None:
    runs_before = _cached_runs(cache)
    document = _fresh_document(lab)
    document["remote_root"] = str(lab.root.parent / "another-lab")
    _plant(lab, orjson.dumps(document), gz=False)

    with pytest.raises(ValueError, match="remote_root"):
        client_for(delete=True, allow_mass_delete=True).sync()

    assert cache_files(cache) == mirrored
    assert _cached_runs(cache) == runs_before


def test_an_active_manifest_published_as_the_full_one_never_deletes_anything(
    lab: Lab, cache: Path, client_for, mirrored: dict[str, bytes]
) -> None:
    runs_before = _cached_runs(cache)
    active = lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
    (lab.manifest_dir / "full_manifest.json").write_bytes(active.to_json())
    (lab.manifest_dir / "full_manifest.json.gz").unlink()

    with pytest.raises(ValueError, match="active manifest"):
        client_for(delete=True, allow_mass_delete=True).sync()

    assert cache_files(cache) == mirrored
    assert _cached_runs(cache) == runs_before


def test_an_active_manifest_in_active_mode_never_deletes_anything(
    lab: Lab, cache: Path, client_for, mirrored: dict[str, bytes]
) -> None:
    runs_before = _cached_runs(cache)
    lab.publish(ManifestType.ACTIVE, now=lab.now + 60)

    stats = client_for(delete=True, allow_mass_delete=True, manifest_type="active").sync()

    assert stats["manifest_type"] == "active"
    assert stats["deleted_count"] == 0
    assert _cached_runs(cache) == runs_before
    assert set(mirrored) <= set(cache_files(cache))


# --------------------------------------------------------------------------- the CLI flag


def test_cli_mass_deletion_needs_allow_mass_delete_and_then_deletes_exactly_the_vanished_runs(
    lab: Lab, cache: Path, sshd_server: SshServer, tmp_path: Path, cli_backend: Backend
) -> None:
    config = sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    args = ["sync", f"labserver:{lab.root}", str(cache), "--ssh-config", str(config), "--json"]
    runner = CliRunner()
    assert runner.invoke(main, args, catch_exceptions=False).exit_code == 0
    runs_before = _cached_runs(cache)
    gone = _remove_runs(lab, 6)
    lab.publish(now=lab.now + 60)

    refused = runner.invoke(main, [*args, "--delete"], catch_exceptions=False)
    kept = _cached_runs(cache)
    allowed = runner.invoke(
        main, [*args, "--delete", "--allow-mass-delete"], catch_exceptions=False
    )

    assert refused.exit_code == 3, refused.stderr  # --delete asked for and not done
    assert "deleted nothing" in refused.stderr
    refused_stats = orjson.loads(refused.stdout)
    assert refused_stats["deleted_count"] == 0
    assert "--allow-mass-delete" in refused_stats["deletion_refused"]
    assert kept == runs_before
    assert allowed.exit_code == 0, allowed.stderr
    assert orjson.loads(allowed.stdout)["deleted_count"] == len(gone) == 6
    assert _cached_runs(cache) == runs_before - {rel.rsplit("/", 1)[1] for rel in gone}
    assert_cache_equals_server(lab.root, cache)

"""The client's platform name rules, for Windows and macOS alike on this machine, and a
Windows client refusing what it cannot store instead of writing it as another file."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest

from harness.lab import make_lab
from runicorn.core.backend import Backend
from runicorn.format.client_names import (
    REASON_WINDOWS_CHARACTER,
    REASON_WINDOWS_DEVICE,
    REASON_WINDOWS_TRAILING,
    case_twins,
    client_path_problem,
    windows_name_problem,
)
from runicorn.manifest import ManifestGenerator, ManifestType
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.cache import tree as tree_module
from runicorn.sync.service import MetadataSyncService
from runicorn.transport.local_remote import LocalRemote


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("CON", REASON_WINDOWS_DEVICE),
        ("con", REASON_WINDOWS_DEVICE),
        ("nul.txt", REASON_WINDOWS_DEVICE),
        ("Com1.log", REASON_WINDOWS_DEVICE),
        ("LPT9", REASON_WINDOWS_DEVICE),
        ("aux .tar.gz", REASON_WINDOWS_DEVICE),
        ("run.", REASON_WINDOWS_TRAILING),
        ("run ", REASON_WINDOWS_TRAILING),
        ("a:b", REASON_WINDOWS_CHARACTER),
        ("what?", REASON_WINDOWS_CHARACTER),
        ('say "hi"', REASON_WINDOWS_CHARACTER),
        ("a|b", REASON_WINDOWS_CHARACTER),
        ("<x>", REASON_WINDOWS_CHARACTER),
        ("*", REASON_WINDOWS_CHARACTER),
        ("CONFIG", None),
        ("console.json", None),
        ("com10", None),
        ("lpt", None),
        ("run.txt", None),
        (".hidden", None),
        ("résumé", None),
    ],
)
def test_the_windows_name_rule(name: str, reason: str | None) -> None:
    assert windows_name_problem(name) == reason


def test_the_rule_applies_on_windows_only() -> None:
    path = "vision/aux/runs/r1/meta.json"
    problem = client_path_problem(path, "win32")
    assert problem is not None and problem.startswith("'aux' ") and "device name" in problem
    assert client_path_problem(path, "darwin") is None
    assert client_path_problem(path, "linux") is None
    assert client_path_problem("vision/resnet/runs/r1/meta.json", "win32") is None


def test_case_and_normalisation_twins_on_macos_and_windows() -> None:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    paths = ["Vision/a/runs/r1/x", "vision/a/runs/r1/x", f"{nfc}/x", f"{nfd}/x", "other/x"]
    expected = {"vision/a/runs/r1/x": "Vision/a/runs/r1/x", f"{nfd}/x": f"{nfc}/x"}
    assert case_twins(paths, "darwin") == expected
    assert case_twins(paths, "win32") == expected
    assert case_twins(paths, "linux") == {}


def test_a_windows_client_refuses_a_device_named_run_and_syncs_the_rest(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = make_lab(tmp_path, backend, runs=4, publish=False)
    victim = lab.info.listed_runs[0]
    experiment = lab.root / victim.project / victim.name
    os.rename(experiment, experiment.parent / "aux")
    ManifestGenerator(lab.root, backend=backend).generate(ManifestType.FULL)
    monkeypatch.setattr(tree_module, "CLIENT_PLATFORM", "win32")
    cache = LocalCacheManager(tmp_path / "cache")
    remote = LocalRemote(str(lab.root))
    try:
        service = MetadataSyncService(
            None,
            None,
            str(lab.root),
            cache,
            manifest_sync_jitter=0.0,
            remote=remote,
            backend=backend,
        )
        service.sync_all()
    finally:
        remote.close()
        cache.close()
    stats = service.last_stats
    assert stats is not None
    failed = stats["failed_files"]
    refused = f"{victim.project}/aux/"
    assert not (tmp_path / "cache" / victim.project / "aux").exists()
    assert failed and all(path.startswith(refused) for path in failed)
    assert all("device name" in str(reason) for reason in failed.values())
    others = [run for run in lab.info.listed_runs if run is not victim]
    for run in others:
        assert (tmp_path / "cache" / run.project / run.name / "runs" / run.run_id).is_dir()

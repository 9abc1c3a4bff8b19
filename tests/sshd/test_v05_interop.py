"""Syncing from a server whose manifests a 0.5.x generator publishes (real sshd, both
backends): their tail hashes are MD5 without an algorithm field, and appends are still
extended in place, verified, instead of fetched whole."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from harness.lab import Lab
from harness.v05_generator import publish_v05
from runicorn.demo.sample_lab import StepInfo, training_step

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=8, scale=1.0, publish=False)]


def _assert_mirrors(doc: dict, lab: Lab, cache: Path) -> None:
    listed = [f["path"] for exp in doc["experiments"] for f in exp["files"]]
    assert listed
    for path in listed:
        assert (cache / path).read_bytes() == (lab.root / path).read_bytes(), path


def _step(lab: Lab) -> tuple[StepInfo, dict]:
    step = training_step(lab.root, seed=3, now=lab.now + 60, new_runs=0)
    return step, publish_v05(lab.root)


def test_appends_against_a_v05_manifest_are_extended_in_place(lab: Lab, cache: Path, client_for):
    first = publish_v05(lab.root)
    client_for().sync()
    _assert_mirrors(first, lab, cache)
    step, doc = _step(lab)
    assert step.appended
    stats = client_for().sync()
    _assert_mirrors(doc, lab, cache)
    assert stats["failed_count"] == 0
    assert stats["incremental_count"] == len(step.appended)
    whole = sum((lab.root / path).stat().st_size for path in step.appended)
    rewritten = sum((lab.root / path).stat().st_size for path in step.rewritten)
    gz = (lab.manifest_dir / "full_manifest.json.gz").stat().st_size
    expected = sum(step.appended.values()) + rewritten + gz + 4096  # + the header probe
    assert stats["bytes_downloaded"] <= expected < whole / 4, (stats, expected, whole)


def test_a_wrong_v05_tail_hash_means_a_whole_file_download(lab: Lab, cache: Path, client_for):
    publish_v05(lab.root)
    client_for().sync()
    step, doc = _step(lab)
    appended = step.appended
    victim = sorted(appended)[0]
    for exp in doc["experiments"]:
        for entry in exp["files"]:
            if entry["path"] == victim:
                entry["tail_hash"] = "0" * 32
    text = json.dumps(doc, indent=2)
    (lab.manifest_dir / "full_manifest.json").write_text(text)
    with gzip.open(lab.manifest_dir / "full_manifest.json.gz", "wt") as handle:
        handle.write(text)
    stats = client_for().sync()
    assert stats["failed_count"] == 0
    assert stats["incremental_count"] == len(appended) - 1
    assert (cache / victim).read_bytes() == (lab.root / victim).read_bytes()
    _assert_mirrors(doc, lab, cache)

"""ManifestGenerator: what it publishes, when it publishes, and what it survives.

Every test runs on both backends (the ``backend`` fixture). Trees are built here with fixed
contents and ``os.utime`` mtimes; the clock, snapshot UUIDs and hostname are injected, so a
manifest is a pure function of the tree.

Golden manifests: ``tests/golden/{full,active}_manifest.json`` are what the fixed tree of
:func:`_build_golden_tree` must produce, byte for byte, on every backend. After an
intentional change of the format or of the tree, regenerate them with::

    RUNICORN_UPDATE_GOLDEN=1 pytest tests/unit/test_generator.py -k golden --no-native

and review the diff. The tree is generated through ``/proc/self/cwd/lab`` (the test first
changes into its temporary directory) so that ``remote_root`` in the manifest is the same
string on every machine and in every run.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import orjson
import pytest
from blake3 import blake3

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn.core.scan import MAX_READ_BYTES
from runicorn.format.compression import compress
from runicorn.format.published import PublishedManifest
from runicorn.manifest import (
    ManifestGenerationError,
    ManifestGenerator,
    ManifestType,
    SyncManifest,
)

GOLDEN_DIR = Path(__file__).parents[1] / "golden"
UPDATE_GOLDEN = os.environ.get("RUNICORN_UPDATE_GOLDEN", "") not in ("", "0")

NOW = 1_704_200_000.0
"""The injected clock: 2024-01-02 12:53:20 UTC."""

HOUR = 3600.0
_snapshot_numbers = itertools.count(1)


def _ns(seconds: float, extra_ns: int = 0) -> int:
    return int(seconds) * 1_000_000_000 + round((seconds % 1) * 1e9) + extra_ns


def _write(path: Path, data: bytes | str, mtime: float, extra_ns: int = 0) -> Path:
    """Write a file with a fixed mtime (atime too; nothing here reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    stamp = _ns(mtime, extra_ns)
    os.utime(path, ns=(stamp, stamp))
    return path


def _events(count: int, start: int = 0) -> str:
    return "".join(
        f'{{"step":{i},"loss":{1 / (i + 1):.6f},"acc":{i / (i + 100):.6f}}}\n'
        for i in range(start, start + count)
    )


def _run(
    root: Path,
    project: str = "proj",
    name: str = "exp",
    run_id: str = "20240101_000000_000001",
    *,
    status: str = "finished",
    mtime: float = NOW - 10 * HOUR,
    events: int = 5,
    media: int = 1,
) -> Path:
    """A small complete run: meta, status, summary, events, logs, media, lock files."""
    run = root / project / name / "runs" / run_id
    _write(run / "meta.json", f'{{"id":"{run_id}","created_at":{mtime - 100}}}', mtime - 100)
    _write(run / "status.json", f'{{"status":"{status}"}}', mtime)
    _write(run / "summary.json", '{"loss":0.1}', mtime)
    _write(run / "events.jsonl", _events(events), mtime)
    _write(run / "logs.txt", "".join(f"line {i}\n" for i in range(events)), mtime)
    for i in range(media):
        _write(run / "media" / f"step_{i}.png", b"\x89PNG" + bytes([i]) * 10, mtime)
    _write(run / "events.jsonl.lock", b"", mtime)
    _write(run / "logs.txt.lock", b"", mtime)
    return run


def _append(path: Path, data: str | bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def make_generator(backend):
    """``make_generator(root, **kwargs)``: a deterministic generator on the backend under test."""

    def make(root: Path, **kwargs) -> ManifestGenerator:
        kwargs.setdefault("clock", lambda: NOW)
        kwargs.setdefault("uuid_factory", lambda: f"snapshot-{next(_snapshot_numbers)}")
        kwargs.setdefault("hostname", "lab-01")
        return ManifestGenerator(root, backend=backend, **kwargs)

    return make


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """Three finished runs over two projects."""
    root = tmp_path / "lab"
    _run(root, "proj", "exp", "20240101_000000_000001")
    _run(root, "proj", "exp", "20240101_000000_000002", events=8)
    _run(root, "other", "exp", "20240101_000000_000003", media=2)
    return root


def _entries(manifest: SyncManifest) -> dict[str, dict]:
    return {entry.path: entry.to_dict() for entry in manifest.iter_files()}


def _paths(manifest: SyncManifest) -> set[str]:
    return set(_entries(manifest))


def _content(manifest: SyncManifest) -> bytes:
    return orjson.dumps([exp.to_dict() for exp in manifest.experiments])


def _tail_hash(data: bytes, size: int) -> str:
    return blake3(data[max(0, size - 4096) : size]).hexdigest(length=16)


def _leftover_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


# --- golden manifests ----------------------------------------------------------------------


def _build_golden_tree(root: Path) -> None:
    """The fixed sample tree: every kind of file and run the layout knows, with fixed mtimes."""
    old = NOW - 2 * 24 * HOUR
    recent = NOW - 30 * 60
    live = NOW - 60

    finished = root / "vision" / "resnet50" / "runs" / "20231231_090000_a1b2c3"
    _write(
        finished / "meta.json", '{"id":"20231231_090000_a1b2c3","created_at":1704013200.25}', old
    )
    _write(finished / "status.json", '{"status":"finished","started_at":1704013200}', old, 5)
    _write(finished / "summary.json", '{"best_acc":0.9321,"epochs":90}', old, 123_456_789)
    _write(finished / "environment.json", '{"python":"3.11.7"}', old)
    _write(finished / "events.jsonl", _events(120), old, 999_999_999)  # > 4096 bytes
    _write(finished / "logs.txt", "".join(f"epoch {i} done\n" for i in range(90)), old)
    _write(finished / "media" / "step_0001.png", b"\x89PNG\r\n\x1a\n" + bytes(range(64)), old)
    _write(finished / "media" / "curves" / "loss.svg", "<svg/>", old)
    _write(finished / "events.jsonl.lock", b"", old)
    _write(finished / "logs.txt.lock", b"", old)

    running = root / "vision" / "resnet50" / "runs" / "20240102_120000_d4e5f6"
    _write(running / "meta.json", '{"id":"20240102_120000_d4e5f6","created_at":1704196800}', live)
    _write(running / "status.json", '{"status":"running","started_at":1704196800}', live)
    _write(running / "events.jsonl", _events(30) + '{"step":30,"lo', live, 1)  # partial line
    _write(running / "logs.txt", "starting\nepoch 0\n", live)
    _write(running / "events.jsonl.lock", b"", live)

    deleted = root / "vision" / "vit" / "runs" / "20231230_000000_0a0b0c"
    _write(deleted / "meta.json", '{"id":"20231230_000000_0a0b0c"}', old)
    _write(deleted / ".deleted", b"", old)

    tagged = root / "nlp" / "gpt-small" / "runs" / "20240102_080000_ffeedd"
    _write(tagged / "meta.json", '{"id":"20240102_080000_ffeedd"}', recent)
    _write(tagged / "status.json", '{"status":"failed","started_at":1704182400.5}', recent)
    _write(tagged / "events.jsonl", b"", recent)
    _write(tagged / "artifacts_used.json", "[]", recent)

    broken = root / "nlp" / "gpt-small" / "runs" / "20240101_000000_123456"
    _write(broken / "meta.json", '{"id":"20240101_0', old)  # truncated mid-rewrite
    _write(broken / "status.json", "", old)
    _write(broken / "logs.txt", "no newline at all", old)

    (root / "nlp" / "empty-experiment").mkdir(parents=True)
    (root / "artifacts" / "model").mkdir(parents=True)
    _write(root / "runicorn.db", b"SQLite format 3\0", old)
    _write(
        root / ".experiments_metadata.json",
        '{"20240102_080000_ffeedd":{"tags":["gpt","baseline","gpt"]},'
        '"20231231_090000_a1b2c3":["vision"],"20240101_000000_123456":{"tags":"oops"}}',
        old,
    )


@pytest.fixture
def golden_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_generator):
    monkeypatch.chdir(tmp_path)
    _build_golden_tree(tmp_path / "lab")
    return make_generator(
        Path("/proc/self/cwd/lab"),
        uuid_factory=lambda: "6f1c2a8e-0000-4000-8000-00000000beef",
        hostname="gpu-lab-01",
    )


@pytest.mark.parametrize("manifest_type", [ManifestType.FULL, ManifestType.ACTIVE])
def test_golden_tree_gives_the_golden_manifest_byte_for_byte(golden_generator, manifest_type):
    _, path = golden_generator.generate(manifest_type)
    golden = GOLDEN_DIR / manifest_type.filename
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_bytes(path.read_bytes())
    assert path.read_bytes() == golden.read_bytes()


@pytest.mark.parametrize("manifest_type", [ManifestType.FULL, ManifestType.ACTIVE])
def test_golden_gzip_is_the_deterministic_compression_of_the_golden_json(
    golden_generator, manifest_type
):
    _, path = golden_generator.generate(manifest_type)
    gz = path.with_name(path.name + ".gz")
    assert gz.read_bytes() == compress((GOLDEN_DIR / manifest_type.filename).read_bytes())


def test_golden_manifests_are_valid_and_cover_the_tree():
    full = SyncManifest.from_json((GOLDEN_DIR / "full_manifest.json").read_bytes())
    active = SyncManifest.from_json((GOLDEN_DIR / "active_manifest.json").read_bytes())
    assert [exp.run_id for exp in full.experiments] == [
        "20240101_000000_123456",
        "20240102_080000_ffeedd",
        "20231231_090000_a1b2c3",
        "20240102_120000_d4e5f6",
    ]
    assert [exp.run_id for exp in active.experiments] == [
        "20240102_080000_ffeedd",
        "20240102_120000_d4e5f6",
    ]
    statuses = {exp.run_id: (exp.status, exp.tags) for exp in full.experiments}
    assert statuses == {
        "20240101_000000_123456": ("unknown", None),
        "20240102_080000_ffeedd": ("failed", ["baseline", "gpt"]),
        "20231231_090000_a1b2c3": ("finished", ["vision"]),
        "20240102_120000_d4e5f6": ("running", None),
    }


def _build_runs_path_golden_tree(root: Path) -> None:
    """The fixed SDK 0.6+ tree: runs at several depths and at the empty path, the viewer's
    recycle bin, the root index files, archive blobs and lock files beside run files."""
    old = NOW - 2 * 24 * HOUR
    live = NOW - 60

    deep = root / "runs" / "cv" / "yolo" / "ablation" / "20231231_090000_a1b2c3"
    _write(deep / "meta.json", '{"id":"20231231_090000_a1b2c3","path":"cv/yolo/ablation"}', old)
    _write(deep / "status.json", '{"status":"finished","started_at":1704013200}', old, 5)
    _write(deep / "events.jsonl", _events(120), old, 999_999_999)
    _write(deep / "events.jsonl.lock", b"", old)
    _write(deep / "logs.txt", "epoch 0 done\n", old)
    _write(deep / "assets.json", '{"code":[{"archive_path":"/srv/lab/archive/blobs/ab"}]}', old)
    _write(deep / ".outputs_state.json", "{}", old)
    _write(deep / "media" / "step_0001.png", b"\x89PNG\r\n\x1a\n", old)

    running = root / "runs" / "cv" / "20240102_120000_d4e5f6"
    _write(running / "meta.json", '{"id":"20240102_120000_d4e5f6","created_at":1704196800}', live)
    _write(running / "status.json", '{"status":"running","started_at":1704196800}', live)
    _write(running / "events.jsonl", _events(3) + '{"step":3,"lo', live, 1)
    _write(running / "logs.txt.lock", b"", live)

    top = root / "runs" / "20240101_000000_0f0f0f"
    _write(top / "status.json", '{"status":"failed"}', old)

    recycled = root / "runs" / ".recycle" / "20231230_000000_0a0b0c"
    _write(recycled / "meta.json", '{"id":"20231230_000000_0a0b0c","path":"cv"}', old)
    _write(recycled / ".deleted", "{}", old)
    (root / "runs" / "cv" / "20240102_130000_made00" / "media").mkdir(parents=True)
    _write(root / "runicorn.db", b"SQLite format 3\0", old)
    _write(root / "runicorn.db-wal", b"", old)
    _write(root / "runicorn.db-shm", b"", old)
    _write(root / "archive" / "blobs" / "ab", b"code snapshot", old)


RUNS_PATH_GOLDEN = GOLDEN_DIR / "runs_path_full_manifest.json"


def test_runs_path_golden_tree_gives_the_golden_manifest_byte_for_byte(
    tmp_path, monkeypatch, make_generator
):
    monkeypatch.chdir(tmp_path)
    _build_runs_path_golden_tree(tmp_path / "lab")
    generator = make_generator(
        Path("/proc/self/cwd/lab"),
        uuid_factory=lambda: "6f1c2a8e-0000-4000-8000-00000000beef",
        hostname="gpu-lab-01",
    )
    manifest, path = generator.generate()
    if UPDATE_GOLDEN:
        RUNS_PATH_GOLDEN.write_bytes(path.read_bytes())
    assert path.read_bytes() == RUNS_PATH_GOLDEN.read_bytes()
    assert generator.last_report.run_layout == "runs-path"
    assert [(exp.path, exp.run_id, exp.status) for exp in manifest.experiments] == [
        ("", "20240101_000000_0f0f0f", "failed"),
        ("cv", "20240102_120000_d4e5f6", "running"),
        ("cv/yolo/ablation", "20231231_090000_a1b2c3", "finished"),
    ]
    listed = [entry.path for entry in manifest.iter_files()]
    assert not [p for p in listed if "runicorn.db" in p or "archive" in p or ".recycle" in p]
    assert "runs/cv/yolo/ablation/20231231_090000_a1b2c3/.outputs_state.json" in listed


def test_mixed_layouts_are_named_and_listed_together(lab, make_generator):
    _write(lab / "runs" / "p" / "20240101_000000_00000a" / "meta.json", "{}", NOW - HOUR)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert generator.last_report.run_layout == "mixed"
    assert [(exp.project, exp.name, exp.path) for exp in manifest.experiments] == [
        ("other", "exp", None),
        ("proj", "exp", None),
        ("proj", "exp", None),
        ("runs", "p", "p"),
    ]


def test_an_empty_root_has_layout_none(tmp_path, make_generator):
    generator = make_generator(tmp_path)
    manifest, _ = generator.generate()
    assert manifest.experiments == [] and generator.last_report.run_layout == "none"


def test_golden_generation_reports_the_broken_metadata(golden_generator):
    golden_generator.generate()
    warnings = "\n".join(golden_generator.last_report.warnings)
    assert "nlp/gpt-small/runs/20240101_000000_123456/meta.json: not a valid JSON" in warnings
    assert "nlp/gpt-small/runs/20240101_000000_123456/status.json: not a valid JSON" in warnings


# --- what a manifest lists ----------------------------------------------------------------


def test_scan_threads_default_to_what_the_backend_gains_from(lab, make_generator, backend):
    generator = make_generator(lab)
    if backend.releases_gil:
        assert generator.scan_threads == backend.default_scan_threads()
        assert 1 <= generator.scan_threads <= 4
        assert generator.scan_threads <= (os.cpu_count() or 1)
    else:
        assert generator.scan_threads == 1
    chosen, _ = generator.generate(output_path=lab.parent / "auto.json")
    single, _ = make_generator(lab, scan_threads=1).generate(output_path=lab.parent / "one.json")
    assert chosen.experiments == single.experiments


def test_scan_threads_below_one_are_refused(lab, make_generator):
    with pytest.raises(ValueError, match="scan_threads must be at least 1"):
        make_generator(lab, scan_threads=0)


def test_lock_files_and_soft_deleted_runs_are_never_listed(lab, make_generator):
    _write(lab / "proj" / "exp" / "runs" / "20240101_000000_000002" / ".deleted", b"", NOW)
    manifest, _ = make_generator(lab).generate()
    assert [exp.run_id for exp in manifest.experiments] == [
        "20240101_000000_000003",
        "20240101_000000_000001",
    ]
    assert not [path for path in _paths(manifest) if path.endswith(".lock")]
    assert not [path for path in _paths(manifest) if path.endswith(".deleted")]


def test_the_logs_of_a_soft_deleted_run_are_not_tail_hashed(lab, make_generator):
    generator = make_generator(lab)
    generator.generate()
    hashed_with_it = generator.last_report.files_hashed
    run = lab / "proj" / "exp" / "runs" / "20240101_000000_000002"
    _write(run / ".deleted", b"", NOW)
    generator = make_generator(lab, incremental=False)
    generator.generate()
    appended_logs = [p for p in run.iterdir() if p.name in ("events.jsonl", "logs.txt")]
    assert appended_logs
    assert generator.last_report.files_hashed == hashed_with_it - len(appended_logs)


def test_every_regular_file_of_a_run_is_listed_with_its_stat(lab, make_generator):
    manifest, _ = make_generator(lab).generate()
    run = "proj/exp/runs/20240101_000000_000001/"
    entries = _entries(manifest)
    assert sorted(p for p in entries if p.startswith(run)) == [
        run + name
        for name in (
            "events.jsonl",
            "logs.txt",
            "media/step_0.png",
            "meta.json",
            "status.json",
            "summary.json",
        )
    ]
    st = (lab / run / "media" / "step_0.png").stat()
    assert entries[run + "media/step_0.png"]["size"] == st.st_size
    assert entries[run + "media/step_0.png"]["mtime"] == st.st_mtime_ns / 1e9


def test_manifest_lists_experiments_and_files_in_sorted_order(lab, make_generator):
    manifest, _ = make_generator(lab).generate()
    keys = [(exp.project, exp.name, exp.run_id) for exp in manifest.experiments]
    assert keys == sorted(keys)
    for exp in manifest.experiments:
        assert [f.path for f in exp.files] == sorted(f.path for f in exp.files)


def test_published_json_and_gzip_hold_the_returned_manifest(lab, make_generator):
    manifest, path = make_generator(lab).generate()
    assert path == lab / ".runicorn" / "full_manifest.json"
    assert SyncManifest.from_json(path.read_bytes()) == manifest
    gz = path.with_name("full_manifest.json.gz").read_bytes()
    assert SyncManifest.from_gzip(gz) == manifest


def test_active_manifest_lists_running_and_recently_changed_runs(lab, make_generator):
    _run(lab, "proj", "live", "20240102_000000_00000a", status="running", mtime=NOW - 5 * HOUR)
    _run(lab, "proj", "fresh", "20240102_000000_00000b", mtime=NOW - HOUR / 2)
    manifest, path = make_generator(lab).generate(ManifestType.ACTIVE)
    assert path.name == "active_manifest.json"
    assert [exp.run_id for exp in manifest.experiments] == [
        "20240102_000000_00000b",
        "20240102_000000_00000a",
    ]


def test_active_selection_uses_file_mtimes_not_the_directory_mtime(lab, make_generator):
    run = lab / "proj" / "exp" / "runs" / "20240101_000000_000001"
    os.utime(run, ns=(_ns(NOW), _ns(NOW)))  # a touched directory is not activity
    manifest, _ = make_generator(lab).generate(ManifestType.ACTIVE)
    assert manifest.experiments == []
    _write(run / "media" / "late.png", b"x", NOW - 10)
    manifest, _ = make_generator(lab).generate(ManifestType.ACTIVE)
    assert [exp.run_id for exp in manifest.experiments] == ["20240101_000000_000001"]


def test_active_window_is_configurable(lab, make_generator):
    manifest, _ = make_generator(lab, active_window_seconds=11 * 3600).generate(ManifestType.ACTIVE)
    assert manifest.total_experiments == 3


def test_updated_at_is_the_newest_file_mtime(lab, make_generator):
    run = lab / "proj" / "exp" / "runs" / "20240101_000000_000001"
    _write(run / "media" / "late.png", b"x", NOW - 7, 42)
    manifest, _ = make_generator(lab).generate()
    exp = next(e for e in manifest.experiments if e.run_id == "20240101_000000_000001")
    assert exp.updated_at == _ns(NOW - 7, 42) / 1e9


def test_created_at_falls_back_to_the_oldest_file_when_metadata_is_missing(
    tmp_path, make_generator
):
    run = tmp_path / "p" / "n" / "runs" / "r1"
    _write(run / "logs.txt", "a\n", NOW - 50)
    _write(run / "media" / "x.png", "x", NOW - 80)
    manifest, _ = make_generator(tmp_path).generate()
    assert manifest.experiments[0].created_at == NOW - 80
    assert manifest.experiments[0].status == "unknown"


def test_custom_output_path_gets_its_gzip_beside_it(lab, tmp_path, make_generator):
    target = tmp_path / "elsewhere" / "deep" / "m.json"
    manifest, path = make_generator(lab).generate(output_path=target)
    assert path == target
    assert SyncManifest.from_gzip(Path(str(target) + ".gz").read_bytes()) == manifest
    assert not (lab / ".runicorn").exists()


def test_output_dir_argument_is_where_default_names_go(lab, tmp_path, make_generator):
    _, path = make_generator(lab, output_dir=tmp_path / "out").generate(ManifestType.ACTIVE)
    assert path == tmp_path / "out" / "active_manifest.json"


def test_negative_active_window_is_refused(lab, backend):
    with pytest.raises(ValueError, match="active_window_seconds"):
        ManifestGenerator(lab, active_window_seconds=-1, backend=backend)


# --- revisions -------------------------------------------------------------------------------


def test_first_generation_publishes_revision_one(lab, make_generator):
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert manifest.revision == 1
    assert generator.last_report.published


def test_generating_twice_without_a_change_keeps_revision_and_snapshot(lab, make_generator):
    generator = make_generator(lab)
    first, _ = generator.generate()
    second, _ = generator.generate()
    assert (second.revision, second.snapshot_id) == (first.revision, first.snapshot_id)


def test_generating_without_a_change_publishes_nothing(lab, make_generator):
    generator = make_generator(lab)
    _, path = generator.generate()
    gz = path.with_name(path.name + ".gz")
    before = [(p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in (path, gz)]
    generator.generate()
    assert not generator.last_report.published
    assert [(p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in (path, gz)] == before


def test_a_fresh_generator_process_also_sees_no_change(lab, make_generator):
    first, _ = make_generator(lab).generate()
    again = make_generator(lab)
    second, _ = again.generate()
    assert (second.revision, second.snapshot_id) == (first.revision, first.snapshot_id)
    assert not again.last_report.published


def test_appending_to_one_events_file_increases_revision_by_one(lab, make_generator):
    generator = make_generator(lab)
    first, _ = generator.generate()
    _append(lab / "proj/exp/runs/20240101_000000_000002/events.jsonl", _events(1, 8))
    second, _ = generator.generate()
    assert second.revision == first.revision + 1
    assert second.snapshot_id != first.snapshot_id
    assert generator.last_report.published


def test_appending_to_one_events_file_changes_only_that_entry(lab, make_generator):
    generator = make_generator(lab)
    before = _entries(generator.generate()[0])
    changed = "proj/exp/runs/20240101_000000_000002/events.jsonl"
    _append(lab / changed, _events(1, 8))
    after = _entries(generator.generate()[0])
    assert {p for p in after if after[p] != before.get(p)} == {changed}
    assert set(after) == set(before)
    assert after[changed]["size"] == (lab / changed).stat().st_size


def test_full_and_active_revisions_are_counted_independently(lab, make_generator):
    generator = make_generator(lab, active_window_seconds=100 * 3600)
    for step in range(3):
        _append(lab / "proj/exp/runs/20240101_000000_000001/logs.txt", f"more {step}\n")
        full, _ = generator.generate(ManifestType.FULL)
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert (full.revision, active.revision) == (3, 1)
    full_again, _ = generator.generate(ManifestType.FULL)
    assert full_again.revision == 3


def test_no_incremental_gives_the_same_manifest_content(lab, tmp_path, make_generator):
    incremental = make_generator(lab)
    incremental.generate()
    _append(lab / "proj/exp/runs/20240101_000000_000001/events.jsonl", '{"step": 99')
    reused, _ = incremental.generate()
    assert incremental.last_report.files_reused > 0
    scratch = make_generator(lab, incremental=False, output_dir=tmp_path / "scratch")
    rescanned, _ = scratch.generate()
    assert scratch.last_report.files_reused == 0
    assert _content(rescanned) == _content(reused)


def test_no_incremental_keeps_the_revision_when_nothing_changed(lab, make_generator):
    first, _ = make_generator(lab).generate()
    again = make_generator(lab, incremental=False)
    second, _ = again.generate()
    assert (second.revision, second.snapshot_id) == (first.revision, first.snapshot_id)
    assert again.last_report.files_hashed == 6


def test_a_lost_state_file_never_lowers_the_revision(lab, make_generator):
    generator = make_generator(lab)
    for step in range(3):
        _append(lab / "proj/exp/runs/20240101_000000_000001/logs.txt", f"more {step}\n")
        generator.generate()
    (lab / ".runicorn" / ".full_manifest.json.state").unlink()
    manifest, _ = generator.generate()
    assert manifest.revision == 4


def test_a_corrupt_state_file_is_a_warning_and_a_rescan(lab, make_generator):
    generator = make_generator(lab)
    first, _ = generator.generate()
    (lab / ".runicorn" / ".full_manifest.json.state").write_bytes(b'{"state_version": 1, "rev')
    second, _ = generator.generate()
    assert second.revision >= first.revision
    assert _content(second) == _content(first)
    assert any("corrupt" in warning for warning in generator.last_report.warnings)
    assert generator.last_report.files_reused == 0


# --- incremental reuse -----------------------------------------------------------------------


@pytest.fixture
def hash_spy(backend):
    """The backend under test, recording every path whose tail it is asked to hash."""
    requested: list[str] = []

    def hash_tails(root, requests, window):
        requested.extend(path for path, _, _ in requests)
        return backend.hash_tails(root, requests, window)

    return dataclasses.replace(backend, hash_tails=hash_tails), requested


def test_unchanged_append_only_files_are_not_read_again(lab, hash_spy):
    spied, requested = hash_spy
    generator = ManifestGenerator(lab, backend=spied, clock=lambda: NOW)
    generator.generate()
    assert len(requested) == 6  # events.jsonl and logs.txt of three runs
    requested.clear()
    generator.generate()
    assert requested == []
    assert generator.last_report.files_reused == 6


def test_only_the_appended_file_is_read_again(lab, hash_spy):
    spied, requested = hash_spy
    generator = ManifestGenerator(lab, backend=spied, clock=lambda: NOW)
    generator.generate()
    requested.clear()
    _append(lab / "other/exp/runs/20240101_000000_000003/logs.txt", "more\n")
    generator.generate()
    assert requested == ["other/exp/runs/20240101_000000_000003/logs.txt"]
    assert (generator.last_report.files_hashed, generator.last_report.files_reused) == (1, 5)


def test_a_file_modified_after_the_previous_scan_started_is_hashed_again(lab, hash_spy):
    """Racy-clean rule: a stat key taken while the file could still change is not trusted."""
    spied, requested = hash_spy
    log = lab / "proj/exp/runs/20240101_000000_000001/logs.txt"
    future = time.time() + 3600
    os.utime(log, (future, future))
    generator = ManifestGenerator(lab, backend=spied, clock=lambda: NOW)
    generator.generate()
    requested.clear()
    generator.generate()
    assert requested == ["proj/exp/runs/20240101_000000_000001/logs.txt"]


def test_a_rewrite_with_the_same_size_and_mtime_is_hashed_again(lab, make_generator):
    generator = make_generator(lab)
    log = lab / "proj/exp/runs/20240101_000000_000001/logs.txt"
    old = log.stat()
    first = _entries(generator.generate()[0])[str(log.relative_to(lab))]
    log.write_bytes(log.read_bytes().replace(b"line 4", b"LINE 4"))
    os.utime(log, ns=(old.st_atime_ns, old.st_mtime_ns))
    second = _entries(generator.generate()[0])[str(log.relative_to(lab))]
    assert second["tail_hash"] != first["tail_hash"]
    assert second["tail_hash"] == _tail_hash(log.read_bytes(), second["size"])


@pytest.fixture
def scan_spy(backend):
    """The backend under test, recording the file names each scan was asked to read."""
    asked: list[tuple[str, ...]] = []

    def scan_experiments(root, threads, read=()):
        asked.append(tuple(read))
        return backend.scan_experiments(root, threads, read)

    return dataclasses.replace(backend, scan_experiments=scan_experiments), asked


def test_the_scan_reads_run_metadata_only_when_there_are_no_memos(lab, scan_spy):
    spied, asked = scan_spy
    generator = ManifestGenerator(lab, backend=spied, clock=lambda: NOW)
    first, _ = generator.generate()
    _write(lab / "proj/exp/runs/20240101_000000_000001/status.json", '{"status":"failed"}', NOW)
    second, _ = generator.generate()
    ManifestGenerator(lab, backend=spied, clock=lambda: NOW, incremental=False).generate()
    assert asked == [("meta.json", "status.json"), (), ("meta.json", "status.json")]
    statuses = [
        {exp.run_id: exp.status for exp in manifest.experiments} for manifest in (first, second)
    ]
    assert statuses[0]["20240101_000000_000001"] == "finished"
    assert statuses[1]["20240101_000000_000001"] == "failed"


def test_metadata_too_large_for_the_scan_to_read_is_still_parsed(lab, make_generator):
    run = lab / "proj/exp/runs/20240101_000000_000001"
    padding = " " * MAX_READ_BYTES
    _write(run / "status.json", '{"status": "failed",' + padding + '"x": 1}', NOW - HOUR)
    manifest, _ = make_generator(lab).generate()
    exp = next(e for e in manifest.experiments if e.run_id == "20240101_000000_000001")
    assert exp.status == "failed"


def test_status_rewritten_in_place_is_read_again(lab, make_generator):
    generator = make_generator(lab)
    generator.generate()
    status = lab / "proj/exp/runs/20240101_000000_000001/status.json"
    _write(status, '{"status":"failed"}', NOW - 60)
    manifest, _ = generator.generate()
    exp = next(e for e in manifest.experiments if e.run_id == "20240101_000000_000001")
    assert exp.status == "failed"


# --- append-only files: cut at the last newline, hash bounded to the recorded size --------------


def test_a_half_written_last_line_is_not_recorded(tmp_path, make_generator):
    events = _write(tmp_path / "p/n/runs/r/events.jsonl", _events(3) + '{"step":3,"lo', NOW)
    manifest, _ = make_generator(tmp_path).generate()
    entry = _entries(manifest)["p/n/runs/r/events.jsonl"]
    assert entry["size"] == len(_events(3))
    assert entry["tail_hash"] == _tail_hash(events.read_bytes(), entry["size"])


def test_a_log_without_any_newline_is_recorded_empty(tmp_path, make_generator):
    _write(tmp_path / "p/n/runs/r/logs.txt", "no newline yet", NOW)
    manifest, _ = make_generator(tmp_path).generate()
    entry = _entries(manifest)["p/n/runs/r/logs.txt"]
    assert (entry["size"], entry["tail_hash"]) == (0, blake3(b"").hexdigest(length=16))


def test_tail_hash_covers_the_last_4096_bytes_of_a_long_file(tmp_path, make_generator):
    events = _write(tmp_path / "p/n/runs/r/events.jsonl", _events(500), NOW)
    manifest, _ = make_generator(tmp_path).generate()
    entry = _entries(manifest)["p/n/runs/r/events.jsonl"]
    data = events.read_bytes()
    assert entry["size"] == len(data) > 4096
    assert entry["tail_hash"] == blake3(data[-4096:]).hexdigest(length=16)


def test_completing_a_half_written_line_publishes_the_longer_size(tmp_path, make_generator):
    events = _write(tmp_path / "p/n/runs/r/events.jsonl", _events(3) + '{"step":3,"lo', NOW)
    generator = make_generator(tmp_path)
    generator.generate()
    _append(events, 'ss":0.25}\n')
    manifest, _ = generator.generate()
    assert _entries(manifest)["p/n/runs/r/events.jsonl"]["size"] == events.stat().st_size


def _trainer(paths: list[Path], stop: threading.Event, written: list[int]) -> None:
    """Append JSON lines in two writes each (the first ends mid-line), as a live run does."""
    for step in itertools.count():
        if stop.is_set() or step >= 40_000:
            return
        line = f'{{"step":{step},"loss":{1 / (step + 1):.9f},"pad":"{"x" * (step % 97)}"}}\n'
        cut = len(line) // 2
        path = paths[step % len(paths)]
        with open(path, "ab") as handle:
            handle.write(line[:cut].encode())
            handle.flush()
            handle.write(line[cut:].encode())
        written[0] = step


def test_a_trainer_appending_during_generation_never_yields_a_half_line(tmp_path, make_generator):
    files = [
        _write(tmp_path / "p/n/runs/r1/events.jsonl", b"", NOW),
        _write(tmp_path / "p/n/runs/r1/logs.txt", b"", NOW),
        _write(tmp_path / "p/n/runs/r2/events.jsonl", _events(200), NOW),
    ]
    generator = make_generator(tmp_path)
    stop, written = threading.Event(), [0]
    trainer = threading.Thread(target=_trainer, args=(files, stop, written))
    trainer.start()
    try:
        checked = 0
        for _ in range(40):
            manifest, _ = generator.generate()
            for path, entry in _entries(manifest).items():
                data = (tmp_path / path).read_bytes()  # the file only grows: [0, size) is stable
                size = entry["size"]
                assert size == 0 or data[size - 1 : size] == b"\n", path
                assert entry["tail_hash"] == _tail_hash(data, size), path
                checked += 1
    finally:
        stop.set()
        trainer.join()
    assert checked == 120
    assert written[0] > 0


# --- bad trees -------------------------------------------------------------------------------


def _problems(generator: ManifestGenerator) -> dict[str, str]:
    return dict(generator.last_report.problems)


def test_runs_that_is_a_file_is_reported_and_the_rest_listed(lab, make_generator):
    _write(lab / "proj" / "broken" / "runs", "not a directory", NOW)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert _problems(generator) == {"proj/broken/runs": "not a directory"}
    assert manifest.total_experiments == 3


def test_a_run_directory_that_is_a_file_is_reported(lab, make_generator):
    _write(lab / "proj/exp/runs/20240101_000000_00000f", "oops", NOW)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert _problems(generator) == {"proj/exp/runs/20240101_000000_00000f": "not a directory"}
    assert manifest.total_experiments == 3


def test_stray_files_above_the_run_level_are_ignored_silently(lab, make_generator):
    _write(lab / "notes.txt", "x", NOW)
    _write(lab / "proj" / "README", "x", NOW)
    _write(lab / "proj" / "exp" / "config.yaml", "x", NOW)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert generator.last_report.problems == []
    assert manifest.total_experiments == 3


@pytest.mark.parametrize("broken", ["meta.json", "status.json"])
@pytest.mark.parametrize("content", ["", '{"status": "fini', "[]", "\x00\x01"])
def test_invalid_run_metadata_is_a_warning_and_defaults(lab, make_generator, broken, content):
    run = lab / "proj/exp/runs/20240101_000000_000001"
    _write(run / broken, content, NOW - 10 * HOUR)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    exp = next(e for e in manifest.experiments if e.run_id == "20240101_000000_000001")
    expected_status = "unknown" if broken == "status.json" else "finished"
    assert exp.status == expected_status
    if broken == "meta.json":
        assert exp.created_at == min(f.mtime for f in exp.files)
    assert [w for w in generator.last_report.warnings if broken in w] == [
        f"proj/exp/runs/20240101_000000_000001/{broken}: "
        "not a valid JSON object (being rewritten?); using defaults"
    ]
    assert manifest.total_experiments == 3
    assert run.relative_to(lab).as_posix() + "/" + broken in _paths(manifest)


def test_invalid_tags_file_is_a_warning_and_no_tags(lab, make_generator):
    _write(lab / ".experiments_metadata.json", '{"20240101_000000_000001": {"ta', NOW)
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert all(exp.tags is None for exp in manifest.experiments)
    assert any(".experiments_metadata.json" in w for w in generator.last_report.warnings)


def test_symlinks_pointing_outside_the_root_are_reported_and_not_followed(
    lab, tmp_path, make_generator
):
    outside = tmp_path / "outside"
    _run(outside, "secret", "exp", "20240101_000000_00000e")
    run = lab / "proj/exp/runs/20240101_000000_000001"
    (run / "media" / "leak.png").symlink_to(
        outside / "secret/exp/runs/20240101_000000_00000e/meta.json"
    )
    (run / "media" / "leakdir").symlink_to(outside)
    (lab / "proj/exp/runs/20240101_000000_00000e").symlink_to(
        outside / "secret/exp/runs/20240101_000000_00000e"
    )
    (lab / "secret").symlink_to(outside / "secret")
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert _problems(generator) == {
        "proj/exp/runs/20240101_000000_000001/media/leak.png": "symbolic link not followed",
        "proj/exp/runs/20240101_000000_000001/media/leakdir": "symbolic link not followed",
        "proj/exp/runs/20240101_000000_00000e": "symbolic link not followed",
        "secret": "symbolic link not followed",
    }
    assert manifest.total_experiments == 3
    assert manifest.total_files == 3 * 6 + 1


def test_a_symlinked_metadata_file_is_not_read(lab, tmp_path, make_generator):
    run = lab / "proj/exp/runs/20240101_000000_000001"
    secret = _write(tmp_path / "secret.json", '{"status": "leaked"}', NOW)
    (run / "status.json").unlink()
    (run / "status.json").symlink_to(secret)
    manifest, _ = make_generator(lab).generate()
    exp = next(e for e in manifest.experiments if e.run_id == "20240101_000000_000001")
    assert exp.status == "unknown"


def test_a_missing_root_is_an_error(tmp_path, make_generator):
    with pytest.raises(ManifestGenerationError, match="not a readable directory"):
        make_generator(tmp_path / "missing").generate()


def test_a_root_that_is_a_file_is_an_error(tmp_path, make_generator):
    _write(tmp_path / "file", "x", NOW)
    with pytest.raises(ManifestGenerationError, match="--root"):
        make_generator(tmp_path / "file").generate()


def test_an_output_that_cannot_be_created_is_an_error(lab, tmp_path, make_generator):
    _write(tmp_path / "blocker", "x", NOW)
    with pytest.raises(ManifestGenerationError, match="cannot create the manifest directory"):
        make_generator(lab).generate(output_path=tmp_path / "blocker" / "m.json")


@pytest.fixture
def shared_tmp():
    """A directory an unprivileged user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="runicorn-test-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir() and not sub.is_symlink():
            sub.chmod(0o755)
    path.chmod(0o755)
    subprocess.run(["rm", "-rf", str(path)], check=False)


NOBODY = 65534


def _as_unprivileged_user(function):
    """Run ``function()`` in a forked child as ``nobody`` (when we are root, since root reads
    everything regardless of permissions) and return its result or re-raise its error text."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            payload = ("ok", function())
        except BaseException as error:  # report everything to the parent
            payload = ("error", type(error).__name__, str(error), traceback.format_exc())
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(orjson.dumps(payload, default=str))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return orjson.loads(data)


def _chown_tree(path: Path) -> None:
    if os.geteuid() == 0:
        for sub in [path, *path.rglob("*")]:
            os.lchown(sub, NOBODY, NOBODY)


def test_an_unreadable_run_directory_is_reported_and_the_rest_listed(shared_tmp, make_generator):
    """Permissions are real here: the generator runs in a child process as ``nobody``."""
    root = shared_tmp / "lab"
    _run(root, "proj", "exp", "20240101_000000_000001")
    _run(root, "proj", "exp", "20240101_000000_000002")
    _run(root, "proj", "locked", "20240101_000000_000003")
    out = shared_tmp / "out"
    out.mkdir()
    _chown_tree(out)
    (root / "proj/exp/runs/20240101_000000_000002").chmod(0)
    (root / "proj/locked").chmod(0)
    generator = make_generator(root, output_dir=out)

    def generate():
        manifest, _ = generator.generate()
        return manifest.to_dict(), generator.last_report.problems

    result = _as_unprivileged_user(generate)
    assert result[0] == "ok", result
    manifest, problems = result[1]
    assert dict(problems) == {
        "proj/exp/runs/20240101_000000_000002": "unreadable: Permission denied",
        "proj/locked/runs": "unreadable: Permission denied",
    }
    assert [exp["run_id"] for exp in manifest["experiments"]] == ["20240101_000000_000001"]
    published = SyncManifest.from_json((out / "full_manifest.json").read_bytes())
    assert published.total_files == 6
    assert published.problems == sorted(dict(problems).items())  # the manifest says so too


def test_an_unreadable_root_is_an_error_and_the_previous_manifest_stays(shared_tmp, make_generator):
    root = shared_tmp / "lab"
    _run(root)
    out = shared_tmp / "out"
    out.mkdir()
    _chown_tree(root)
    _chown_tree(out)
    generator = make_generator(root, output_dir=out)

    def generate_then_lock_out():
        first, path = generator.generate()
        before = path.read_bytes()
        root.chmod(0)
        try:
            generator.generate()
        except ManifestGenerationError as error:
            return str(error), path.read_bytes() == before, first.revision
        return "no error", False, first.revision

    result = _as_unprivileged_user(generate_then_lock_out)
    assert result[0] == "ok", result
    message, unchanged, revision = result[1]
    assert "cannot read the experiments root" in message
    assert unchanged
    assert SyncManifest.from_json((out / "full_manifest.json").read_bytes()).revision == revision
    assert _leftover_temp_files(out) == []


# --- concurrency: racing generators, readers, kills -------------------------------------------


def _many_runs(root: Path, count: int) -> None:
    for index in range(count):
        _run(root, f"proj{index % 4}", "exp", f"20240101_000000_{index:06x}", events=3, media=2)


def _racer(root, backend, label, rounds, barrier, results) -> None:
    try:
        generator = ManifestGenerator(root, backend=backend, hostname="lab-01")
        events = root / f"proj{label}" / "exp" / "runs" / f"20240101_000000_{label:06x}"
        for round_number in range(rounds):
            barrier.wait()
            if round_number % 2 == 0:  # every other round both change the tree, then race
                _append(events / "events.jsonl", f'{{"round":{round_number}}}\n')
            manifest, _ = generator.generate()
            report = generator.last_report
            results.put(
                (
                    label,
                    round_number,
                    manifest.revision,
                    manifest.snapshot_id,
                    report.published,
                    blake3(_content(manifest)).hexdigest(),
                )
            )
            barrier.wait()
    except BaseException:
        results.put(("error", traceback.format_exc()))
        barrier.abort()


def test_racing_generators_never_publish_a_lower_or_duplicate_revision(tmp_path, backend):
    root = tmp_path / "lab"
    _many_runs(root, 40)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    rounds = 8
    racers = [
        context.Process(target=_racer, args=(root, backend, label, rounds, barrier, results))
        for label in (0, 1)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=60) for _ in range(2 * rounds)]
    for racer in racers:
        racer.join(timeout=30)
    assert all(outcome[0] != "error" for outcome in outcomes), outcomes

    content_of_revision: dict[int, set[str]] = {}
    snapshot_of_revision: dict[int, set[str]] = {}
    for _, _, revision, snapshot, _, content in outcomes:
        content_of_revision.setdefault(revision, set()).add(content)
        snapshot_of_revision.setdefault(revision, set()).add(snapshot)
    assert all(len(c) == 1 for c in content_of_revision.values()), content_of_revision
    assert all(len(s) == 1 for s in snapshot_of_revision.values()), snapshot_of_revision
    published = [outcome[2] for outcome in outcomes if outcome[4]]
    assert len(published) == len(set(published))
    for label in (0, 1):
        mine = [o[2] for o in sorted(outcomes, key=lambda o: o[1]) if o[0] == label]
        assert mine == sorted(mine)
    final = SyncManifest.from_json((root / ".runicorn" / "full_manifest.json").read_bytes())
    assert final.revision == max(content_of_revision) == len(published)


_READER = r"""
import os, select, sys
import orjson
from runicorn.manifest import SyncManifest
json_path, gz_path = sys.argv[1], sys.argv[2]
reads, errors, revisions, announced = 0, [], set(), False
while not select.select([sys.stdin], [], [], 0)[0]:
    for path, parse in ((json_path, SyncManifest.from_json), (gz_path, SyncManifest.from_gzip)):
        try:
            with open(path, "rb") as handle:
                revisions.add(parse(handle.read()).revision)
        except Exception as error:
            errors.append(f"{path}: {type(error).__name__}: {error}")
    reads += 1
    if not announced:
        print("READY", flush=True)
        announced = True
print(orjson.dumps({"reads": reads, "errors": errors[:5], "revisions": sorted(revisions)})
      .decode(), flush=True)
"""


def test_a_reader_never_sees_a_partial_manifest(tmp_path, make_generator):
    root = tmp_path / "lab"
    _many_runs(root, 60)
    generator = make_generator(root)
    _, path = generator.generate()
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(path) + ".gz"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "READY"
        published = {1}
        for step in range(30):
            _append(root / "proj1/exp/runs/20240101_000000_000001/events.jsonl", f"{step}\n")
            manifest, _ = generator.generate()
            published.add(manifest.revision)
        reader.stdin.close()
        result = orjson.loads(reader.stdout.readline())
    finally:
        with reader:  # leaving it waits and closes the pipes
            reader.kill()
    assert result["errors"] == []
    assert result["reads"] > 0
    assert set(result["revisions"]) <= published
    assert published == set(range(1, 32))


_KILLED_GENERATOR = r"""
import dataclasses, os, sys
from pathlib import Path
from runicorn.core.backend import load_backend
from runicorn.manifest import ManifestGenerator
root, backend_name, moment = sys.argv[1], sys.argv[2], sys.argv[3]
backend = load_backend(backend_name)

def pause():
    print("PAUSED", flush=True)
    sys.stdin.read()  # wait to be killed

def hash_tails(*args):
    if moment == "scan":
        pause()
    return backend.hash_tails(*args)

real_replace = os.replace
def replace(src, dst, **dir_fds):
    if os.path.basename(dst) == moment:
        pause()
    return real_replace(src, dst, **dir_fds)
os.replace = replace
generator = ManifestGenerator(
    Path(root), backend=dataclasses.replace(backend, hash_tails=hash_tails), hostname="lab-01"
)
generator.generate()
print("DONE", flush=True)
"""


@pytest.mark.parametrize(
    ("moment", "json_revision", "gz_revision"),
    [
        ("scan", 1, 1),
        ("full_manifest.json", 1, 1),
        ("full_manifest.json.gz", 2, 1),
        (".full_manifest.json.state", 2, 2),
    ],
)
def test_a_generation_killed_mid_write_leaves_a_valid_manifest(
    tmp_path, backend, make_generator, moment, json_revision, gz_revision
):
    root = tmp_path / "lab"
    _many_runs(root, 80)
    out = root / ".runicorn"
    _, path = make_generator(root).generate()
    before = {p: p.read_bytes() for p in (path, out / "full_manifest.json.gz")}
    _append(root / "proj1/exp/runs/20240101_000000_000001/events.jsonl", "{}\n")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_GENERATOR, str(root), backend.name, moment],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "PAUSED"
    finally:
        with child:  # leaving it waits and closes the pipes
            child.send_signal(signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    json_now = SyncManifest.from_json(path.read_bytes())
    gz_now = SyncManifest.from_gzip((out / "full_manifest.json.gz").read_bytes())
    assert (json_now.revision, gz_now.revision) == (json_revision, gz_revision)
    if json_revision == 1:
        assert path.read_bytes() == before[path]
    if moment != "scan":
        assert _leftover_temp_files(out) != []

    manifest, _ = make_generator(root).generate()
    assert _leftover_temp_files(out) == []
    assert manifest.revision > max(json_revision, gz_revision)
    assert SyncManifest.from_gzip((out / "full_manifest.json.gz").read_bytes()) == manifest


def test_an_unchanged_tree_returns_the_same_manifest_as_a_full_rebuild(lab, make_generator):
    make_generator(lab).generate()
    incremental, _ = make_generator(lab).generate()
    rebuilt, _ = make_generator(lab, incremental=False).generate()
    assert incremental == rebuilt


def test_an_unchanged_tree_leaves_even_the_generator_state_untouched(lab, make_generator):
    """The fast path: same scan as last time, files settled, published files intact."""
    _, path = make_generator(lab).generate()
    state = path.with_name(f".{path.name}.state")
    before = (state.read_bytes(), state.stat().st_ino)
    make_generator(lab).generate()
    assert (state.read_bytes(), state.stat().st_ino) == before


def test_an_unchanged_tree_answers_the_summary_without_decoding_the_runs(lab, make_generator):
    make_generator(lab).generate()
    generator = make_generator(lab)
    incremental, _ = generator.generate()
    rebuilt, _ = make_generator(lab, incremental=False).generate()
    assert isinstance(incremental, PublishedManifest)
    assert not incremental.is_decoded
    assert incremental.statistics == rebuilt.statistics
    assert (incremental.revision, incremental.snapshot_id) == (1, rebuilt.snapshot_id)
    assert generator.last_report.files_reused == sum(e.is_append_only for e in rebuilt.iter_files())
    assert not incremental.is_decoded
    assert incremental.experiments == rebuilt.experiments
    assert incremental.statistics == rebuilt.statistics


def test_an_older_state_without_the_append_only_count_still_reports_reuse(lab, make_generator):
    _, path = make_generator(lab).generate()
    state = path.with_name(f".{path.name}.state")
    header = orjson.loads(state.read_bytes())
    del header["append_only_files"]
    state.write_bytes(orjson.dumps(header))
    generator = make_generator(lab)
    manifest, _ = generator.generate()
    assert not generator.last_report.published
    assert generator.last_report.files_reused == 6  # events.jsonl and logs.txt of 3 runs
    assert manifest.total_files == sum(len(exp.files) for exp in manifest.experiments)


def test_a_published_manifest_equals_its_full_decoding_both_ways(lab, make_generator):
    make_generator(lab).generate()
    incremental, path = make_generator(lab).generate()
    decoded = SyncManifest.from_json(path.read_bytes())
    assert decoded == incremental
    assert incremental == decoded
    assert incremental != dataclasses.replace(decoded, revision=decoded.revision + 1)


def test_a_published_manifest_finds_its_runs_behind_a_root_that_looks_like_json(
    tmp_path, make_generator
):
    """Quotes in a header value are escaped, so the header still ends at the real key."""
    root = tmp_path / 'lab,"experiments":[],"x'
    _run(root)
    make_generator(root).generate()
    incremental, path = make_generator(root).generate()
    assert isinstance(incremental, PublishedManifest)
    assert incremental.remote_root == str(root)
    assert incremental == SyncManifest.from_json(path.read_bytes())
    assert [exp.run_id for exp in incremental.experiments] == ["20240101_000000_000001"]


def test_assigning_runs_to_a_published_manifest_replaces_them(lab, make_generator):
    make_generator(lab).generate()
    incremental, _ = make_generator(lab).generate()
    incremental.experiments = incremental.experiments[:1]
    assert incremental.total_experiments == 1
    assert incremental.is_decoded


def test_bytes_of_another_writer_are_not_taken_for_a_published_manifest():
    with pytest.raises(ValueError, match="not a manifest written by this generator"):
        PublishedManifest(b'{"experiments": [], "revision": 1}')


def test_an_edited_published_manifest_is_republished_with_a_new_revision(lab, make_generator):
    first, path = make_generator(lab).generate()
    edited = path.read_bytes().replace(b'"status":"finished"', b'"status":"hacked"', 1)
    assert b"hacked" in edited
    path.write_bytes(edited)
    generator = make_generator(lab)
    second, _ = generator.generate()
    assert generator.last_report.published
    assert second.revision == first.revision + 1
    assert b"hacked" not in path.read_bytes()


def test_a_deleted_gzip_copy_is_republished(lab, make_generator):
    first, path = make_generator(lab).generate()
    path.with_name(path.name + ".gz").unlink()
    generator = make_generator(lab)
    second, _ = generator.generate()
    assert generator.last_report.published
    assert path.with_name(path.name + ".gz").exists()
    assert second.revision == first.revision + 1


# --- revisions another generator published ---------------------------------------------------


def test_revision_goes_above_an_indented_manifest_of_another_generator(lab, make_generator):
    """A 0.5.x generator indents its JSON: its revision is still found, never undercut."""
    from harness.v05_generator import publish_v05

    for _ in range(6):
        publish_v05(lab)
    manifest, _ = make_generator(lab).generate()
    assert manifest.revision == 7


def test_a_v05_revision_counter_is_counted_and_raised(lab, make_generator):
    """Ours, 0.5.x, ours, ... on one root: one rising sequence of revisions (0.5.x reads only
    its own counter, which ours keeps at the last revision it published)."""
    from harness.v05_generator import STATE_FILENAME, publish_v05

    state = lab / ".runicorn" / STATE_FILENAME
    revisions = []
    for turn in range(6):
        if turn % 2:
            revisions.append(publish_v05(lab)["revision"])
        else:
            run = lab / "proj" / "exp" / "runs" / f"2024010{turn}_000000_00000{turn}"
            _write(run / "meta.json", "{}", NOW - HOUR)
            revisions.append(make_generator(lab).generate()[0].revision)
            assert orjson.loads(state.read_bytes())["last_revision"] == revisions[-1]
    assert revisions == [1, 2, 3, 4, 5, 6]
    assert "last_generated" in orjson.loads(state.read_bytes())  # its other keys stay


def test_a_damaged_v05_counter_is_ignored_and_left_alone(lab, make_generator):
    (lab / ".runicorn").mkdir()
    (lab / ".runicorn" / ".manifest_state.json").write_text("{not json")
    manifest, _ = make_generator(lab).generate()
    assert manifest.revision == 1
    assert (lab / ".runicorn" / ".manifest_state.json").read_text() == "{not json"


def test_a_higher_v05_counter_lifts_our_revision(lab, make_generator):
    (lab / ".runicorn").mkdir()
    (lab / ".runicorn" / ".manifest_state.json").write_text('{"last_revision": 41}')
    manifest, _ = make_generator(lab).generate()
    assert manifest.revision == 42


def test_our_own_raise_of_the_v05_counter_does_not_tie_full_and_active(lab, make_generator):
    generator = make_generator(lab)
    kinds = ("active", "full", "active", "active", "full")
    revisions = [generator.generate(kind)[0].revision for kind in kinds]
    # the second active manifest names the full one published meanwhile (changes_since):
    # new content, so one revision up; nothing else moves
    assert revisions == [1, 1, 2, 2, 1]
    state = orjson.loads((lab / ".runicorn" / ".manifest_state.json").read_bytes())
    assert state == {"last_revision": 2, "raised_by": "runicorn"}

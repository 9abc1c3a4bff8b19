"""The sample lab is the fixture every other suite builds on: it must be reproducible to
the byte and the nanosecond, follow the run layout, and report exactly what a training
step changed, or tests built on it would check the wrong thing."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from runicorn.demo.sample_lab import (
    DEFAULT_ACTIVE_WINDOW,
    LabInfo,
    build_sample_lab,
    training_step,
)
from runicorn.format import layout

NOW = 1_700_000_000.0
RUN_ID = re.compile(r"^\d{8}_\d{6}_[0-9a-f]{6}$")
Snapshot = dict[str, tuple[str, int, str, int]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under root (root itself excluded): kind, size, content hash, mtime_ns."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            out[p.relative_to(root).as_posix()] = ("d", 0, "", p.stat().st_mtime_ns)
        for f in filenames:
            p = Path(dirpath, f)
            data = p.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            out[p.relative_to(root).as_posix()] = ("f", len(data), digest, p.stat().st_mtime_ns)
    return out


def lines_parse(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabInfo:
    return build_sample_lab(tmp_path_factory.mktemp("lab"), 200, seed=7, scale=0.02, now=NOW)


# ------------------------------------------------------------------------------ build


def test_same_seed_and_clock_give_identical_trees(tmp_path: Path) -> None:
    a = build_sample_lab(tmp_path / "a", 30, seed=3, scale=0.05, now=NOW)
    b = build_sample_lab(tmp_path / "b", 30, seed=3, scale=0.05, now=NOW)
    snap_a, snap_b = snapshot(a.root), snapshot(b.root)
    assert snap_a == snap_b
    assert len(snap_a) > 300
    assert (a.total_files, a.total_bytes) == (b.total_files, b.total_bytes)
    c = build_sample_lab(tmp_path / "c", 30, seed=4, scale=0.05, now=NOW)
    assert set(snapshot(c.root)) != set(snap_a)


def test_info_matches_disk(lab: LabInfo) -> None:
    snap = snapshot(lab.root)
    files = {k: v for k, v in snap.items() if v[0] == "f"}
    assert len(files) == lab.total_files
    assert sum(v[1] for v in files.values()) == lab.total_bytes
    listed = {}
    for run in lab.runs:
        for rel, size in run.files.items():
            listed[f"{run.rel}/{rel}"] = size
    listed[layout.EXPERIMENTS_METADATA_FILENAME] = files[layout.EXPERIMENTS_METADATA_FILENAME][1]
    assert listed == {k: v[1] for k, v in files.items()}


def test_layout(lab: LabInfo) -> None:
    assert lab.runs
    for run in lab.runs:
        parts = run.rel.split("/")
        assert len(parts) == 4 and parts[2] == layout.RUNS_DIRNAME
        assert RUN_ID.match(run.run_id) and parts[3] == run.run_id
        assert run.path == lab.root / run.rel and run.path.is_dir()
        synced = run.synced_files
        assert 7 <= len(synced) <= 11
        for required in ("meta.json", "status.json", "summary.json", "events.jsonl", "logs.txt"):
            assert required in synced

        meta = orjson.loads((run.path / "meta.json").read_bytes())
        keys = {"id", "project", "name", "created_at", "python", "platform", "hostname", "pid"}
        assert keys <= set(meta)
        assert (meta["id"], meta["project"], meta["name"]) == (run.run_id, run.project, run.name)
        status = orjson.loads((run.path / "status.json").read_bytes())
        assert status["status"] == run.status and status["status"] in layout.RUN_STATUSES
        assert (status["ended_at"] is None) == (run.status == "running")
        orjson.loads((run.path / "summary.json").read_bytes())

        events = lines_parse((run.path / "events.jsonl").read_bytes())
        assert events and all({"step", "time", "loss", "acc"} <= set(e) for e in events)
        assert [e["step"] for e in events] == list(range(1, len(events) + 1))
        logs = (run.path / "logs.txt").read_bytes()
        assert logs.endswith(b"\n") and len(logs) > 0

        media = [p for p in synced if p.startswith("media/")]
        assert 2 <= len(media) <= 4
        for m in media:
            head = (run.path / m).read_bytes()[:8]
            assert head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))
        if run.status == "running":
            assert "events.jsonl.lock" in run.files and "logs.txt.lock" in run.files
        assert (run.path / layout.DELETED_MARKER).exists() == run.deleted


def test_mix_of_statuses_tags_and_deleted_runs(lab: LabInfo) -> None:
    statuses = [r.status for r in lab.runs]
    assert 0.08 <= statuses.count("running") / len(statuses) <= 0.25
    assert {"finished", "failed", "interrupted"} <= set(statuses)
    deleted = [r for r in lab.runs if r.deleted]
    assert 1 <= len(deleted) <= 0.1 * len(lab.runs)
    assert all(r.status != "running" for r in deleted)
    assert len({(r.project, r.name) for r in lab.runs}) >= 6
    tags = orjson.loads((lab.root / layout.EXPERIMENTS_METADATA_FILENAME).read_bytes())
    assert tags == {k: {"tags": v} for k, v in lab.tags.items()}
    run_ids = {r.run_id for r in lab.runs}
    assert tags and set(tags) <= run_ids
    assert all(isinstance(v["tags"], list) and v["tags"] for v in tags.values())


def test_mtimes_make_active_selection_predictable(lab: LabInfo) -> None:
    recent, old = NOW - 300, NOW - 2 * 3600
    for run in lab.listed_runs:
        newest = max((run.path / p).stat().st_mtime_ns for p in run.synced_files) / 1e9
        assert newest == pytest.approx(run.updated_at, abs=1e-5)
        if run.status == "running":
            assert recent <= newest <= NOW
        else:
            assert newest <= old
    assert lab.active_runs(DEFAULT_ACTIVE_WINDOW) == lab.running_runs
    assert len(lab.active_runs(60 * 86400)) == len(lab.listed_runs)


def test_scale_shrinks_sizes_but_not_structure(tmp_path: Path) -> None:
    big = build_sample_lab(tmp_path / "big", 12, seed=1, scale=1.0, now=NOW)
    tiny = build_sample_lab(tmp_path / "tiny", 12, seed=1, scale=0.01, now=NOW)
    assert [(r.rel, r.status, sorted(r.files)) for r in big.runs] == [
        (r.rel, r.status, sorted(r.files)) for r in tiny.runs
    ]
    for b, t in zip(big.runs, tiny.runs, strict=True):
        assert 18_000 <= b.files["events.jsonl"] <= 440_000
        assert 4_500 <= b.files["logs.txt"] <= 110_000
        for name in ("events.jsonl", "logs.txt"):
            assert 0 < t.files[name] < b.files[name] * 0.05
            assert (t.path / name).read_bytes().endswith(b"\n")
    assert tiny.total_bytes < big.total_bytes / 20


def test_lab_size_is_in_the_advertised_range(tmp_path: Path) -> None:
    lab = build_sample_lab(tmp_path / "lab", 20, seed=0, scale=1.0, now=NOW)
    per_run = lab.total_bytes / len(lab.runs)
    assert 60_000 < per_run < 400_000
    assert 8 <= lab.total_files / len(lab.runs) <= 12


def test_refuses_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_sample_lab(tmp_path, 1, now=NOW)


def test_zero_runs_and_library_stays_silent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = build_sample_lab(tmp_path / "empty", 0, now=NOW)
    assert lab.runs == [] and lab.total_files == 1
    training_step(lab.root, seed=0, now=NOW + 60)
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------ step


def _step_lab(path: Path) -> LabInfo:
    return build_sample_lab(path, 40, seed=11, scale=0.02, now=NOW)


def test_training_step_reports_exactly_what_changed(tmp_path: Path) -> None:
    lab = _step_lab(tmp_path / "lab")
    before = snapshot(lab.root)
    was_running = {r.rel for r in lab.running_runs}
    assert len(was_running) >= 3
    step_now = NOW + 300
    step = training_step(lab.root, seed=5, now=step_now)
    after = snapshot(lab.root)

    assert step.appended and step.rewritten and step.finished and step.added
    assert len(step.removed) + len(step.soft_deleted) == 1
    assert not step.partial and not step.completed
    assert {p.rsplit("/", 1)[0] for p in step.appended} == was_running
    assert set(step.finished) <= was_running
    assert len(step.finished) == (len(was_running) + 1) // 3

    changed_synced: set[str] = set()
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        run_rel = "/".join(path.split("/")[:4])
        in_run = path[len(run_rel) + 1 :]
        if new is None:
            assert run_rel in step.removed, path
            continue
        if path.startswith(tuple(f"{r}/" for r in step.added)):
            # a new run's entries were written over its first minute or so
            assert round((step_now - 90) * 1e9) <= new[3] <= round(step_now * 1e9), path
        else:
            assert new[3] == round(step_now * 1e9), path  # every mtime is deterministic
        if new[0] == "d":
            continue
        if in_run.endswith(layout.LOCK_SUFFIX):
            assert path in step.touched_locks or run_rel in step.added
            continue
        if in_run == layout.DELETED_MARKER:
            assert old is None and run_rel in step.soft_deleted
            continue
        changed_synced.add(path)
        if old is None:
            assert run_rel in step.added and step.added_files[path] == new[1]
        elif path in step.appended:
            data = (lab.root / path).read_bytes()
            assert new[1] - old[1] == step.appended[path]
            assert hashlib.sha256(data[: old[1]]).hexdigest() == old[2]  # a true append
            appended = data[old[1] :]
            assert appended.endswith(b"\n")  # complete lines only
            if path.endswith("events.jsonl"):
                lines_parse(appended)
        else:
            assert path in step.rewritten
    assert changed_synced == step.changed_files()

    for rel in step.finished:
        status = orjson.loads((lab.root / rel / "status.json").read_bytes())
        assert status["status"] in {"finished", "failed", "interrupted"}
        assert status["ended_at"] == step_now
    for rel in step.added:
        assert RUN_ID.match(rel.rsplit("/", 1)[1])
        status = orjson.loads((lab.root / rel / "status.json").read_bytes())
        assert status["status"] == "running"
    for rel in step.soft_deleted:
        assert rel not in was_running and (lab.root / rel / layout.DELETED_MARKER).exists()
    for rel in step.removed:
        assert rel not in was_running and not (lab.root / rel).exists()


def test_training_step_is_deterministic(tmp_path: Path) -> None:
    labs = [_step_lab(tmp_path / n) for n in ("a", "b")]
    infos = []
    for lab in labs:
        first = training_step(lab.root, seed=2, now=NOW + 100, partial_line=True)
        second = training_step(lab.root, seed=3, now=NOW + 200)
        infos.append((first, second))
    assert infos[0] == infos[1]
    assert snapshot(labs[0].root) == snapshot(labs[1].root)


def test_partial_line_is_left_then_completed(tmp_path: Path) -> None:
    lab = _step_lab(tmp_path / "lab")
    step = training_step(lab.root, seed=8, now=NOW + 60, partial_line=True)
    assert len(step.partial) == 1
    ((path, frag_len),) = step.partial.items()
    data = (lab.root / path).read_bytes()
    assert not data.endswith(b"\n")
    cut = data.rfind(b"\n") + 1
    assert len(data) - cut == frag_len > 20
    lines_parse(data[:cut])
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data[cut:])
    assert path in step.appended

    nxt = training_step(lab.root, seed=9, now=NOW + 120)
    data2 = (lab.root / path).read_bytes()
    assert nxt.completed == [path] and path in nxt.appended
    assert data2.startswith(data)
    events = lines_parse(data2)
    assert [e["step"] for e in events] == list(range(1, len(events) + 1))
    times = [e["time"] for e in events]
    assert times == sorted(times)


def test_partial_line_in_a_new_run_when_nothing_runs(tmp_path: Path) -> None:
    lab = build_sample_lab(tmp_path / "lab", 0, now=NOW)
    step = training_step(lab.root, seed=1, now=NOW + 60, partial_line=True, new_runs=1)
    ((path, frag_len),) = step.partial.items()
    assert path.startswith(step.added[0] + "/") and path not in step.appended
    size = (lab.root / path).stat().st_size
    assert step.added_files[path] == size
    assert not (lab.root / path).read_bytes()[size - frag_len :].endswith(b"\n")


def test_steps_keep_every_events_file_valid(tmp_path: Path) -> None:
    lab = _step_lab(tmp_path / "lab")
    for i in range(4):
        training_step(lab.root, seed=i, now=NOW + 60 * (i + 1), partial_line=(i % 2 == 0))
    training_step(lab.root, seed=99, now=NOW + 600)
    for events in lab.root.glob("*/*/runs/*/events.jsonl"):
        parsed = lines_parse(events.read_bytes())
        assert [e["step"] for e in parsed] == list(range(1, len(parsed) + 1))


def test_script_entry_point(tmp_path: Path) -> None:
    args = ["--runs", "5", "--scale", "0.01", "--seed", "2", "--now", str(NOW)]
    out = subprocess.run(
        [sys.executable, "-m", "runicorn.demo.sample_lab", str(tmp_path / "lab"), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "runs:          5" in out.stdout
    assert len(list((tmp_path / "lab").glob("*/*/runs/*"))) == 5


# ------------------------------------------------------------------------------ runs-path


@pytest.fixture(scope="module")
def runs_path_lab(tmp_path_factory: pytest.TempPathFactory) -> LabInfo:
    return build_sample_lab(
        tmp_path_factory.mktemp("lab"), 200, seed=7, scale=0.02, now=NOW, layout="runs-path"
    )


def test_runs_path_lab_holds_the_same_runs_as_the_default_one(
    lab: LabInfo, runs_path_lab: LabInfo
) -> None:
    def described(info: LabInfo) -> list[tuple]:
        return [
            (r.run_id, r.status, r.created_at, r.updated_at, r.deleted, sorted(r.files))
            for r in info.runs
        ]

    assert described(runs_path_lab) == described(lab)
    for default, sdk06 in zip(lab.runs, runs_path_lab.runs, strict=True):
        assert (sdk06.project, sdk06.name) == ("runs", f"{default.project}/{default.name}")
        if sdk06.deleted:  # moved to the viewer's recycle bin
            assert sdk06.rel == f"runs/.recycle/{sdk06.run_id}"
        else:
            assert sdk06.rel == f"runs/{default.project}/{default.name}/{default.run_id}"
        assert sdk06.path == runs_path_lab.root / sdk06.rel and sdk06.path.is_dir()
        meta = orjson.loads((sdk06.path / "meta.json").read_bytes())
        assert meta["path"] == sdk06.name and "project" not in meta and "name" not in meta


def test_runs_path_lab_info_matches_disk_index_files_included(runs_path_lab: LabInfo) -> None:
    files = {k: v for k, v in snapshot(runs_path_lab.root).items() if v[0] == "f"}
    assert len(files) == runs_path_lab.total_files
    assert sum(v[1] for v in files.values()) == runs_path_lab.total_bytes
    assert {"runicorn.db", "runicorn.db-wal", "runicorn.db-shm"} <= set(files)


def test_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        build_sample_lab(tmp_path, 1, layout="flat")


def test_training_step_on_a_runs_path_lab(tmp_path: Path) -> None:
    lab = build_sample_lab(tmp_path / "lab", 40, seed=2, scale=0.02, now=NOW, layout="runs-path")
    running = {r.rel for r in lab.running_runs}
    step = training_step(lab.root, seed=5, now=NOW + 300)
    assert running and {p.rsplit("/", 1)[0] for p in step.appended} == running
    for rel in step.added:
        assert rel.startswith("runs/") and (lab.root / rel / "status.json").is_file()
    for rel in step.soft_deleted:
        run_id = rel.rsplit("/", 1)[1]
        assert not (lab.root / rel).exists()
        assert (lab.root / "runs" / ".recycle" / run_id / layout.DELETED_MARKER).is_file()

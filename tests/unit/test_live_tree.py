"""Generations from the publisher's live tree publish what a generation from scratch would.

A generator with :meth:`ManifestGenerator.keep_tree` rescans only the directories reported
to its tree. Each step below changes the tree, reports what a real inotify source saw (or,
in ``walk`` mode, asks for a full walk as polling does), generates both manifests from the
tree, and compares them with a fresh ``incremental=False`` generation of the same tree at
the same clock: same experiments, byte for byte. On both backends.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from runicorn.format.models import ManifestType, SyncManifest
from runicorn.generate.changes import InotifySource, Waker
from runicorn.generate.generator import GenerationReport, ManifestGenerator
from runicorn.generate.inotify import IN_Q_OVERFLOW, encode_event
from runicorn.generate.journal import JOURNAL_FILENAME

NOW = 2_000_000_000.0
KINDS = (ManifestType.FULL, ManifestType.ACTIVE)


def _write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


def _append(path: Path, data: str) -> None:
    with open(path, "a") as handle:
        handle.write(data)


def _make_run(run: Path, status: str = "running") -> Path:
    _write(run / "meta.json", f'{{"id":"{run.name}","created_at":1700000000}}')
    _write(run / "status.json", f'{{"status":"{status}"}}')
    _write(run / "events.jsonl", '{"step":0}\n')
    _write(run / "logs.txt", "started\n")
    _write(run / "media" / "a.png", "png")
    return run


class Live:
    """A generator keeping its tree, fed by an inotify source on the same root."""

    def __init__(self, root: Path, out: Path, backend, mode: str) -> None:
        self.root = root
        self.mode = mode
        self.backend = backend
        self.generator = ManifestGenerator(
            root, out, backend=backend, clock=lambda: NOW, hostname="lab"
        )
        self.tree = self.generator.keep_tree()
        if mode == "walk":
            self.tree.scope_walk_runs = 0  # walks after the first go scope by scope
        self.waker = Waker()
        self.source = InotifySource(root, self.waker)
        self.source.start()
        self.out = out
        self.fresh_count = 0

    def close(self) -> None:
        self.source.close()
        self.waker.close()

    def report_changes(self) -> None:
        """What the source saw since the last call, as the publisher reports it."""
        self.waker.wake()
        changes = self.source.wait(0)
        if self.mode == "walk" or changes.rescan:
            self.tree.rescan()
        else:
            self.tree.changed(changes.directories)

    def generate(self, kind: ManifestType) -> SyncManifest:
        manifest, _ = self.generator.generate(kind)
        return manifest

    def check(self, tmp_path: Path) -> GenerationReport:
        """Both manifests from the tree equal both from scratch, and are what is published;
        returns the report of the first generation (the one that rescanned)."""
        self.report_changes()
        reports = []
        for kind in KINDS:
            live = self.generate(kind)
            assert self.generator.last_report is not None
            reports.append(self.generator.last_report)
            self.fresh_count += 1
            fresh_out = tmp_path / f"fresh{self.fresh_count}"
            fresh_out.mkdir()
            # the same change journal: an active manifest also lists the runs it says
            # changed since the full manifests it names (changes_since)
            shutil.copy(self.out / JOURNAL_FILENAME, fresh_out / JOURNAL_FILENAME)
            fresh_generator = ManifestGenerator(
                self.root,
                fresh_out,
                incremental=False,
                backend=self.backend,
                clock=lambda: NOW,
                hostname="lab",
            )
            fresh, _ = fresh_generator.generate(kind)
            published = (self.out / kind.filename).read_bytes()
            assert orjson.loads(published)["experiments"] == [
                e.to_dict() for e in fresh.experiments
            ], kind
            assert live.experiments == fresh.experiments, kind
            assert self.generator.last_report is not None
            assert fresh_generator.last_report is not None
            assert self.generator.last_report.problems == fresh_generator.last_report.problems
        return reports[0]


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    root = tmp_path / "lab"
    _make_run(root / "proj" / "exp" / "runs" / "run_a")
    _make_run(root / "proj" / "exp" / "runs" / "run_b", status="finished")
    _make_run(root / "proj" / "other" / "runs" / "run_c")
    _make_run(root / "runs" / "team" / "vision" / "run_p")
    _make_run(root / "runs" / "solo")
    deleted = _make_run(root / "proj" / "exp" / "runs" / "run_gone")
    _write(deleted / ".deleted", "")
    _write(root / ".experiments_metadata.json", '{"run_a": {"tags": ["x"]}}')
    return root


@pytest.fixture(params=["inotify", "walk"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def live(lab: Path, tmp_path: Path, backend, mode: str) -> Iterator[Live]:
    running = Live(lab, tmp_path / "out", backend, mode)
    running.check(tmp_path)
    yield running
    running.close()


Step = Callable[[Path], None]


def _rename(source: str, target: str) -> Step:
    return lambda root: os.rename(root / source, root / target)


STEPS: dict[str, Step] = {
    "append": lambda root: _append(root / "proj/exp/runs/run_a/events.jsonl", '{"step":1}\n'),
    "partial line": lambda root: _append(root / "proj/exp/runs/run_a/events.jsonl", '{"st'),
    "nested file": lambda root: _write(root / "proj/exp/runs/run_a/media/d/b.png", "png"),
    "status": lambda root: _write(
        root / "proj/exp/runs/run_a/status.json", '{"status":"finished"}'
    ),
    "new run": lambda root: _make_run(root / "proj" / "exp" / "runs" / "run_new"),
    "new project": lambda root: _make_run(root / "fresh" / "deep" / "runs" / "run_d"),
    "new runs-path run": lambda root: _make_run(root / "runs" / "team" / "nlp" / "run_q"),
    "removed run": lambda root: shutil.rmtree(root / "proj/exp/runs/run_b"),
    "removed project": lambda root: shutil.rmtree(root / "proj"),
    "renamed run": _rename("proj/exp/runs/run_a", "proj/exp/runs/run_z"),
    "renamed experiment": _rename("proj/exp", "proj/exp2"),
    "renamed project": _rename("proj", "proj2"),
    "renamed runs-path run": _rename("runs/team/vision/run_p", "runs/team/vision/run_r"),
    "soft-deleted": lambda root: _write(root / "proj/exp/runs/run_b/.deleted", ""),
    "undeleted": lambda root: os.unlink(root / "proj/exp/runs/run_gone/.deleted"),
    "path becomes a run": lambda root: _write(root / "runs/team/meta.json", "{}"),
    "run stops being one": lambda root: (
        shutil.rmtree(root / "runs/solo") or _write(root / "runs/solo/notes/x.txt", "x")
    ),
    "symlink in a run": lambda root: os.symlink("/etc", root / "proj/exp/runs/run_a/link"),
    "symlinked run": lambda root: os.symlink(
        root / "proj/exp/runs/run_a", root / "proj/exp/runs/run_l"
    ),
    "symlinked project": lambda root: os.symlink(root / "proj", root / "plink"),
    "file for a run dir": lambda root: _write(root / "proj/exp/runs/not_a_dir", "x"),
    "case twin of a run": lambda root: _make_run(root / "proj/exp/runs/RUN_A"),
    "case twin of a file": lambda root: _write(root / "proj/exp/runs/run_a/Logs.txt", "x\n"),
    "refused project name": lambda root: _make_run(root / "bad\\proj/exp/runs/run_x"),
    "refused file name": lambda root: _write(root / "proj/exp/runs/run_a/a\x01.txt", "x"),
    "refused runs-path name": lambda root: _make_run(root / "runs/b\\d/run_y"),
    "tags": lambda root: _write(root / ".experiments_metadata.json", '{"run_b": ["y"]}'),
}


@pytest.mark.parametrize("mode", ["inotify"])  # walks are what the sequence test adds
@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_change_publishes_what_a_fresh_generation_publishes(live, tmp_path, step):
    STEPS[step](live.root)
    live.check(tmp_path)
    if (live.root / "proj/exp/runs/run_a").is_dir():
        STEPS["append"](live.root)  # and the tree goes on from there
        live.check(tmp_path)


def test_a_sequence_of_changes_stays_identical(live, tmp_path):
    for step in (
        "append",
        "case twin of a run",
        "new run",
        "renamed run",
        "status",
        "new runs-path run",
        "path becomes a run",
        "soft-deleted",
        "tags",
        "new project",
        "removed project",
    ):
        STEPS[step](live.root)
        live.check(tmp_path)


def test_an_append_rescans_only_its_run(lab, tmp_path, backend):
    hour_ago = os.stat(lab / "proj/exp/runs/run_a/logs.txt").st_mtime - 3600
    os.utime(lab / "proj/exp/runs/run_a/logs.txt", (hour_ago, hour_ago))  # settled
    live = Live(lab, tmp_path / "out", backend, "inotify")
    try:
        live.check(tmp_path)
        STEPS["append"](lab)
        live.report_changes()
        live.generate(ManifestType.ACTIVE)
        report = live.generator.last_report
        assert report is not None and report.runs_rescanned == 1
        assert report.files_hashed == 1  # the appended log; the run's other log is reused
    finally:
        live.close()


def test_a_replaced_root_is_walked_again(lab, tmp_path, backend):
    live = Live(lab, tmp_path / "out", backend, "inotify")
    try:
        live.check(tmp_path)
        os.rename(lab, tmp_path / "old_lab")
        _make_run(lab / "new" / "exp" / "runs" / "run_n")
        live.source._root_checked = float("-inf")  # the identity check is due now
        assert live.check(tmp_path).runs_rescanned == 1
    finally:
        live.close()


def test_an_overflow_walks_the_tree_and_finds_what_no_event_reported(lab, tmp_path, backend):
    outside = tmp_path / "outside.jsonl"
    os.link(lab / "proj/exp/runs/run_a/events.jsonl", outside)
    live = Live(lab, tmp_path / "out", backend, "inotify")
    try:
        live.check(tmp_path)
        _append(outside, '{"step":42}\n')  # through a hard link: no event in the tree
        live.source.inject(encode_event(-1, IN_Q_OVERFLOW))
        assert live.check(tmp_path).runs_rescanned == 6
    finally:
        live.close()


def test_a_run_hidden_by_its_case_twin_returns_when_the_twin_goes(live, tmp_path):
    STEPS["case twin of a run"](live.root)  # RUN_A sorts first: run_a is dropped
    live.check(tmp_path)
    STEPS["append"](live.root)
    live.check(tmp_path)
    shutil.rmtree(live.root / "proj/exp/runs/RUN_A")
    live.check(tmp_path)


def test_the_memos_the_tree_writes_spare_a_one_shot_generation_all_hashing(lab, tmp_path, backend):
    """The tree writes its memo file joined from what it keeps packed: a generator without a
    tree, on the same output, reads it and hashes nothing of a settled lab."""
    hour_ago = time.time() - 3600
    for path in lab.rglob("*"):
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    live = Live(lab, tmp_path / "out", backend, "inotify")
    try:
        live.check(tmp_path)
    finally:
        live.close()
    for kind in KINDS:
        one_shot = ManifestGenerator(
            lab, tmp_path / "out", backend=backend, clock=lambda: NOW, hostname="lab"
        )
        one_shot.generate(kind)
        report = one_shot.last_report
        assert report is not None and not report.warnings
        assert (report.files_hashed, report.files_reused) == (0, 10), kind
        assert not report.published  # the same content: the tree's revision stands

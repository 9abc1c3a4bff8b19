"""The live view of ``runicorn sync --watch`` (``runicorn.cli.live_view``) and what it reads
(``runicorn.sync.run_status``): a scripted sequence of passes rendered by rich into a
string, the plain and JSON Lines reporters, and names from a server that must not style or
forge output."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click
import orjson
import pytest
from rich.console import Console

from runicorn.cli.live_view import (
    PLAIN_RUNS_PER_PASS,
    JsonLines,
    LiveTable,
    LiveView,
    PlainLines,
)
from runicorn.sync.run_status import RunChange, RunStatus, read_run_status
from runicorn.sync.stats import SyncStats

WALL = 1_700_000_000.0


def _stats(**changes: object) -> SyncStats:
    stats: dict[str, object] = {
        "files_synced": 2,
        "bytes_downloaded": 2_000,
        "incremental_count": 1,
        "full_count": 1,
        "failed_count": 0,
        "duration": 0.01,
        "manifest_revision": 7,
        "skipped": False,
        "reason": "applied active manifest revision 7: 2 file(s) synced, 0 failed",
        "manifest_type": "active",
        "deleted_count": 0,
        "files_total": 2,
        "bytes_total": 2_000,
        "failed_files": {},
    }
    stats.update(changes)
    return stats  # type: ignore[return-value]


def _change(
    project: str, name: str, run_id: str, change: str = "changed", **counts: object
) -> RunChange:
    prefix = f"runs/{name}/{run_id}/" if project == "runs" else f"{project}/{name}/runs/{run_id}/"
    return RunChange(project, name, run_id, prefix, "running", change, **counts)  # type: ignore[arg-type]


def _write_events(cache: Path, change: RunChange, lines: list[bytes]) -> None:
    run_dir = cache / change.prefix
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _render(view: LiveView, *, height: int = 30, color: bool = False, width: int = 140) -> str:
    console = Console(
        file=io.StringIO(),
        width=width,
        height=height,
        force_terminal=True,
        color_system="truecolor" if color else None,
    )
    console.print(view)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _view(cache: Path, clock: _Clock, **options: object) -> LiveView:
    return LiveView(cache, "lab:/data", clock=clock, wall_clock=lambda: WALL, **options)  # type: ignore[arg-type]


# --- reading events.jsonl ---------------------------------------------------------------------


def test_the_newest_step_and_metrics_come_from_the_upstream_sdk_lines(tmp_path: Path):
    change = _change("vision", "resnet", "r1")
    _write_events(
        tmp_path,
        change,
        [
            b'{"ts": 1.0, "type": "metrics", "data": {"loss": 2.0, "val_acc": 0.5, '
            b'"global_step": 1, "time": 1.0}}',
            b'{"ts": 2.0, "type": "image", "data": {"key": "x", "path": "media/x.png", '
            b'"step": 99}}',
            b'{"ts": 3.0, "type": "metrics", "data": {"loss": 1.5, "global_step": 2, '
            b'"time": 3.0, "stage": "train"}}',
        ],
    )
    status = read_run_status(tmp_path / change.prefix)
    assert status.step == 2
    # the newest value of each metric, val_acc from the older line
    assert status.metrics == {"loss": 1.5, "val_acc": 0.5}


def test_flat_lines_work_and_what_does_not_parse_is_passed_over(tmp_path: Path):
    change = _change("runs", "cv/yolo", "r2")
    _write_events(
        tmp_path,
        change,
        [b'{"step": 4, "time": 9.0, "loss": 0.25, "split": "train", "ok": true}', b"{not json"],
    )
    assert read_run_status(tmp_path / change.prefix) == RunStatus(step=4, metrics={"loss": 0.25})


def test_only_a_bounded_tail_is_read_and_its_cut_first_line_is_skipped(tmp_path: Path):
    change = _change("vision", "resnet", "r1")
    lines = [b'{"step": %d, "loss": %d.5, "pad": "%s"}' % (i, i, b"x" * 200) for i in range(500)]
    _write_events(tmp_path, change, lines)
    status = read_run_status(tmp_path / change.prefix, tail_bytes=1_000)
    assert status == RunStatus(step=499, metrics={"loss": 499.5})
    # a window that cuts every line in two finds nothing rather than half a line
    assert read_run_status(tmp_path / change.prefix, tail_bytes=100) == RunStatus()


def test_a_run_without_events_or_with_a_linked_one_has_no_status(tmp_path: Path):
    assert read_run_status(tmp_path / "nowhere") == RunStatus()
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_bytes(b'{"step": 1, "loss": 1.0}\n')
    (tmp_path / "run").mkdir()
    os.symlink(elsewhere, tmp_path / "run" / "events.jsonl")
    assert read_run_status(tmp_path / "run") == RunStatus()


# --- the live table ---------------------------------------------------------------------------


def test_the_table_shows_the_changed_runs_newest_first_with_step_and_metrics(tmp_path: Path):
    clock = _Clock()
    view = _view(tmp_path, clock)
    first = _change("vision", "resnet", "r1", files=2, bytes=2_000, events=True)
    second = _change("runs", "cv/yolo", "r2", "added", files=5, bytes=500, events=True)
    _write_events(tmp_path, first, [b'{"step": 10, "loss": 0.5}'])
    _write_events(tmp_path, second, [b'{"step": 3, "acc": 0.25}'])
    view.record_pass(_stats(), [first])
    clock.now += 2
    view.record_pass(_stats(bytes_downloaded=500), [second])
    clock.now += 1
    lines = _render(view).splitlines()
    assert lines[0].startswith("watching lab:/data · 2 passes · 250 B/s")
    assert lines[1].startswith("last change ") and "active revision 7" in lines[1]
    assert lines[2].split() == ["run", "status", "step", "metrics", "B/s", "updated"]
    assert " ".join(lines[3].split()) == "runs/cv/yolo/r2 running 3 acc=0.25 50 B/s 1s ago"
    assert " ".join(lines[4].split()) == "vision/resnet/r1 running 10 loss=0.5 200 B/s 3s ago"


def test_a_runs_step_moves_when_its_events_land_again(tmp_path: Path):
    clock = _Clock()
    view = _view(tmp_path, clock)
    change = _change("vision", "resnet", "r1", files=1, bytes=30, events=True)
    _write_events(tmp_path, change, [b'{"step": 10, "loss": 0.5}'])
    view.record_pass(_stats(), [change])
    assert "loss=0.5" in _render(view)
    _write_events(tmp_path, change, [b'{"step": 10, "loss": 0.5}', b'{"step": 11, "loss": 0.4}'])
    clock.now += 2
    view.record_pass(_stats(), [change])
    row = next(line for line in _render(view).splitlines() if "vision/resnet/r1" in line)
    assert row.split()[2:4] == ["11", "loss=0.4"]


def test_bytes_per_second_fall_to_zero_once_the_window_has_passed(tmp_path: Path):
    clock = _Clock()
    view = _view(tmp_path, clock)
    view.record_pass(_stats(), [_change("vision", "resnet", "r1", files=1, bytes=5_000)])
    assert "500 B/s" in _render(view)
    clock.now += 11
    rendered = _render(view)
    assert "500 B/s" not in rendered and "0 B/s" in rendered and "11s ago" in rendered


def test_statuses_are_read_only_for_the_rows_shown_and_only_after_their_events_moved(
    tmp_path: Path,
):
    clock = _Clock()
    reads: list[Path] = []

    def read(run_dir: Path) -> RunStatus:
        reads.append(run_dir)
        return RunStatus(step=1)

    view = _view(tmp_path, clock, read_status=read)
    changes = [
        _change("p", "n", f"r{i:05d}", "added", files=1, bytes=1, events=True)
        for i in range(10_000)
    ]
    view.record_pass(_stats(), changes)
    rendered = _render(view, height=20)
    shown = [line for line in rendered.splitlines() if line.startswith("p/n/r")]
    assert 3 <= len(shown) < 20 and len(reads) == len(shown)
    assert f"… {10_000 - len(shown)} more runs" in rendered
    _render(view, height=20)
    assert len(reads) == len(shown)  # nothing new landed: nothing read again


def test_removed_runs_and_errors_are_shown(tmp_path: Path):
    clock = _Clock()
    view = _view(tmp_path, clock)
    view.record_pass(
        _stats(failed_count=1, failed_files={"vision/x/runs/r9/a.png": "vanished on the server"}),
        [_change("vision", "resnet", "r1", "removed")],
    )
    view.record_error("sync failed: connection lost; retrying in 1 s")
    rendered = _render(view)
    assert re.search(r"vision/resnet/r1\s+removed", rendered)
    assert "error: vision/x/runs/r9/a.png: vanished on the server" in rendered
    assert "error: sync failed: connection lost; retrying in 1 s" in rendered


HOSTILE_NAME = "cv/[bold red]forged\x1b[2J\x1b]0;title\x07\rover"


def test_hostile_names_are_escaped_in_the_table(tmp_path: Path):
    clock = _Clock()
    view = _view(tmp_path, clock, read_status=lambda _dir: RunStatus(1, {"[blink]m\x1b[5m": 1.0}))
    view.record_pass(_stats(), [_change("runs", HOSTILE_NAME, "r1", "added", events=True)])
    rendered = _render(view, color=True)
    for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\r", "\x1b[5m"):
        assert raw not in rendered
    plain = _render(view, width=200)
    assert "runs/cv/[bold red]forged\\x1b[2J\\x1b]0;title\\x07\\rover/r1" in plain
    assert "[blink]m\\x1b[5m=1" in plain
    # markup was not applied: no bold or blink escape anywhere in the coloured rendering
    assert "\x1b[1;31m" not in rendered and "\x1b[5m" not in rendered


# --- plain lines and JSON Lines ---------------------------------------------------------------


def _capture(call: Callable[[], None], capsys: pytest.CaptureFixture[str]) -> str:
    call()
    return capsys.readouterr().out


def test_plain_lines_name_each_changed_run_with_its_step_and_no_escape_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    change = _change("runs", HOSTILE_NAME, "r1", files=1, bytes=40, events=True)
    _write_events(tmp_path, change, [b'{"step": 12, "loss": 0.125}'])
    out = _capture(lambda: PlainLines(tmp_path).record_pass(_stats(), [change]), capsys)
    first, second = out.splitlines()
    assert first.endswith("active revision 7: 2 files, 2.00 KB")
    assert second == (
        "  runs/cv/[bold red]forged\\x1b[2J\\x1b]0;title\\x07\\rover/r1 running step 12 "
        "loss=0.125: 1 files, 40 B"
    )
    assert "\x1b" not in out and "\r" not in out


def test_plain_lines_are_capped_per_pass_and_skipped_passes_print_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    changes = [_change("p", "n", f"r{i}", "added") for i in range(PLAIN_RUNS_PER_PASS + 5)]
    reporter = PlainLines(tmp_path)
    out = _capture(lambda: reporter.record_pass(_stats(), changes), capsys)
    assert len(out.splitlines()) == 1 + PLAIN_RUNS_PER_PASS + 1
    assert out.splitlines()[-1] == "  … and 5 more runs"
    assert _capture(lambda: reporter.record_pass(_stats(skipped=True), changes), capsys) == ""


def test_json_lines_carry_the_stats_time_and_each_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    changed = _change("vision", "resnet", "r1", files=1, bytes=40, events=True)
    _write_events(tmp_path, changed, [b'{"step": 12, "loss": 0.125}'])
    removed = _change("runs", "cv", "r2", "removed")
    reporter = JsonLines(tmp_path)
    out = _capture(lambda: reporter.record_pass(_stats(), [changed, removed]), capsys)
    (line,) = out.splitlines()
    document = orjson.loads(line)
    assert set(_stats()) <= set(document) and isinstance(document["time"], float)
    assert document["runs"] == [
        {
            "key": "vision/resnet/r1",
            "project": "vision",
            "name": "resnet",
            "run_id": "r1",
            "change": "changed",
            "status": "running",
            "files": 1,
            "bytes": 40,
            "failed": 0,
            "step": 12,
            "metrics": {"loss": 0.125},
        },
        {
            "key": "runs/cv/r2",
            "project": "runs",
            "name": "cv",
            "run_id": "r2",
            "change": "removed",
            "status": "running",
            "files": 0,
            "bytes": 0,
            "failed": 0,
            "step": None,
            "metrics": {},
        },
    ]
    assert _capture(lambda: reporter.record_pass(_stats(skipped=True), []), capsys) == ""


# --- where stderr goes while the table is drawn ----------------------------------------------


class _TerminalStderr(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr_is_a_terminal", [True, False])
def test_stderr_lines_go_above_the_table_only_when_stderr_is_on_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stderr_is_a_terminal: bool
):
    stderr = _TerminalStderr() if stderr_is_a_terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    console = Console(file=io.StringIO(), width=140, height=30, force_terminal=True)
    with LiveTable(tmp_path, "lab:/data", console) as table:
        table.record_pass(_stats(), [_change("vision", "resnet", "r1", files=1, bytes=10)])
        click.echo("reconnected to lab", err=True)
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert "vision/resnet/r1" in drawn
    if stderr_is_a_terminal:
        assert "reconnected to lab" in drawn and stderr.getvalue() == ""
    else:
        assert "reconnected to lab" not in drawn and stderr.getvalue() == "reconnected to lab\n"


def test_a_pass_in_progress_is_shown_until_it_ends(tmp_path: Path):
    table = LiveTable(tmp_path, "lab:/data", Console(file=io.StringIO()))
    view, progress = table.view, table.on_progress
    assert getattr(progress, "wants_bytes", False)  # the transfer then reports bytes too
    progress(3, 10, "vision/resnet/runs/r1/events.jsonl", 1_000, 5_000)
    header = _render(view).splitlines()[0]
    assert header.endswith("· pass in progress: 3/10 files, 1.00 KB/5.00 KB")
    view.record_pass(_stats(), [_change("vision", "resnet", "r1", files=10, bytes=5_000)])
    assert "in progress" not in _render(view)

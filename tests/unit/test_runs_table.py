"""``runicorn runs``: the rows read from a synced cache, their JSON, the rich table, the
selection and order options, and names that must reach the terminal inert."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from harness.lab import Lab, make_lab
from runicorn.cli import main
from runicorn.cli.runs import render_table, sparkline
from runicorn.core.backend import Backend
from runicorn.format.layout import LAYOUT_RUNS_PATH
from runicorn.sync.cache import LocalCacheManager, RunRecord
from runicorn.sync.run_table import read_run_rows, read_tail, sort_rows
from runicorn.sync.service import MetadataSyncService
from runicorn.transport.local_remote import LocalRemote

pytestmark = pytest.mark.lab(runs=12)


def _sync(lab: Lab, cache_dir: Path) -> None:
    cache = LocalCacheManager(cache_dir)
    remote = LocalRemote(str(lab.root))
    try:
        service = MetadataSyncService(
            None, None, str(lab.root), cache, manifest_sync_jitter=0.0, remote=remote
        )
        assert service.sync_all()
    finally:
        remote.close()
        cache.close()


def _json_rows(cache_dir: Path, *args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(main, ["runs", str(cache_dir), "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_every_cached_run_is_listed_with_what_its_files_say(lab: Lab, cache: Path) -> None:
    _sync(lab, cache)
    rows = {row["key"]: row for row in _json_rows(cache)}
    expected = {f"{r.project}/{r.name}/{r.run_id}": r for r in lab.info.listed_runs}
    assert set(rows) == set(expected)
    for key, run in expected.items():
        row = rows[key]
        assert row["status"] == run.status
        assert row["started"] == pytest.approx(run.created_at, abs=1e-3)
        assert row["size"] == sum(run.synced_files.values())
        lines = (Path(str(row["dir"])) / "events.jsonl").read_bytes().splitlines()
        newest = json.loads(lines[-1])
        assert row["step"] == newest["step"]
        assert row["metrics"]["loss"] == newest["loss"]
        assert set(row["metrics"]) == {"loss", "acc", "lr", "grad_norm"}
        assert row["loss_name"] == "loss"
        recent = row["loss_recent"]
        assert isinstance(recent, list) and recent[-1] == newest["loss"]
        assert recent == [json.loads(line)["loss"] for line in lines[-len(recent) :]]
        assert row["heartbeat"] >= newest["time"]


def test_the_table_shows_each_run_with_a_loss_sparkline(lab: Lab, cache: Path) -> None:
    _sync(lab, cache)
    rows = sort_rows(read_run_rows(cache), "started")
    out = io.StringIO()
    render_table(rows, Console(file=out, width=220, color_system=None), now=lab.now)
    text = out.getvalue()
    for row in rows:
        assert row.key in text
        assert sparkline(row.loss) in text
    assert f"{len(rows)} runs" in text
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["run", "status", "started", "heartbeat", "step"]
    started = [text.index(row.key) for row in rows]
    assert started == sorted(started)  # oldest first, the newest next to the prompt


def test_selection_status_and_order_options(lab: Lab, cache: Path) -> None:
    _sync(lab, cache)
    listed = lab.info.listed_runs
    project = listed[0].project
    keys = [row["key"] for row in _json_rows(cache, "--project", project)]
    assert keys and all(str(key).startswith(project + "/") for key in keys)
    assert len(keys) == sum(r.project == project for r in listed)
    assert [row["key"] for row in _json_rows(cache, f"{project}/*/*")] == keys
    running = _json_rows(cache, "--status", "running")
    assert {row["key"] for row in running} == {
        f"{r.project}/{r.name}/{r.run_id}" for r in listed if r.status == "running"
    }
    by_size = [row["size"] for row in _json_rows(cache, "--sort", "size", "--reverse")]
    assert by_size == sorted(by_size, reverse=True)


def test_runs_path_runs_are_keyed_by_their_path(tmp_path: Path, backend: Backend) -> None:
    lab = make_lab(tmp_path, backend, runs=4, run_layout=LAYOUT_RUNS_PATH)
    _sync(lab, tmp_path / "cache")
    rows = _json_rows(tmp_path / "cache")
    assert {row["key"] for row in rows} == {
        f"runs/{r.name}/{r.run_id}" for r in lab.info.listed_runs
    }
    assert all(row["path"] == row["name"] and row["step"] for row in rows)


def test_names_reach_the_terminal_inert(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    hostile = "x\x1b[2J[bold red]boom[/bold red]\u202e"
    cache.save_runs("file:///lab", [RunRecord("p", hostile, "r1", "finished", 1.0, 2.0, None, 3.0)])
    cache.close()
    out = io.StringIO()
    render_table(
        read_run_rows(tmp_path / "cache"), Console(file=out, width=200, force_terminal=True)
    )
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\u202e" not in text
    assert "\\x1b[2J[bold red]boom[/bold red]\\u202e" in text  # escaped, markup shown as text


def test_a_directory_without_a_cache_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["runs", str(tmp_path)])
    assert result.exit_code == 1
    assert "holds no runicorn cache" in result.output
    assert not (tmp_path / ".runicorn-cache").exists() and not any(tmp_path.iterdir())


def test_the_tail_read_is_bounded_and_skips_a_cut_line(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [json.dumps({"step": i, "time": 100.0 + i, "loss": 1.0 / (i + 1)}) for i in range(500)]
    events.write_text("\n".join(lines) + "\n")
    tail = read_tail(events, tail_bytes=1000)
    assert tail.step == 499 and tail.last_event_at == 599.0
    assert 0 < len(tail.loss) < 30 and tail.loss[-1] == 1.0 / 500
    sdk = tmp_path / "sdk.jsonl"
    sdk.write_text(
        '{"ts": 5.0, "type": "metrics", "data": {"global_step": 7, "train/loss": 0.25}}\n'
        '{"ts": 6.0, "type": "image", "data": {"path": "a.png"}}\n'
    )
    tail = read_tail(sdk)
    assert (tail.step, tail.loss_name, tail.loss, tail.last_event_at) == (
        7,
        "train/loss",
        (0.25,),
        5.0,
    )
    assert read_tail(tmp_path / "missing.jsonl").step is None


def test_sparkline_scales_buckets_between_min_and_max() -> None:
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0, 0.0]) == "█▆▃▁"
    assert len(sparkline([float(i) for i in range(100)], 12)) == 12
    assert sparkline([1.0, 1.0]) == "▄▄"

"""What ``runicorn sync --watch`` prints: a live table on a terminal, plain lines elsewhere,
JSON Lines with ``--json``.

Each pass of the watch hands its stats and the runs it changed
(:attr:`ManifestSyncClient.last_run_changes`) to a reporter:

* :class:`LiveTable` (stdout is a terminal): a rich table of the runs changing now -- run,
  status, last step, the newest metric values, bytes per second, when -- with the latest
  errors below it, redrawn in place;
* :class:`PlainLines` (stdout is a file or pipe): one line per pass that changed the cache,
  then one indented line per changed run (at most :data:`PLAIN_RUNS_PER_PASS`);
* :class:`JsonLines` (``--json``): one JSON object per pass that changed the cache -- the
  stats of a single sync, ``time``, and ``runs``, one object per changed run.

Steps and metrics come from the cached ``events.jsonl`` tails
(:func:`runicorn.sync.run_status.read_run_status`), read only for the runs about to be
shown. Every name from the server goes through :func:`printable` and is drawn as rich
``Text``, never as markup.
"""

from __future__ import annotations

import abc
import heapq
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click
import orjson
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runicorn.cli._common import error, human_bytes, printable
from runicorn.sync.run_status import RunChange, RunStatus, read_run_status

if TYPE_CHECKING:
    from runicorn.sync.stats import ProgressCallback, SyncStats

__all__ = ["JsonLines", "LiveTable", "LiveView", "PlainLines", "Reporter", "reporter_for"]

RATE_WINDOW_SECONDS = 10.0
"""Bytes per second are the bytes of the last this many seconds, divided by them."""
PLAIN_RUNS_PER_PASS = 20
"""Run lines printed per pass off a terminal (a cold first pass changes every run)."""
SHOWN_ERRORS = 5

_STATUS_STYLES = {
    "running": "green",
    "finished": "blue",
    "failed": "red",
    "interrupted": "yellow",
    "removed": "dim",
}

StatusReader = Callable[[Path], RunStatus]


def metrics_text(metrics: dict[str, float]) -> str:
    """``loss=0.1234 acc=0.91``: names escaped, values to four significant digits."""
    return " ".join(f"{printable(name)}={value:.4g}" for name, value in metrics.items())


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    return f"{seconds // 3600:.0f}h ago"


def _pass_line(stats: SyncStats, when: float) -> str:
    line = (
        f"{time.strftime('%H:%M:%S', time.localtime(when))} "
        f"{stats['manifest_type'] or 'manifest'} revision "
        f"{stats['manifest_revision']}: {stats['files_synced']} files, "
        f"{human_bytes(stats['bytes_downloaded'])}"
    )
    if stats["deleted_count"]:
        line += f", {stats['deleted_count']} runs deleted"
    if stats["failed_count"]:
        line += f", {stats['failed_count']} failed (retried next pass)"
    return line


@dataclass
class _Row:
    change: RunChange
    updated: float
    updated_wall: float
    moved: deque[tuple[float, int]] = field(default_factory=deque)
    status: RunStatus | None = None
    stale: bool = True
    """The cached events.jsonl moved since ``status`` was read."""


class LiveView:
    """The renderable of the live table: the runs changed so far, newest first, as many as
    the terminal has room for, with the latest errors. Feed it :meth:`record_pass` and
    :meth:`record_error` (any thread); rich renders it on its own thread."""

    def __init__(
        self,
        cache_dir: Path,
        source: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        read_status: StatusReader = read_run_status,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.source = printable(source)
        self._clock = clock
        self._wall = wall_clock
        self._read_status = read_status
        self._rows: dict[str, _Row] = {}
        self._errors: deque[tuple[float, str]] = deque(maxlen=SHOWN_ERRORS)
        self._moved: deque[tuple[float, int]] = deque()
        self._passes = 0
        self._last_pass = ""
        self._in_progress: tuple[int, int, int | None, int | None] | None = None
        self._lock = threading.Lock()

    def record_pass(self, stats: SyncStats, changes: Sequence[RunChange]) -> None:
        now, wall = self._clock(), self._wall()
        with self._lock:
            self._passes += 1
            self._in_progress = None
            if stats["skipped"]:
                return
            self._last_pass = _pass_line(stats, wall)
            for change in changes:
                row = self._rows.get(change.key)
                if row is None:
                    row = self._rows[change.key] = _Row(change, now, wall)
                row.change, row.updated, row.updated_wall = change, now, wall
                if change.bytes:
                    row.moved.append((now, change.bytes))
                row.stale = row.stale or change.events
            if stats["bytes_downloaded"]:
                self._moved.append((now, stats["bytes_downloaded"]))
            failed = sorted(stats["failed_files"].items())
            for path, reason in failed[:3]:
                self._errors.append((wall, f"{printable(path)}: {printable(reason)}"))
            if len(failed) > 3:
                self._errors.append((wall, f"… and {len(failed) - 3} more files failed"))

    def record_progress(
        self, done: int, total: int, moved: int | None = None, planned: int | None = None
    ) -> None:
        """Files (and bytes, when known) of the pass in progress: shown until it ends."""
        with self._lock:
            self._in_progress = (done, total, moved, planned)

    def record_error(self, message: str) -> None:
        with self._lock:
            self._errors.append((self._wall(), printable(message)))

    def _rate(self, moved: deque[tuple[float, int]], now: float) -> float:
        while moved and moved[0][0] < now - RATE_WINDOW_SECONDS:
            moved.popleft()
        return sum(size for _when, size in moved) / RATE_WINDOW_SECONDS

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        with self._lock:
            now = self._clock()
            room = max(3, height - 7 - len(self._errors))
            shown = heapq.nlargest(room, self._rows.values(), key=lambda row: row.updated)
            for row in shown:
                if row.stale and row.change.change != "removed":
                    row.status = self._read_status(self.cache_dir / row.change.prefix)
                    row.stale = False
            passes = f"{self._passes} pass" + ("" if self._passes == 1 else "es")
            header = Text(no_wrap=True, overflow="ellipsis")
            header.append(f"watching {self.source}", style="bold")
            header.append(f" · {passes} · {human_bytes(self._rate(self._moved, now))}/s")
            if self._in_progress is not None:
                done, total, moved, planned = self._in_progress
                header.append(f" · pass in progress: {done}/{total} files")
                if moved is not None:
                    header.append(f", {human_bytes(moved)}")
                    if planned:
                        header.append(f"/{human_bytes(planned)}")
            last = Text(f"last change {self._last_pass or '-'}", style="dim")
            last.no_wrap, last.overflow = True, "ellipsis"
            table = Table(expand=True, box=None, pad_edge=False, header_style="bold")
            table.add_column("run", ratio=3, no_wrap=True, overflow="ellipsis")
            table.add_column("status", no_wrap=True)
            table.add_column("step", justify="right", no_wrap=True)
            table.add_column("metrics", ratio=4, no_wrap=True, overflow="ellipsis")
            table.add_column("B/s", justify="right", no_wrap=True)
            table.add_column("updated", justify="right", no_wrap=True)
            for row in shown:
                change = row.change
                status = "removed" if change.change == "removed" else change.status
                step = row.status.step if row.status is not None else None
                metrics = row.status.metrics if row.status is not None else {}
                table.add_row(
                    Text(printable(change.key)),
                    Text(printable(status), style=_STATUS_STYLES.get(status, "")),
                    Text("" if step is None else str(step)),
                    Text(metrics_text(metrics)),
                    Text(f"{human_bytes(self._rate(row.moved, now))}/s"),
                    Text(_ago(now - row.updated)),
                )
            parts: list[Text | Table] = [header, last, table]
            if len(self._rows) > len(shown):
                parts.append(Text(f"… {len(self._rows) - len(shown)} more runs", style="dim"))
            if not self._rows:
                parts.append(Text("no run changed yet", style="dim"))
            for when, message in self._errors:
                stamp = time.strftime("%H:%M:%S", time.localtime(when))
                parts.append(Text(f"{stamp} error: {message}", style="red"))
        yield Group(*parts)


class Reporter(abc.ABC):
    """Receives each pass of a watch, and its errors; a context manager around the watch."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    @abc.abstractmethod
    def record_pass(self, stats: SyncStats, changes: Sequence[RunChange]) -> None:
        """One pass's stats (``skipped`` when nothing changed) and the runs it changed."""

    def record_error(self, exc: BaseException, retry_in: float) -> None:
        error(f"sync failed: {exc}; retrying in {retry_in:g} s")

    @property
    def on_progress(self) -> ProgressCallback | None:
        """The watch's ``on_progress``: ``None`` unless the reporter shows passes in
        progress."""
        return None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def _status(self, change: RunChange) -> RunStatus:
        if change.change == "removed":
            return RunStatus()
        return read_run_status(self.cache_dir / change.prefix)


class JsonLines(Reporter):
    """One JSON object per pass that changed the cache, on stdout."""

    def record_pass(self, stats: SyncStats, changes: Sequence[RunChange]) -> None:
        if stats["skipped"]:
            return
        document = {**stats, "time": time.time(), "runs": [self._run(c) for c in changes]}
        click.echo(orjson.dumps(document, default=str).decode())

    def _run(self, change: RunChange) -> dict[str, Any]:
        status = self._status(change)
        return {
            "key": change.key,
            "project": change.project,
            "name": change.name,
            "run_id": change.run_id,
            "change": change.change,
            "status": change.status,
            "files": change.files,
            "bytes": change.bytes,
            "failed": change.failed,
            "step": status.step,
            "metrics": status.metrics,
        }


class PlainLines(Reporter):
    """A line per pass that changed the cache, and one per changed run (capped)."""

    def record_pass(self, stats: SyncStats, changes: Sequence[RunChange]) -> None:
        if stats["skipped"]:
            return
        click.echo(_pass_line(stats, time.time()))
        for change in changes[:PLAIN_RUNS_PER_PASS]:
            click.echo(self._run_line(change))
        if len(changes) > PLAIN_RUNS_PER_PASS:
            click.echo(f"  … and {len(changes) - PLAIN_RUNS_PER_PASS} more runs")

    def _run_line(self, change: RunChange) -> str:
        line = f"  {printable(change.key)} "
        if change.change == "removed":
            return line + "removed"
        status = self._status(change)
        line += printable(change.status)
        if change.change == "added":
            line += " (new)"
        if status.step is not None:
            line += f" step {status.step}"
        if status.metrics:
            line += f" {metrics_text(status.metrics)}"
        line += f": {change.files} files, {human_bytes(change.bytes)}"
        if change.failed:
            line += f", {change.failed} failed"
        return line


class LiveTable(Reporter):
    """The :class:`LiveView` redrawn in place on ``console`` (a terminal); kept on screen
    when the watch ends. Lines written to stderr meanwhile are printed above it."""

    REFRESH_PER_SECOND = 4

    def __init__(self, cache_dir: Path, source: str, console: Console | None = None) -> None:
        super().__init__(cache_dir)
        self.console = console if console is not None else Console()
        self.view = LiveView(cache_dir, source)
        self._live = Live(
            self.view,
            console=self.console,
            refresh_per_second=self.REFRESH_PER_SECOND,
            redirect_stdout=True,
            # stderr shares the terminal: its lines go above the table. Redirected to a file,
            # it keeps going there.
            redirect_stderr=_is_terminal(sys.stderr),
        )

    def record_pass(self, stats: SyncStats, changes: Sequence[RunChange]) -> None:
        self.view.record_pass(stats, changes)

    def record_error(self, exc: BaseException, retry_in: float) -> None:
        self.view.record_error(f"sync failed: {exc}; retrying in {retry_in:g} s")

    @property
    def on_progress(self) -> ProgressCallback:
        view = self.view

        def progress(done: int, total: int, _current_file: str, *moved: int) -> None:
            view.record_progress(done, total, *moved[:2])

        progress.wants_bytes = True  # type: ignore[attr-defined]  # (bytes done, planned) too
        return progress

    def __enter__(self) -> LiveTable:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def reporter_for(cache_dir: Path, source: str, *, as_json: bool) -> Reporter:
    """JSON Lines with ``--json``; else the live table when stdout is a terminal, plain
    lines when it is not."""
    if as_json:
        return JsonLines(cache_dir)
    console = Console()
    if console.is_terminal:
        return LiveTable(cache_dir, source, console)
    return PlainLines(cache_dir)

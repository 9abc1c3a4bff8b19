"""The progress display of ``runicorn sync`` on a terminal: one rich row per sync.

:class:`SyncProgressDisplay` draws on stderr, and only when stderr is a terminal (cron,
systemd and pipes get nothing: no bar, no escape codes). One display can show several syncs
at once -- :meth:`SyncProgressDisplay.track` adds a row and returns the ``on_progress``
callback of :class:`~runicorn.sync.service.MetadataSyncService` that feeds it -- so a command
syncing several sources draws them together. The rows are erased when the display stops,
leaving the terminal to the summary lines on stdout. Log records written to stderr meanwhile
are printed above the rows (see ``_common.configure_logging``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.text import Text

from runicorn.cli._common import human_bytes, printable

if TYPE_CHECKING:
    from runicorn.sync.service import SyncProgress

__all__ = ["SyncProgressDisplay"]

_BAR_STEPS = 1000
"""The bar's scale: rich draws ``completed / total``; the fraction is computed here."""

_WAITING_PHASES = {"manifest": "reading manifest", "walking": "listing the server"}


class SyncProgressDisplay:
    """Live progress rows on ``console`` (default: stderr), drawn only on a terminal.

    Use as a context manager (or :meth:`start` / :meth:`stop`); :meth:`track` may be called
    before or after it starts. A row shows the phase, then a bar, files done of files to
    transfer, bytes moved, speed, an ETA (by bytes when the total is known, else by files)
    and the current file. Names from the server are shown with control characters escaped
    and never parsed as rich markup.
    """

    REFRESH_PER_SECOND = 10

    def __init__(self, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = self.console.is_terminal
        """``False`` off a terminal: the callbacks then do nothing."""
        self._progress = Progress(
            _Column(_label),
            BarColumn(bar_width=20),
            _Column(_files),
            _Column(_bytes),
            _Column(_speed),
            _Column(_eta),
            _Column(_current_file),
            console=self.console,
            transient=True,
            refresh_per_second=self.REFRESH_PER_SECOND,
            redirect_stdout=False,  # stdout is the summary's (and --json's): never redrawn
            redirect_stderr=True,
            disable=not self.enabled,
        )
        self._lock = threading.Lock()

    def track(self, label: str | None = None) -> Callable[[SyncProgress], None]:
        """A new row; feed it the returned callback. ``label`` names the sync (a source when
        several are shown); without one the row is named by the sync's mode (``manifest`` or
        ``legacy``)."""
        with self._lock:
            task = self._progress.add_task(
                "", total=None, label=None if label is None else printable(label), sync=None
            )

        def update(progress: SyncProgress) -> None:
            self._update(task, progress)

        return update

    def _update(self, task: TaskID, progress: SyncProgress) -> None:
        if not self.enabled:
            return
        moving = _transferring(progress)
        self._progress.update(
            task,
            total=_BAR_STEPS if moving else None,  # None: a pulsing bar while nothing moves
            completed=round(_BAR_STEPS * _fraction(progress)) if moving else 0,
            sync=progress,
        )

    def start(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        """Erase the rows (idempotent)."""
        self._progress.stop()

    def __enter__(self) -> SyncProgressDisplay:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _fraction(progress: SyncProgress) -> float:
    if progress.total_bytes:
        return min(progress.synced_bytes / progress.total_bytes, 1.0)
    if progress.total_files:
        return min(progress.synced_files / progress.total_files, 1.0)
    return 0.0


class _Column(ProgressColumn):
    """A column computed from a row's label and latest :class:`SyncProgress` (``None``
    before the first) and the seconds since the row was added."""

    def __init__(self, render: Callable[[str | None, SyncProgress | None, float], str]) -> None:
        super().__init__()
        self._render = render

    def render(self, task: Task) -> Text:
        # Text, never markup: what the server names is shown as it is (escaped).
        text = self._render(task.fields.get("label"), task.fields.get("sync"), task.elapsed or 0.0)
        return Text(text, no_wrap=True, overflow="ellipsis")


def _transferring(progress: SyncProgress | None) -> bool:
    return progress is not None and progress.phase not in (*_WAITING_PHASES, "idle")


def _label(label: str | None, progress: SyncProgress | None, _elapsed: float) -> str:
    name = label or (progress.mode if progress is not None else None) or "sync"
    if _transferring(progress):
        return f"{name}:"
    phase = _WAITING_PHASES.get(progress.phase if progress is not None else "", "starting")
    return f"{name}: {phase} …"


def _files(_label: str | None, progress: SyncProgress | None, _elapsed: float) -> str:
    if progress is None or not _transferring(progress):
        return ""
    return f"{progress.synced_files}/{progress.total_files} files"


def _bytes(_label: str | None, progress: SyncProgress | None, _elapsed: float) -> str:
    if progress is None or not _transferring(progress):
        return ""
    moved = human_bytes(progress.synced_bytes)
    return f"{moved}/{human_bytes(progress.total_bytes)}" if progress.total_bytes else moved


def _speed(_label: str | None, progress: SyncProgress | None, elapsed: float) -> str:
    if progress is None or not _transferring(progress):
        return ""
    return f"{human_bytes(progress.synced_bytes / elapsed if elapsed > 0 else 0.0)}/s"


def _eta(_label: str | None, progress: SyncProgress | None, elapsed: float) -> str:
    if progress is None or not _transferring(progress):
        return ""
    eta: float | None = None
    done, total = progress.synced_files, progress.total_files
    if progress.total_bytes:
        remaining = progress.total_bytes - progress.synced_bytes
        speed = progress.synced_bytes / elapsed if elapsed > 0 else 0.0
        if speed > 0 and remaining > 0:
            eta = remaining / speed
    elif done and total > done:
        eta = elapsed * (total - done) / done  # bytes to go unknown: go by files
    if eta is None:
        return ""
    return f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"


def _current_file(_label: str | None, progress: SyncProgress | None, _elapsed: float) -> str:
    if progress is None or not _transferring(progress) or not progress.current_file:
        return ""
    return printable(progress.current_file.rsplit("/", 1)[-1])

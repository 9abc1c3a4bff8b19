"""The rows of ``runicorn runs``: each cached run with where it stands, read cheaply.

A row joins what the cache's state records of a run (status, times, size: one query for
all runs) with what the end of its ``events.jsonl`` says (newest step, newest metric values,
the recent values of the loss). Only a bounded tail of each events file is read
(:data:`TAIL_BYTES` from its end, no link followed), so listing 10,000 runs reads a few tens
of megabytes at most, never the logs themselves.

The selection rules are the sync's (:class:`~runicorn.sync.selection.RunSelection`): a
``--project`` or a glob over ``project/name/run_id`` (``runs/<path…>/run_id`` in the
runs-path layout) picks the same runs here as in ``runicorn sync``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runicorn.format.layout import run_path_of
from runicorn.sync.cache.manager import LocalCacheManager
from runicorn.sync.run_status import (
    EVENTS_FILE,
    TAIL_BYTES,
    metric_number,
    newest_step_and_metrics,
    parse_event,
    read_tail_lines,
)
from runicorn.sync.selection import RunSelection, run_key

__all__ = [
    "LOSS_NAMES",
    "SORT_KEYS",
    "NotACacheError",
    "RunRow",
    "read_run_rows",
    "read_tail",
    "sort_rows",
]

LOSS_NAMES = ("loss", "train_loss", "train/loss", "val_loss", "val/loss")
"""The metric whose recent values a row keeps (the first of these an event carries): the
one curve a glance at a table of runs can judge."""


class NotACacheError(ValueError):
    """The directory holds no cache state: nothing was ever synced into it."""


@dataclass(frozen=True)
class Tail:
    """What the end of one ``events.jsonl`` says."""

    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Newest value of each metric, in the order of the newest event."""
    loss_name: str | None = None
    loss: tuple[float, ...] = ()
    """Values of ``loss_name`` in the tail, oldest first."""
    last_event_at: float | None = None


@dataclass(frozen=True)
class RunRow:
    """One cached run as ``runicorn runs`` lists it."""

    project: str
    name: str
    run_id: str
    status: str
    started: float
    """Creation time (meta.json ``created_at``, as the manifest lists it)."""
    heartbeat: float
    """The run's last sign of life: its newest file write on the server, or the time of its
    newest event when that is later."""
    step: int | None
    metrics: dict[str, float]
    loss_name: str | None
    loss: tuple[float, ...]
    size: int
    """Bytes of the run's synced files, as the cache's state records them."""
    last_synced: float | None
    path: Path

    @property
    def key(self) -> str:
        """``project/name/run_id``, or ``runs/<path…>/run_id`` (runs-path layout)."""
        return run_key(self.project, self.name, self.run_id)

    def to_json(self) -> dict[str, Any]:
        """The row as ``runs --json`` prints it (one object per line)."""
        return {
            "key": self.key,
            "project": self.project,
            "name": self.name,
            "path": run_path_of(self.project, self.name),
            "run_id": self.run_id,
            "status": self.status,
            "started": self.started,
            "heartbeat": self.heartbeat,
            "step": self.step,
            "metrics": self.metrics,
            "loss_name": self.loss_name,
            "loss_recent": list(self.loss),
            "size": self.size,
            "last_synced": self.last_synced,
            "dir": str(self.path),
        }


def read_tail(path: Path, tail_bytes: int = TAIL_BYTES) -> Tail:
    """The newest step, metrics and recent loss values in the events file ``path``; reads at
    most ``tail_bytes`` from its end, follows no symbolic link, and gives an empty
    :class:`Tail` for a missing or unreadable file.

    The cache holds complete lines only, so the last line is whole; the first line of a
    window that starts mid-file may be cut and is skipped. Both event shapes of
    :mod:`runicorn.sync.run_status` are read: the SDK's ``{"type": "metrics", "data": …}``
    and the flat ``{"step": …, "loss": …}``.
    """
    lines = read_tail_lines(path, tail_bytes)
    if lines is None:
        return Tail()
    events = [event for event in map(parse_event, lines) if event is not None]
    if not events:
        return Tail()
    last_event_at = next((when for when, _ in reversed(events) if when is not None), None)
    step, metrics = newest_step_and_metrics(values for _, values in reversed(events))
    loss_name = next((name for name in LOSS_NAMES if name in metrics), None)
    if loss_name is None:
        loss_name = next((name for name in metrics if "loss" in name.lower()), None)
    loss: tuple[float, ...] = ()
    if loss_name is not None:
        numbers = (metric_number(values.get(loss_name)) for _, values in events)
        loss = tuple(number for number in numbers if number is not None)
    return Tail(step, metrics, loss_name, loss, last_event_at)


def read_run_rows(
    cache_dir: Path,
    selection: RunSelection | None = None,
    statuses: Iterable[str] = (),
    tail_bytes: int = TAIL_BYTES,
) -> list[RunRow]:
    """The runs cached in ``cache_dir`` that ``selection`` and ``statuses`` keep (all when
    empty), in the state's order (``project, name, run_id``).

    Reads only: nothing is created or locked, so it may run while a sync writes (a run
    being written shows what its last committed files say). Raises
    :class:`NotACacheError` when ``cache_dir`` holds no cache state.
    """
    cache = LocalCacheManager(cache_dir)
    try:
        if not cache.state.exists():
            raise NotACacheError(
                f"{cache_dir} holds no runicorn cache (no {cache.db_path.name} in "
                f"{cache.state_dir}); run `runicorn sync` into it first, or name the cache "
                "directory a sync wrote"
            )
        wanted = frozenset(statuses)
        rows = []
        for run in cache.list_runs():
            if wanted and run.status not in wanted:
                continue
            if selection is not None and not selection.selects_key(
                run.project, run.name, run.run_id
            ):
                continue
            tail = read_tail(run.path / EVENTS_FILE, tail_bytes)
            heartbeat = run.updated_at
            if tail.last_event_at is not None and tail.last_event_at > heartbeat:
                heartbeat = tail.last_event_at
            rows.append(
                RunRow(
                    project=run.project,
                    name=run.name,
                    run_id=run.run_id,
                    status=run.status,
                    started=run.created_at,
                    heartbeat=heartbeat,
                    step=tail.step,
                    metrics=tail.metrics,
                    loss_name=tail.loss_name,
                    loss=tail.loss,
                    size=run.size,
                    last_synced=run.last_synced,
                    path=run.path,
                )
            )
        return rows
    finally:
        cache.close()


def _loss_of(row: RunRow) -> float | None:
    return row.loss[-1] if row.loss else None


SORT_KEYS: dict[str, Callable[[RunRow], Any]] = {
    "started": lambda row: row.started,
    "heartbeat": lambda row: row.heartbeat,
    "key": lambda row: row.key,
    "project": lambda row: (row.project, row.name, row.started),
    "status": lambda row: (row.status, row.started),
    "step": lambda row: row.step,
    "loss": _loss_of,
    "size": lambda row: row.size,
    "synced": lambda row: row.last_synced,
}
"""What ``--sort`` accepts, each ascending; a row without the value sorts last."""


def sort_rows(rows: Iterable[RunRow], by: str, *, descending: bool = False) -> list[RunRow]:
    """``rows`` ordered by the :data:`SORT_KEYS` entry ``by`` (ties: by key); rows missing
    the value (no step, no loss) come last either way."""
    try:
        value_of = SORT_KEYS[by]
    except KeyError:
        raise ValueError(f"cannot sort by {by!r}; choose one of {', '.join(SORT_KEYS)}") from None
    present: list[tuple[Any, RunRow]] = []
    missing: list[RunRow] = []
    for row in rows:
        value = value_of(row)
        (missing.append(row) if value is None else present.append((value, row)))
    present.sort(key=lambda pair: pair[1].key)
    present.sort(key=lambda pair: pair[0], reverse=descending)
    missing.sort(key=lambda row: row.key)
    return [row for _, row in present] + missing

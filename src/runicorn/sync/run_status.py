"""What a live view shows of the runs a sync changed: which runs, and where they stand.

:class:`RunChange` is one run a sync changed in the cache (the client lists them per call in
:attr:`ManifestSyncClient.last_run_changes`). :func:`read_run_status` reads the newest step
and metric values from the end of a cached run's ``events.jsonl``: a bounded tail, so a
view over a 10,000-run lab costs a few kilobytes per run it shows, never a whole file. The
cache holds complete lines only (tails end at the last complete line), so the last line read
is whole; the first line of the tail may be cut and is skipped.

Two ``events.jsonl`` line shapes are understood: the upstream SDK's
``{"ts": …, "type": "metrics", "data": {"global_step": 3, "loss": 0.5, …}}`` and the flat
``{"step": 3, "loss": 0.5, …}``. Other event types (images, …) and lines that do not parse
are passed over.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from runicorn._sys.fileio import BINARY, pread_upto
from runicorn.sync.selection import run_key

__all__ = [
    "EVENTS_FILE",
    "TAIL_BYTES",
    "RunChange",
    "RunStatus",
    "metric_number",
    "newest_step_and_metrics",
    "parse_event",
    "read_run_status",
]

EVENTS_FILE = "events.jsonl"

TAIL_BYTES = 8192
"""Bytes read from the end of ``events.jsonl``: the newest few dozen events."""

_NOT_METRICS = frozenset({"step", "global_step", "time", "ts", "timestamp", "stage", "epoch"})
"""Numeric fields of an event that say when it was, not what was measured."""

_TIME_FIELDS = ("ts", "time", "timestamp")
"""Where an event says when it was written (the first present one counts)."""


@dataclass(frozen=True)
class RunChange:
    """One run a sync changed in the cache."""

    project: str
    name: str
    """The run's path in the runs-path layout (``project`` is then ``runs``)."""
    run_id: str
    prefix: str
    """The run's directory relative to the cache root, with a trailing ``/``."""
    status: str
    """As the manifest lists it (``running``, ``finished``, …)."""
    change: Literal["added", "changed", "removed"]
    files: int = 0
    """Files of the run that landed in the cache."""
    bytes: int = 0
    """Bytes fetched for them (an appended log: its new tail)."""
    failed: int = 0
    """Files of the run that failed (retried next sync)."""
    events: bool = False
    """Whether its ``events.jsonl`` landed (its newest step and metrics may have moved)."""

    @property
    def key(self) -> str:
        """``project/name/run_id``, or ``runs/<path>/run_id`` in the runs-path layout (the
        key a run selection matches)."""
        return run_key(self.project, self.name, self.run_id)


@dataclass(frozen=True)
class RunStatus:
    """The newest step and metric values found at the end of a run's ``events.jsonl``."""

    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Newest value of each metric in the tail, in the order of the newest event."""


def read_tail_lines(path: Path, tail_bytes: int = TAIL_BYTES) -> list[bytes] | None:
    """The whole lines within the last ``tail_bytes`` of ``path`` (a window that starts
    mid-file drops its cut first line; the cache holds complete lines only, so the last one
    is whole); ``None`` when the file is missing, unreadable or a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | BINARY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - tail_bytes)
        data = pread_upto(fd, start, size - start)
    except OSError:
        return None
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    return lines[1:] if start > 0 else lines


def read_run_status(run_dir: Path, tail_bytes: int = TAIL_BYTES) -> RunStatus:
    """The newest step and metrics in ``run_dir/events.jsonl`` (empty when there is none,
    or it cannot be read); reads at most ``tail_bytes`` from its end and follows no
    symbolic link."""
    lines = read_tail_lines(run_dir / EVENTS_FILE, tail_bytes)
    if lines is None:
        return RunStatus()
    events = [event for event in map(parse_event, lines) if event is not None]
    step, metrics = newest_step_and_metrics(values for _, values in reversed(events))
    return RunStatus(step=step, metrics=metrics)


def parse_event(line: bytes) -> tuple[float | None, dict[str, Any]] | None:
    """``(when it was written, its measured fields)`` of one metrics event in either line
    shape; ``None`` for a blank or unparsable line or another event type."""
    if not line.strip():
        return None
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    when = next((metric_number(event.get(name)) for name in _TIME_FIELDS if name in event), None)
    kind = event.get("type")
    if kind is None:
        return when, event
    data = event.get("data")
    if kind != "metrics" or not isinstance(data, dict):
        return None
    return when, data


def newest_step_and_metrics(
    newest_first: Iterable[dict[str, Any]],
) -> tuple[int | None, dict[str, float]]:
    """The newest step, and each metric's newest value (in the order of the newest event),
    from events' measured fields given newest first."""
    step: int | None = None
    metrics: dict[str, float] = {}
    for values in newest_first:
        if step is None:
            step = _step_of(values)
        for name, value in values.items():
            if name not in metrics and name not in _NOT_METRICS:
                number = metric_number(value)
                if number is not None:
                    metrics[name] = number
    return step, metrics


def metric_number(value: object) -> float | None:
    """``value`` when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _step_of(values: dict[str, Any]) -> int | None:
    for name in ("global_step", "step"):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None

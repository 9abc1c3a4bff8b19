"""``runicorn runs CACHE``: the runs a cache holds, as a table or one JSON object per run."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click
import orjson
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from runicorn.cli._common import EXIT_FAILURE, EXIT_USAGE, error, human_bytes, printable
from runicorn.sync.run_table import SORT_KEYS, NotACacheError, RunRow, read_run_rows, sort_rows
from runicorn.sync.selection import RunSelection

__all__ = ["render_table", "runs", "sparkline"]

_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 12
"""Characters of a loss sparkline: the tail's values in this many buckets."""

MAX_METRICS = 3
"""Metrics shown beside the loss (the newest event's first ones); ``--json`` has them all."""

_STATUS_STYLES = {
    "running": "green",
    "finished": "blue",
    "failed": "red",
    "interrupted": "yellow",
}


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """``values`` (oldest first) as at most ``width`` unicode block characters, each the mean
    of one bucket, scaled between the smallest and largest bucket; ``""`` for no values."""
    if not values or width < 1:
        return ""
    buckets = min(width, len(values))
    means = []
    for index in range(buckets):
        lo = index * len(values) // buckets
        hi = (index + 1) * len(values) // buckets
        means.append(math.fsum(values[lo:hi]) / (hi - lo))
    low, high = min(means), max(means)
    if high - low <= abs(high) * 1e-12:
        return _BLOCKS[len(_BLOCKS) // 2 - 1] * buckets
    top = len(_BLOCKS) - 1
    return "".join(_BLOCKS[round((mean - low) / (high - low) * top)] for mean in means)


def _age(seconds: float) -> str:
    """A short duration: ``45s``, ``12m``, ``3h``, ``9d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp > 0 else "-"


def _value(number: float) -> str:
    return f"{number:.4g}"


_COLUMNS = (
    ("run", False),
    ("status", False),
    ("started", False),
    ("heartbeat", True),
    ("step", True),
    ("loss", True),
    ("", False),  # the loss sparkline
    ("metrics", False),
    ("size", True),
)
"""Header and right-justification of each column."""


def _cells(row: RunRow, now: float) -> list[str]:
    others = [
        f"{printable(name)}={_value(value)}"
        for name, value in row.metrics.items()
        if name != row.loss_name
    ][:MAX_METRICS]
    return [
        printable(row.key),
        printable(row.status),
        _when(row.started),
        f"{_age(now - row.heartbeat)} ago" if row.heartbeat > 0 else "-",
        "-" if row.step is None else str(row.step),
        _value(row.loss[-1]) if row.loss else "-",
        sparkline(row.loss),
        " ".join(others),
        human_bytes(row.size),
    ]


def render_table(rows: Sequence[RunRow], console: Console, *, now: float | None = None) -> None:
    """Print ``rows`` as an aligned table on ``console``, one line per run, never wrapped.

    Every name is shown as plain text (rich :class:`Text`, never markup) with control
    characters escaped: a run name can neither style the table nor move the cursor. The
    columns are laid out here rather than by :class:`rich.table.Table`, whose measuring
    pass takes seconds over 10,000 rows.
    """
    now = time.time() if now is None else now
    table = [_cells(row, now) for row in rows]
    widths = [cell_len(title) for title, _ in _COLUMNS]
    for cells in table:
        for index, cell in enumerate(cells):
            size = cell_len(cell)
            if size > widths[index]:
                widths[index] = size
    out = Text(no_wrap=True, overflow="ignore", end="")
    out.append(_line([title for title, _ in _COLUMNS], widths), style="bold")
    for row, cells in zip(rows, table, strict=True):
        out.append("\n")
        for index, cell in enumerate(cells):
            if index:
                out.append("  ")
            pad = " " * (widths[index] - cell_len(cell))
            style = _STATUS_STYLES.get(row.status, "") if index == 1 else ""
            style = "cyan" if index == 6 else style
            if _COLUMNS[index][1]:
                out.append(pad)
                out.append(cell, style=style)
            else:
                out.append(cell, style=style)
                if index < len(cells) - 1:
                    out.append(pad)
    total = sum(row.size for row in rows)
    out.append(
        f"\n{len(rows)} run{'' if len(rows) == 1 else 's'}, {human_bytes(total)}\n", style="dim"
    )
    console.print(out, crop=False, soft_wrap=True)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = []
    for index, cell in enumerate(cells):
        pad = " " * (widths[index] - cell_len(cell))
        parts.append(pad + cell if _COLUMNS[index][1] else cell + pad)
    return "  ".join(parts).rstrip()


@click.command("runs")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path, file_okay=False))
@click.argument("patterns", metavar="[GLOB]...", nargs=-1)
@click.option(
    "--project",
    "projects",
    multiple=True,
    help="Only this project's runs (repeatable); a runs-path run is in the project named by "
    "the first component of its path.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    help="Only runs with this status: running, finished, failed, interrupted (repeatable).",
)
@click.option(
    "--sort",
    "sort_by",
    type=click.Choice(list(SORT_KEYS)),
    default="started",
    show_default=True,
    help="Order of the rows (ascending: the newest run last, next to the prompt).",
)
@click.option("--reverse", "-r", is_flag=True, help="Reverse the order.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run.")
def runs(
    cache_dir: Path,
    patterns: tuple[str, ...],
    projects: tuple[str, ...],
    statuses: tuple[str, ...],
    sort_by: str,
    reverse: bool,
    as_json: bool,
) -> None:
    """List the runs synced into CACHE: status, start, last heartbeat, step, the newest
    metrics with a sparkline of the loss, size.

    GLOB selects runs by key, as `runicorn sync --include` does: project/name/run_id, or
    runs/<path...>/run_id for SDK 0.6 runs (`*` stays within one level, `**` crosses them;
    `vision` alone selects every run of project vision).

    Reads the cache only (no lock, nothing written): it may run while a sync writes.
    """
    try:
        selection = RunSelection.of(projects=projects, include=patterns)
    except ValueError as problem:
        error(str(problem))
        sys.exit(EXIT_USAGE)
    try:
        rows = read_run_rows(cache_dir, selection, statuses)
    except NotACacheError as problem:
        error(str(problem))
        sys.exit(EXIT_FAILURE)
    except OSError as problem:
        error(f"cannot read the cache {cache_dir}: {problem}")
        sys.exit(EXIT_FAILURE)
    rows = sort_rows(rows, sort_by, descending=reverse)
    if as_json:
        out = sys.stdout.buffer
        for row in rows:
            out.write(orjson.dumps(row.to_json()) + b"\n")
        return
    render_table(rows, Console(highlight=False))

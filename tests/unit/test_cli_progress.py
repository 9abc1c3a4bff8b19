"""The progress rows of ``runicorn sync`` (``runicorn.cli.progress``), rendered by rich into a
string: what a row shows, that names from a server cannot style or forge output, and that
nothing at all is written off a terminal."""

from __future__ import annotations

import io
import logging
import re

from rich.console import Console

from runicorn.cli._common import configure_logging
from runicorn.cli.progress import SyncProgressDisplay
from runicorn.sync.service import SyncProgress

# rich's own cursor and line control: what a live display may write, and nothing else.
_RICH_CONTROL = re.compile(r"\x1b\[(\?25[lh]|2K|1A)|\r")


def _console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=140, color_system=None), out


def _frames(out: io.StringIO) -> list[str]:
    """The lines drawn, rich's cursor movements taken out."""
    return [line for line in _RICH_CONTROL.sub("\n", out.getvalue()).splitlines() if line]


def _transferring(current_file: str = "vision/resnet/runs/r1/events.jsonl") -> SyncProgress:
    return SyncProgress(
        phase="transferring",
        mode="manifest",
        synced_files=122,
        total_files=174,
        synced_bytes=378_140,
        total_bytes=500_000,
        current_file=current_file,
    )


def test_a_row_shows_the_phase_then_files_bytes_and_the_current_file():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    update = display.track()
    with display:
        update(SyncProgress(phase="manifest", mode="manifest"))
        display._progress.refresh()
        update(_transferring())
    frames = _frames(out)
    assert any(line.startswith("manifest: reading manifest …") for line in frames)
    last = frames[-1]
    assert last.startswith("manifest:")
    for part in ("122/174 files", "378.14 KB/500.00 KB", "/s", "events.jsonl"):
        assert part in last
    assert "runs/r1" not in last  # the file's name, not its path


def test_rows_of_several_syncs_are_drawn_together_with_their_labels():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    first, second = display.track("lab-a:/data"), display.track("lab-b:/data")
    with display:
        first(_transferring())
        second(SyncProgress(phase="walking", mode="legacy"))
    frames = _frames(out)
    assert frames[-2].startswith("lab-a:/data:") and "122/174 files" in frames[-2]
    assert frames[-1].startswith("lab-b:/data: listing the server …")


def test_the_rows_are_erased_when_the_display_stops():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    update = display.track()
    with display:
        update(_transferring())
    # the last thing written moves the cursor up over the row and clears it
    assert out.getvalue().endswith("\x1b[1A\x1b[2K")


def test_a_hostile_file_name_is_shown_escaped_never_styling_the_output():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    update = display.track("[bold]lab\x1b[2J")
    with display:
        update(_transferring("runs/r1/[red]fake\x1b[31m\r\x07name.png"))
    written = out.getvalue()
    assert "\x1b[31m" not in written and "\x1b[2J" not in written and "\x07" not in written
    assert _RICH_CONTROL.sub("", written).count("\x1b") == 0
    frame = _frames(out)[-1]
    assert frame.startswith("[bold]lab\\x1b[2J:")  # markup shown as text, ESC as an escape
    assert "[red]fake\\x1b[31m\\r\\x07name.png" in frame


def test_nothing_is_written_off_a_terminal():
    console, out = _console(terminal=False)
    display = SyncProgressDisplay(console)
    assert not display.enabled
    update = display.track()
    with display:
        update(SyncProgress(phase="manifest", mode="manifest"))
        update(_transferring())
    assert out.getvalue() == ""


def test_without_a_byte_total_the_eta_goes_by_files():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    update = display.track()
    progress = _transferring()
    progress.total_bytes = 0
    with display:
        update(progress)
    last = _frames(out)[-1]
    assert "122/174 files" in last and "378.14 KB " in last and "/500" not in last
    assert "ETA 0:" in last


def test_a_warning_logged_meanwhile_is_printed_above_the_rows():
    console, out = _console(terminal=True)
    display = SyncProgressDisplay(console)
    update = display.track()
    logger = logging.getLogger("runicorn")
    handlers, level = list(logger.handlers), logger.level
    configure_logging(verbose=False)
    try:
        with display:
            update(_transferring())
            logging.getLogger("runicorn.sync.transfer").warning("a file failed")
    finally:
        logger.handlers, logger.level = handlers, level
    frames = _frames(out)
    assert "WARNING runicorn.sync.transfer: a file failed" in frames
    assert frames[-1].startswith("manifest:")  # the row is drawn again below it

"""What every command shares: logging to stderr, exit codes, signal handling, formatting."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_HOST_KEY = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def configure_logging(verbose: bool) -> None:
    """Send the library's log records to stderr: warnings by default, everything with -v."""
    logger = logging.getLogger("runicorn")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # paramiko is chatty at INFO; keep it at warnings unless asked.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose else logging.WARNING)


def use_color() -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def error(message: str) -> None:
    click.secho(f"error: {message}", fg="red" if use_color() else None, err=True)


def warning(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow" if use_color() else None, err=True)


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` so cleanup code (temp files, locks) runs."""

    def _handler(signum: int, _frame: object) -> None:
        raise SystemExit(EXIT_TERMINATED)

    try:
        previous = signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def human_bytes(count: float) -> str:
    """1234567890 -> '1.23 GB' (decimal units, as the manifest summary has always shown)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")

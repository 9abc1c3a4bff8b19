"""What every command shares: logging to stderr, exit codes, signal handling, formatting."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click

from runicorn.format.names import printable as printable  # the CLI modules take it here

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_HOST_KEY = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_Command = TypeVar("_Command", bound=Callable[..., object])


def ssh_options(command: _Command) -> _Command:
    """The SSH options every command that connects takes, the same way (``sync``,
    ``doctor``): ``--port``, ``--identity``, ``--ssh-config``, ``--known-hosts``, passed as
    ``port``, ``identities``, ``ssh_config``, ``known_hosts``."""
    for option in reversed(
        (
            click.option(
                "--port", "-p", type=click.IntRange(1, 65535), help="SSH port (overrides config)."
            ),
            click.option(
                "--identity",
                "-i",
                "identities",
                multiple=True,
                type=click.Path(dir_okay=False),
                help="Private key file to try (repeatable); the agent and ~/.ssh keys are "
                "tried too.",
            ),
            click.option(
                "--ssh-config",
                type=click.Path(dir_okay=False),
                default="~/.ssh/config",
                show_default=True,
                help="OpenSSH client config to read HostName, User, Port, IdentityFile from.",
            ),
            click.option(
                "--known-hosts",
                type=click.Path(dir_okay=False),
                default=None,
                help="known_hosts file to verify the server against [default: ~/.ssh/known_hosts].",
            ),
        )
    ):
        command = option(command)
    return command


def configure_logging(verbose: bool) -> None:
    """Send the library's log records to stderr: warnings by default, everything with -v."""
    logger = logging.getLogger("runicorn")
    handler = _StderrHandler()
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # paramiko is chatty at INFO; keep it at warnings unless asked.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Its transport thread logs a failed handshake with a traceback (through logging's last
    # resort handler) before connect() raises; the command reports it in one line.
    logging.getLogger("paramiko.transport").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each record: while a live display runs, that is
    the display's proxy, which prints the line above the display instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class EscapingFormatter(logging.Formatter):
    """Log lines whose message can neither move the terminal's cursor nor forge a line:
    control and format characters (a file name from a server may hold any) are escaped by
    :func:`runicorn.format.names.printable`; a traceback is left as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def use_color() -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def error(message: str) -> None:
    """One line on stderr; what it quotes from a server is escaped (see :func:`printable`)."""
    click.secho(f"error: {printable(message)}", fg="red" if use_color() else None, err=True)


def warning(message: str) -> None:
    """As :func:`error`, for what did not stop the command."""
    click.secho(f"warning: {printable(message)}", fg="yellow" if use_color() else None, err=True)


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

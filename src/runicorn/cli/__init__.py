"""The ``runicorn`` command line: server-side manifest generation and client-side sync.

Only this package prints. Machine-readable output (``--json``) goes to stdout; logs and
progress go to stderr.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
from typing import NoReturn

import click

from runicorn._version import __version__

# name -> (module, attribute): a command's module is imported only when that command runs
# (or help lists it), so `runicorn sync` does not pay for the generator's imports.
_COMMANDS: dict[str, tuple[str, str]] = {
    "generate-manifest": ("runicorn.cli.generate", "generate_manifest"),
    "sync": ("runicorn.cli.sync", "sync"),
    "demo": ("runicorn.cli.demo", "demo"),
    "runs": ("runicorn.cli.runs", "runs"),
    "doctor": ("runicorn.cli.doctor", "doctor"),
    "units": ("runicorn.cli.units", "units"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _COMMANDS:
            module, attribute = _COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return command


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from runicorn.core.backend import active_backend

    click.echo(f"runicorn {__version__} (backend: {active_backend().name})")
    ctx.exit(0)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    "-V",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the active backend (native or python), then exit.",
)
def main() -> None:
    """Runicorn manifest-based sync of ML experiment runs."""


_WITHOUT_CYCLE_COLLECTOR = frozenset({"generate-manifest"})
"""Commands whose process runs without the cyclic garbage collector: one bounded job whose
objects are freed by reference counting. A generation holds its million objects with the
collector paused anyway; re-enabled, its first pass would visit all of them (a few tenths
of a second after a 100,000-run generation) for nothing to collect."""


def entry_point() -> NoReturn:
    """The ``runicorn`` console script (and ``python -m runicorn``).

    A one-shot process need not tidy its heap on its way out. When the command has returned,
    every file it wrote is closed and renamed and every connection closed, so only the
    buffered streams and log handlers are flushed and the process ends with :func:`os._exit`.
    Freeing a 100,000-run manifest object by object would take about 0.4 s more, and the
    collector's last pass over paramiko's imports tens of milliseconds. An exception other
    than ``SystemExit`` ends the process the ordinary way, traceback and all.
    """
    if sys.argv[1:2] and sys.argv[1] in _WITHOUT_CYCLE_COLLECTOR:
        gc.disable()
    try:
        main()
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Exit as :class:`SystemExit` would with ``code`` (a message is printed, status 1),
    after flushing what Python would flush, without freeing the heap."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`runicorn ... | head`), a closed stream
            status = status or 120  # what Python exits with when its final flush fails
    os._exit(status & 0xFF)

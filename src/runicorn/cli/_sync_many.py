"""``runicorn sync NAME`` and ``runicorn sync --all``: the remotes of the config file.

A named remote is resolved into what ``runicorn sync HOST:PATH CACHE_DIR`` takes, options on
the command line winning over the file's settings. ``--all`` runs one sync per remote, each
on a thread of its own with its own SSH connection (the work is waiting on the network and
on the disk; the CPU-heavy parts release the GIL or are short), draws one progress display
with a row per remote, prints one summary per remote and a last line, and exits with the
worst code.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_HOST_KEY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
)
from runicorn.cli._common import error as print_error

if TYPE_CHECKING:
    from runicorn.cli.config import RemoteConfig, RemotesFile
    from runicorn.sync.selection import RunSelection
    from runicorn.sync.service import SyncProgress

__all__ = ["Invocation", "Report", "Target", "named_remote", "resolve", "sync_remotes"]

_SEVERITY = {
    EXIT_OK: 0,
    EXIT_PARTIAL: 1,
    EXIT_FAILURE: 2,
    EXIT_HOST_KEY: 3,
    EXIT_TERMINATED: 4,
    EXIT_INTERRUPTED: 5,
}
"""Which exit code wins when remotes end differently: the one needing most attention."""


def worst(codes: list[int]) -> int:
    """The exit code of several syncs: the most severe of theirs (0 for none)."""
    return max(codes, key=lambda code: _SEVERITY.get(code, 2), default=EXIT_OK)


@dataclass(frozen=True)
class Invocation:
    """What the command line says that a config file's remote may also say (``None`` or
    empty: not given, the file's setting applies)."""

    port: int | None
    identities: tuple[str, ...]
    workers: int | None
    selection: RunSelection
    stream_python: str | None = None


@dataclass(frozen=True)
class Target:
    """One sync to run: a remote's settings merged with the command line's."""

    name: str
    url: str
    cache_dir: Path
    port: int | None
    identities: tuple[str, ...]
    workers: int | None
    selection: RunSelection
    compress: bool | None
    """SSH compression: on, off, or ``None`` for the default ("auto" in the file)."""
    stream_python: str | None = None
    """The server's interpreter that runs the file stream (``None``: ``python3``)."""


def resolve(remote: RemoteConfig, invocation: Invocation) -> Target:
    """The sync of ``remote``: a selection given on the command line replaces the file's
    (as a whole); every other option given wins over its setting."""
    from runicorn.sync.selection import RunSelection, parse_duration

    selection = invocation.selection
    if selection.is_everything:
        since = None if remote.since is None else parse_duration(remote.since)
        selection = RunSelection.of(remote.projects, remote.include, remote.exclude, since)
    return Target(
        name=remote.name,
        url=remote.url,
        cache_dir=remote.cache,
        port=invocation.port if invocation.port is not None else remote.port,
        identities=invocation.identities + remote.identity,
        workers=invocation.workers if invocation.workers is not None else remote.workers,
        selection=selection,
        compress=remote.compress if isinstance(remote.compress, bool) else None,
        stream_python=invocation.stream_python or remote.stream_python,
    )


def named_remote(
    source: str, cache_dir: Path | None, load: Callable[[], RemotesFile]
) -> RemoteConfig | None:
    """The config file's remote ``source`` names, if it is a name (no ``:``, ``/`` or
    ``\\``) found there; ``None`` for ``HOST:PATH`` and local paths. A name not in the file
    with no ``CACHE_DIR`` is a usage error naming the remotes the file has."""
    if any(char in source for char in ":/\\"):
        return None
    config = load()
    if source in config.remotes:
        return config.remotes[source]
    if cache_dir is None:
        from runicorn.cli.config import ConfigError

        try:
            config.get(source)
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
    return None


# -- what one remote's sync reports --------------------------------------------------------------


@dataclass
class Report:
    """What one remote's sync would have printed, collected on its thread (see
    ``runicorn.cli.sync._OUTPUT``) and printed in the config file's order at the end."""

    name: str
    progress: Callable[[SyncProgress], None] | None = None
    code: int = EXIT_FAILURE
    document: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    errors: list[str] = field(default_factory=list)

    def fail(self, code: int, message: str, extra: dict[str, Any]) -> None:
        self.code = code
        self.errors.append(message)
        self.document = {"error": message, "exit_code": code, **extra}

    def done(self, code: int, document: dict[str, Any], summary: str) -> None:
        self.code = code
        self.document = document
        self.summary = summary


# -- --all ----------------------------------------------------------------------------------------


def sync_remotes(
    targets: list[Target], run_one: Callable[[Target, Report], int], *, as_json: bool
) -> int:
    """Sync every target at once (``run_one`` syncs one, collecting its output in the report
    it is given); print their summaries and a last line; return the worst exit code."""
    clash = _shared_cache(targets)
    if clash:
        print_error(clash)
        if as_json:
            click.echo(orjson.dumps({"error": clash, "exit_code": EXIT_FAILURE}).decode())
        return EXIT_FAILURE
    from runicorn.cli.progress import SyncProgressDisplay

    display = SyncProgressDisplay()
    reports = [
        Report(t.name, progress=display.track(t.name) if display.enabled else None)
        for t in targets
    ]
    switch_interval = sys.getswitchinterval()
    threads = [
        threading.Thread(
            target=_sync_one,
            args=(target, report, run_one),
            name=f"runicorn-sync-{target.name}",
            daemon=True,  # Ctrl+C ends the command; each cache stays consistent
        )
        for target, report in zip(targets, reports, strict=True)
    ]
    try:
        with display:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # wakes for Ctrl+C (a bare join would not)
    except KeyboardInterrupt:
        message = "interrupted; finished files are kept and the next sync resumes"
        print_error(message)
        if as_json:
            click.echo(orjson.dumps({"error": message, "exit_code": EXIT_INTERRUPTED}).decode())
        return EXIT_INTERRUPTED
    finally:
        sys.setswitchinterval(switch_interval)
    return _print_reports(reports, as_json)


def _shared_cache(targets: list[Target]) -> str | None:
    """Two remotes writing one cache directory would fight over it (one is refused)."""
    seen: dict[Path, str] = {}
    for target in targets:
        key = target.cache_dir.expanduser().absolute()
        if key in seen:
            return (
                f"remotes {seen[key]!r} and {target.name!r} share the cache directory {key}; "
                "give each its own (cache = …), or drop cache to use one per remote"
            )
        seen[key] = target.name
    return None


def _sync_one(target: Target, report: Report, run_one: Callable[[Target, Report], int]) -> None:
    try:
        report.code = run_one(target, report)
    except SystemExit as stop:  # what ends a single sync early (its report has the message)
        report.code = stop.code if isinstance(stop.code, int) else EXIT_FAILURE
    except Exception as error:  # a bug or an unexpected failure: this remote only
        report.fail(EXIT_FAILURE, f"{type(error).__name__}: {error}", {})


def _print_reports(reports: list[Report], as_json: bool) -> int:
    code = worst([report.code for report in reports])
    if as_json:
        remotes = [{"remote": report.name, **report.document} for report in reports]
        click.echo(orjson.dumps({"remotes": remotes, "exit_code": code}, default=str).decode())
    else:
        for report in reports:
            if report.summary:
                click.echo(f"{report.name}: {report.summary}")
    for report in reports:
        for message in report.errors:
            print_error(f"{report.name}: {message}")
    failed = [f"{r.name} (exit {r.code})" for r in reports if r.code != EXIT_OK]
    total = len(reports)
    tally = f"{total - len(failed)} of {total} remotes up to date"
    click.echo(tally + (f"; {', '.join(failed)}" if failed else ""), err=True)
    return code

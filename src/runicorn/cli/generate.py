"""``runicorn generate-manifest``: the server-side job, from cron or a timer, or long-running
with ``--watch``."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    configure_logging,
    error,
    human_bytes,
    printable,
    terminate_as_exit,
    warning,
)
from runicorn.format import layout
from runicorn.manifest import (
    GenerationReport,
    ManifestGenerationError,
    ManifestGenerator,
    ManifestType,
    SyncManifest,
)

if TYPE_CHECKING:
    from runicorn.generate.watch import ManifestPublisher

RULE = "=" * 60

MAX_PRINTED_PROBLEMS = 20
"""Problems the summary names one by one; ``--json`` lists them all."""


@click.command("generate-manifest")
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Experiments root (the directory holding <project>/<name>/runs/<run_id> "
    "or runs/<path...>/<run_id>).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Manifest path [default: <root>/.runicorn/<type>_manifest.json]; "
    "its directory is created if missing.",
)
@click.option("--active", "manifest_type", flag_value="active", help="Recently active runs only.")
@click.option(
    "--full",
    "manifest_type",
    flag_value="full",
    default=True,
    help="Every run (the default).",
)
@click.option(
    "--active-window",
    type=click.IntRange(min=0),
    default=3600,
    show_default=True,
    help="Seconds: a run is active if a file changed this recently (or it is running).",
)
@click.option("--no-incremental", is_flag=True, help="Re-read every tail instead of reusing.")
@click.option(
    "--scan-threads",
    type=click.IntRange(1, 256),
    default=None,
    help="Scan projects (and the directories of runs/) on N threads (more on NFS/Lustre). "
    "Default: up to 4 with the compiled core, 1 with pure Python.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: republish the active manifest within a second of a change and the "
    "full one within --full-interval. SIGHUP rescans; SIGTERM or Ctrl+C ends it (exit 0).",
)
@click.option(
    "--full-interval",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="With --watch: seconds within which a change reaches the full manifest.",
)
@click.option(
    "--poll",
    is_flag=True,
    envvar="RUNICORN_WATCH_POLL",
    help="With --watch: poll (an incremental generation every --poll-interval) instead of "
    "inotify. Automatic on NFS, Lustre and other shared file systems. "
    "[env: RUNICORN_WATCH_POLL=1]",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=5.0,
    show_default=True,
    help="With --watch, when polling: seconds between generations of the active manifest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging on stderr.")
def generate_manifest(
    root: Path,
    output: Path | None,
    manifest_type: str,
    active_window: int,
    no_incremental: bool,
    scan_threads: int | None,
    watch: bool,
    full_interval: float,
    poll: bool,
    poll_interval: float,
    as_json: bool,
    verbose: bool,
) -> None:
    """Write <type>_manifest.json and .json.gz describing every run's files.

    Runs are found in both layouts: <project>/<name>/runs/<run_id>/ (SDK 0.5) and
    runs/<path...>/<run_id>/ (SDK 0.6+); the summary names which the root holds.

    Exit codes: 0 success (also when nothing changed, for a root without runs, which
    is warned about on stderr, and for --watch ended by a signal), 1 failure, or a
    manifest published with problems (unreadable directories, skipped names, vanished
    files: listed in the summary and the manifest), 130 interrupted.
    """
    configure_logging(verbose)
    generator = ManifestGenerator(
        remote_root=root,
        active_window_seconds=active_window,
        incremental=not no_incremental,
        scan_threads=scan_threads,
    )
    if watch:
        _watch(
            generator,
            ManifestType(manifest_type),
            output,
            full_interval,
            poll,
            poll_interval,
            as_json,
            verbose,
        )
        return
    try:
        with terminate_as_exit():
            manifest, path = generator.generate(ManifestType(manifest_type), output_path=output)
    except KeyboardInterrupt:
        error("interrupted; the previous manifest is unchanged")
        sys.exit(EXIT_INTERRUPTED)
    except ManifestGenerationError as exc:
        error(f"{exc}")
        sys.exit(EXIT_FAILURE)
    report = generator.last_report
    assert report is not None
    if report.runs_scanned == 0:
        root_path = generator.remote_root
        warning(
            f"no run found under {root_path}: looked for "
            f"{root_path}/<project>/<name>/{layout.RUNS_DIRNAME}/<run_id>/ and "
            f"{root_path}/{layout.RUNS_DIRNAME}/<path...>/<run_id>/ (a directory holding "
            f"{' or '.join(layout.RUN_MARKERS)}); is --root the SDK's storage root?"
        )
    summary = _summary(generator, manifest, path, report)
    if as_json:
        click.echo(orjson.dumps(summary).decode())
    else:
        _print_block(summary, report)
    if manifest.problems:
        # published all the same: what was read is better than nothing, and the manifest
        # says what is missing (clients never delete there)
        sys.exit(EXIT_FAILURE)


def _summary(
    generator: ManifestGenerator, manifest: SyncManifest, path: Path, report: GenerationReport
) -> dict[str, Any]:
    return {
        "type": manifest.manifest_type.value,
        "output": str(path),
        "compressed": str(report.compressed_path),
        "revision": manifest.revision,
        "snapshot_id": manifest.snapshot_id,
        "published": report.published,
        "layout": report.run_layout,
        "experiments": manifest.total_experiments,
        "files": manifest.total_files,
        "total_bytes": manifest.total_bytes,
        "warnings": len(report.problems) + len(report.warnings),
        "problems": [{"path": path, "reason": reason} for path, reason in manifest.problems or ()],
        "files_hashed": report.files_hashed,
        "files_reused": report.files_reused,
        "duration": round(report.duration, 6),
        "backend": generator.backend.name,
    }


def _print_block(summary: dict[str, Any], report: GenerationReport) -> None:
    status = "Manifest Generation Complete" if report.published else "Manifest Unchanged"
    lines = [
        RULE,
        status,
        RULE,
        f"Type:          {summary['type']}",
        f"Output:        {printable(summary['output'])}",
        f"Compressed:    {printable(summary['compressed'])}",
        f"Revision:      {summary['revision']}"
        + ("" if report.published else " (unchanged: nothing changed since it was published)"),
        f"Snapshot ID:   {summary['snapshot_id']}",
        f"Layout:        {summary['layout']}",
        f"Experiments:   {summary['experiments']}",
        f"Files:         {summary['files']}",
        f"Total Size:    {human_bytes(summary['total_bytes'])}",
    ]
    if summary["warnings"]:
        lines.append(f"Warnings:      {summary['warnings']} (details above on stderr)")
    problems = summary["problems"]
    if problems:
        lines.append(
            f"Problems:      {len(problems)}: the scan was incomplete; the manifest lists them "
            "and clients never delete there (exit 1)"
        )
        for problem in problems[:MAX_PRINTED_PROBLEMS]:
            lines.append(f"  {printable(problem['path'])}: {problem['reason']}")
        if len(problems) > MAX_PRINTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_PRINTED_PROBLEMS} more (see --json)")
    lines.append(RULE)
    click.echo("\n".join(lines))


# --- --watch ------------------------------------------------------------------------------


def _watch(
    generator: ManifestGenerator,
    manifest_type: ManifestType,
    output: Path | None,
    full_interval: float,
    poll: bool,
    poll_interval: float,
    as_json: bool,
    verbose: bool,
) -> None:
    """Run the publisher until SIGTERM or Ctrl+C (exit 0); SIGHUP rescans.

    The first signal lets the generation in progress finish; a second one abandons it (the
    generator removes its temp files; the previous manifest stays published).
    """
    from runicorn.generate.changes import ChangeSourceFailed
    from runicorn.generate.watch import SOURCE_AUTO, SOURCE_POLL, ManifestPublisher

    # A long-running process needs the cyclic collector the one-shot command goes without;
    # each generation still pauses it while it builds its objects.
    gc.enable()
    # Publications and the source in use are what a service log is for; the generator's
    # per-generation "unchanged" lines are not, unless asked for.
    logging.getLogger("runicorn").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("runicorn.generate.generator").setLevel(logging.WARNING)

    def on_generation(report: GenerationReport, manifest: SyncManifest) -> None:
        if as_json and report.published:
            summary = _summary(generator, manifest, report.output_path, report)
            click.echo(orjson.dumps(summary).decode())

    publisher = ManifestPublisher(
        generator,
        source=SOURCE_POLL if poll else SOURCE_AUTO,
        full_interval=full_interval,
        poll_interval=poll_interval,
        outputs={manifest_type: output} if output else None,
        on_generation=on_generation,
    )
    try:
        with _signals_stop(publisher):
            publisher.run()
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("stopped; the publication in progress was abandoned")
        return
    except ChangeSourceFailed as exc:
        error(f"{exc}")
        sys.exit(EXIT_FAILURE)
    logging.getLogger(__name__).info("stopped")


@contextmanager
def _signals_stop(publisher: ManifestPublisher) -> Iterator[None]:
    """SIGTERM and SIGINT stop the publisher (a second one abandons the generation in
    progress); SIGHUP asks it to rescan."""
    stops = 0

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            raise KeyboardInterrupt
        publisher.stop()

    def rescan(_signum: int, _frame: object) -> None:
        publisher.request_rescan()

    handled = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: rescan}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handled.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

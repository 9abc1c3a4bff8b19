"""``runicorn generate-manifest``: the server-side job, usually run from cron or a timer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    configure_logging,
    error,
    human_bytes,
    terminate_as_exit,
    warning,
)
from runicorn.format import layout
from runicorn.manifest import ManifestGenerationError, ManifestGenerator, ManifestType

RULE = "=" * 60


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
    help="Scan projects on N threads (more on NFS/Lustre). "
    "Default: up to 4 with the compiled core, 1 with pure Python.",
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
    as_json: bool,
    verbose: bool,
) -> None:
    """Write <type>_manifest.json and .json.gz describing every run's files.

    Runs are found in both layouts: <project>/<name>/runs/<run_id>/ (SDK 0.5) and
    runs/<path...>/<run_id>/ (SDK 0.6+); the summary names which the root holds.

    Exit codes: 0 success (also when nothing changed, and for a root without runs, which
    is warned about on stderr), 1 failure, 130 interrupted.
    """
    configure_logging(verbose)
    generator = ManifestGenerator(
        remote_root=root,
        active_window_seconds=active_window,
        incremental=not no_incremental,
        scan_threads=scan_threads,
    )
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
    summary: dict[str, Any] = {
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
        "files_hashed": report.files_hashed,
        "files_reused": report.files_reused,
        "duration": round(report.duration, 6),
        "backend": generator.backend.name,
    }
    if as_json:
        click.echo(orjson.dumps(summary).decode())
        return
    status = "Manifest Generation Complete" if report.published else "Manifest Unchanged"
    lines = [
        RULE,
        status,
        RULE,
        f"Type:          {summary['type']}",
        f"Output:        {summary['output']}",
        f"Compressed:    {summary['compressed']}",
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
    lines.append(RULE)
    click.echo("\n".join(lines))

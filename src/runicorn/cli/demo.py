"""``runicorn demo``: the whole story in a few seconds, with no server needed.

It builds a sample lab in a temporary directory (standing in for a lab server), publishes its
manifest, syncs it into a cache (standing in for a laptop) through the same engine that
``runicorn sync`` uses over SSH, simulates a training step, and syncs again, printing what
each sync moved. The second sync shows the point of the project: only appended bytes and
rewritten small files travel.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING

import click

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    configure_logging,
    human_bytes,
    terminate_as_exit,
    use_color,
)
from runicorn.cli._common import error as print_error

if TYPE_CHECKING:
    from runicorn.sync.stats import SyncStats


def _count(items: Sized, noun: str) -> str:
    number = len(items)
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True, fg="cyan" if use_color() else None, color=use_color())


def _sync_once(lab: Path, cache_dir: Path) -> SyncStats:
    """Publish the lab's manifest, then sync it into the cache; returns the stats."""
    from runicorn.manifest import ManifestGenerator, ManifestType
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.service import MetadataSyncService
    from runicorn.transport.local_remote import LocalRemote

    generator = ManifestGenerator(lab)
    manifest, _ = generator.generate(ManifestType.FULL)
    published = generator.last_report is not None and generator.last_report.published
    click.echo(
        f"  server: {'published' if published else 'unchanged,'} manifest revision "
        f"{manifest.revision} ({manifest.total_experiments} runs, {manifest.total_files} files, "
        f"{human_bytes(manifest.total_bytes)})"
    )
    cache = LocalCacheManager(cache_dir)
    remote = LocalRemote(str(lab))
    try:
        service = MetadataSyncService(
            None, None, str(lab), cache, manifest_sync_jitter=0.0, remote=remote
        )
        ok = service.sync_all()
    finally:
        remote.close()
        cache.close()
    stats = service.last_stats
    if stats is None or not ok:
        raise click.ClickException(
            f"the demo sync failed: {service.progress.last_error or 'see the log above'}"
        )
    if stats.get("skipped"):
        click.echo(f"  laptop: nothing to do ({stats.get('reason')}) in {stats['duration']:.2f} s")
    else:
        click.echo(
            f"  laptop: synced {stats['files_synced']} files, "
            f"{human_bytes(stats['bytes_downloaded'])} in {stats['duration']:.2f} s "
            f"({stats['full_count']} full downloads, {stats['incremental_count']} appended "
            "in place)"
        )
    return stats


@click.command("demo")
@click.option(
    "--runs",
    type=click.IntRange(1, 2000),
    default=20,
    show_default=True,
    help="How many runs the sample lab holds.",
)
@click.option(
    "--keep",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Build the lab and cache in this (new or empty) directory and keep them.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sample lab seed.")
@click.option(
    "--layout",
    "run_layout",
    type=click.Choice(["project-name", "runs-path"]),
    default="project-name",
    show_default=True,
    help="How the lab lays out runs: <project>/<name>/runs/<run_id> (SDK 0.5) or "
    "runs/<path...>/<run_id> (SDK 0.6+).",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging on stderr.")
def demo(runs: int, keep: Path | None, seed: int, run_layout: str, verbose: bool) -> None:
    """Build a sample lab, sync it, train a step, sync again; show what moved."""
    configure_logging(verbose)
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            print_error(f"{keep} is not empty; pass a new or empty directory to --keep")
            sys.exit(EXIT_FAILURE)
        keep.mkdir(parents=True, exist_ok=True)
        workdir = keep
    else:
        workdir = Path(tempfile.mkdtemp(prefix="runicorn-demo-"))
    try:
        with terminate_as_exit():
            _demo(workdir, runs, seed, run_layout)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep is not None:
        click.echo(f"\nKept the lab in {workdir / 'lab'} and the cache in {workdir / 'cache'}.")
        click.echo(f"Try: runicorn sync {workdir / 'lab'} {workdir / 'cache'}")


def _demo(workdir: Path, runs: int, seed: int, run_layout: str) -> None:
    from runicorn.demo.sample_lab import build_sample_lab, training_step

    lab_dir = workdir / "lab"
    cache_dir = workdir / "cache"
    started = time.monotonic()

    _heading(f"1. A lab server with {runs} runs")
    lab = build_sample_lab(lab_dir, runs=runs, seed=seed, layout=run_layout)
    running = len(lab.running_runs)
    click.echo(
        f"  built {lab_dir}: {len(lab.listed_runs)} runs ({running} still training), "
        f"{lab.listed_files} files, {human_bytes(lab.listed_bytes)}"
    )

    _heading("2. First sync: everything is new")
    first = _sync_once(lab_dir, cache_dir)

    _heading("3. Nothing changed: the sync reads the manifest header and stops")
    _sync_once(lab_dir, cache_dir)

    _heading("4. A training step on the server")
    step = training_step(lab_dir, seed=seed)
    appended = sum(step.appended.values())
    click.echo(
        f"  {len(step.appended)} logs grew by {human_bytes(appended)}, "
        f"{len(step.rewritten)} small files rewritten, {_count(step.finished, 'run')} finished, "
        f"{_count(step.added, 'new run')}, {_count(step.gone_runs(), 'run')} deleted"
    )

    _heading("5. Second sync: only what changed moves")
    second = _sync_once(lab_dir, cache_dir)
    if first["bytes_downloaded"]:
        share = 100.0 * second["bytes_downloaded"] / first["bytes_downloaded"]
        click.echo(f"  moved {share:.1f} % of the first sync's bytes")

    _heading("Done")
    click.echo(
        f"  in {time.monotonic() - started:.1f} s. Against a real server: "
        "runicorn sync user@labserver:/path/to/experiments ~/runicorn-cache"
    )

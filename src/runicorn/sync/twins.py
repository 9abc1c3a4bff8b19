"""Runs and files a case-insensitive client would store as one: the later twin is left out.

A Linux server holds ``vision/ResNet/r1`` and ``vision/resnet/r1`` as two runs; the default
file systems of macOS and Windows store them as one directory, so mirroring both would mix
their files and let the second overwrite the first. :func:`drop_case_twins` finds such
twins (:func:`runicorn.format.client_names.case_twins`: same path once case-folded and
normalised) before anything is fetched and leaves the later one out: what the cache holds
already comes first, then the manifest's order. A twin run is left out whole; a twin file
inside a kept run alone. The sync reports them (the ``case_twins`` stats key) and never
writes them. On a case-sensitive client nothing is computed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from runicorn.format.client_names import case_twins, is_case_insensitive
from runicorn.format.models import ExperimentEntry, SyncManifest
from runicorn.format.names import printable

__all__ = ["drop_case_twins"]

logger = logging.getLogger(__name__)

_SHOWN = 5
"""Twins named in the log line; the stats name them all."""


def drop_case_twins(
    manifest: SyncManifest,
    cached_runs: Callable[[], Iterable[str]],
    cached_files: Callable[[list[str]], Iterable[str]],
    platform: str,
) -> tuple[SyncManifest, dict[str, str]]:
    """The manifest without the runs and files that would land on an earlier one on
    ``platform``'s file system, and ``{left out: the run or file it would have landed on}``
    (runs as their prefix, ending in ``/``).

    ``cached_runs()`` gives the prefixes of the runs the cache holds, ``cached_files(p)``
    the cached files below the run prefixes ``p``: both come before the manifest's, so a
    later sync never swaps which twin the cache keeps. Called only on a case-insensitive
    platform; elsewhere the manifest comes back as it is.
    """
    if not is_case_insensitive(platform) or not manifest.experiments:
        return manifest, {}
    listed = {exp.prefix for exp in manifest.experiments}
    cached = list(cached_runs())
    held = set(cached)
    order = [*cached, *(exp.prefix for exp in manifest.experiments if exp.prefix not in held)]
    twins = {later: kept for later, kept in case_twins(order, platform).items() if later in listed}
    kept_runs = [exp for exp in manifest.experiments if exp.prefix not in twins]
    listed_files = {entry.path for exp in kept_runs for entry in exp.files}
    on_disk = list(cached_files([exp.prefix for exp in kept_runs]))
    stored = set(on_disk)
    order = [
        *on_disk,
        *(entry.path for exp in kept_runs for entry in exp.files if entry.path not in stored),
    ]
    file_twins = {
        later: kept for later, kept in case_twins(order, platform).items() if later in listed_files
    }
    if not twins and not file_twins:
        return manifest, {}
    if file_twins:
        kept_runs = [_without(exp, file_twins) for exp in kept_runs]
    twins.update(file_twins)
    shown = ", ".join(
        f"{printable(later)} (as {printable(kept)})" for later, kept in list(twins.items())[:_SHOWN]
    )
    logger.warning(
        "left out %d run(s) or file(s) whose names differ from another's only in case or "
        "Unicode normalisation: this machine's file system would store them as one and "
        "overwrite it: %s%s (rename one on the server to sync both)",
        len(twins),
        shown,
        ", ..." if len(twins) > _SHOWN else "",
    )
    return dataclasses.replace(manifest, experiments=kept_runs), dict(sorted(twins.items()))


def _without(exp: ExperimentEntry, left_out: dict[str, str]) -> ExperimentEntry:
    if not any(entry.path in left_out for entry in exp.files):
        return exp
    files = [entry for entry in exp.files if entry.path not in left_out]
    return dataclasses.replace(exp, files=files)

"""Turn scan records into manifest file entries, and encode experiments as manifest JSON.

This pure-Python module is the specification; ``csrc/_native_entries.pyx`` is its compiled
twin and must return exactly the same objects and bytes. Together they are the per-file
half of a generation: everything the generator does once per file between the scan and the
gzip, so that a compiled build runs no interpreter loop per file.

What a file means comes from :mod:`runicorn.format.layout` (listed or not, priority, append-only,
the soft-delete marker); what an append-only file's tail hash is comes from the memos of the
previous generation when its stat key is unchanged and it is older than that generation's
scan, and otherwise from hashing it (the caller does that, for the ``stale`` entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from runicorn.core.memo import FileMemo
from runicorn.core.scan import FileStat, RunScan
from runicorn.format import layout
from runicorn.format.models import ExperimentEntry, FileEntry
from runicorn.format.models import encode_experiments as _encode

NS_PER_SECOND = 1_000_000_000

FileKind = tuple[int, bool]
"""``(priority, is_append_only)`` of a file a manifest lists."""


class RunFiles(NamedTuple):
    """The listed files of one run, and what the generator needs to describe the run."""

    files: list[FileEntry]
    """In scan order (sorted by path); append-only entries of ``stale`` still lack a hash."""
    watched: tuple[FileStat | None, ...]
    """The scan records of the ``watched`` names, ``None`` where the run has no such file."""
    oldest: float
    """The smallest mtime of ``files``, 0.0 when it is empty."""
    newest: float
    """The largest mtime of ``files``, 0.0 when it is empty."""


class Entries(NamedTuple):
    """What :func:`build_file_entries` made of a scan."""

    runs: list[RunFiles | None]
    """One per scanned run, in order; ``None`` for a soft-deleted run (it holds
    :data:`runicorn.format.layout.DELETED_MARKER`), which the manifest leaves out."""
    reused: dict[str, FileMemo]
    """Memos whose tail hash was reused, by path: the next generation's memos."""
    stale: list[tuple[FileEntry, FileStat]]
    """Append-only entries (in scan order) whose tail must be hashed, with their records."""


def _classify(path_in_run: str) -> FileKind | None:
    """``(priority, is_append_only)`` of a file a manifest lists, ``None`` if it is left out."""
    if not layout.is_synced_file(path_in_run):
        return None
    return layout.priority_for(path_in_run), layout.is_append_only(path_in_run)


def build_file_entries(
    runs: Sequence[RunScan],
    memos: Mapping[str, FileMemo],
    reuse_before_ns: int,
    watched: tuple[str, ...] = (),
) -> Entries:
    """File entries of every scanned run, reusing the tail hash of unchanged append-only files.

    A memo is reused when its key equals the file's ``(size, mtime_ns, ctime_ns, inode)``
    and the file's mtime is older than ``reuse_before_ns``; its recorded size and tail hash
    then stand in for the scanned size (the file may have grown past a partial last line).
    A run holding the soft-delete marker contributes nothing, not even reused memos.
    """
    kinds: dict[str, FileKind | None] = {}
    built: list[RunFiles | None] = []
    reused: dict[str, FileMemo] = {}
    stale: list[tuple[FileEntry, FileStat]] = []
    for project, name, run_id, records in runs:
        prefix = layout.run_prefix(project, name, run_id)
        files: list[FileEntry] = []
        found: list[FileStat | None] = [None] * len(watched)
        run_reused: dict[str, FileMemo] = {}
        run_stale: list[tuple[FileEntry, FileStat]] = []
        deleted = False
        for record in records:
            path_in_run = record[0]
            if path_in_run in watched:
                found[watched.index(path_in_run)] = record
            try:
                kind = kinds[path_in_run]
            except KeyError:
                kind = kinds[path_in_run] = _classify(path_in_run)
            if kind is None:
                if path_in_run == layout.DELETED_MARKER:
                    deleted = True
                    break
                continue
            path = prefix + path_in_run
            priority, append_only = kind
            entry = FileEntry(path, record[1], record[2] / NS_PER_SECOND, priority, append_only)
            if append_only:
                known = memos.get(path)
                if (
                    known is not None
                    and record[2] < reuse_before_ns
                    and known.key == (record[1], record[2], record[3], record[4])
                ):
                    entry.size, entry.tail_hash = known.recorded_size, known.tail_hash
                    run_reused[path] = known
                else:
                    run_stale.append((entry, record))
            files.append(entry)
        if deleted:
            built.append(None)
            continue
        reused.update(run_reused)
        stale.extend(run_stale)
        mtimes = [entry.mtime for entry in files]
        built.append(
            RunFiles(files, tuple(found), min(mtimes, default=0.0), max(mtimes, default=0.0))
        )
    return Entries(built, reused, stale)


def encode_experiments(experiments: Sequence[ExperimentEntry]) -> bytes:
    """The ``experiments`` array of a manifest's JSON, byte for byte as published: the
    compact orjson encoding of each entry's ``to_dict()``."""
    return _encode(experiments)

"""Legacy sync: mirror a server that publishes no manifest by walking its tree over SFTP.

The walk lists ``<root>/<project>/<name>/runs/<run_id>/`` and
``<root>/runs/<path...>/<run_id>/`` (and every directory below a run) breadth-first, one
:meth:`Remote.listdirs` call per level, so a 100-run lab costs about six batched calls --
each listing a whole level concurrently on several SFTP channels -- instead of one round
trip per directory. Below ``runs/`` a directory is a run when its listing holds
``meta.json`` or ``status.json``, and a path component otherwise (see
:mod:`runicorn.format.layout`); root-level files such as the SDK's ``runicorn.db`` index are
never part of a run, so never synced.

What it finds is turned into a :class:`SyncManifest` by the same layout rules the generator
uses (:mod:`runicorn.format.layout`), and that manifest is applied by
:meth:`ManifestSyncClient.sync_with_manifest`, so legacy and manifest syncs share one diff,
transfer and state engine and produce the same cache.

What a walk cannot know, and how that is handled (kept simple on purpose):

* no tail hashes: an append-only file is extended after the client's append-verify of the
  bytes before its local end; without a manifest tail hash nothing is checked after the
  append. A half-written last line is not copied: the last :data:`NEWLINE_WINDOW` bytes of
  every append-only file that changed are read first (one pipelined fetch) and its size cut
  after the last newline (:func:`cut_at_last_newline`), as the generator does;
* mtimes come from SFTP v3 attributes, whole seconds: a walked file whose size and
  whole-second mtime match the cache's record keeps the recorded sub-second mtime
  (:func:`adopt_cached_mtimes`), so a fallback from manifest to legacy sync does not fetch
  everything again; a file rewritten within the same second at the same size is missed
  until its mtime moves (rsync's quick check has the same blind spot);
* the synthesised manifest says ``status: unknown`` and ``created_at`` / ``updated_at`` are
  the oldest / newest file mtime of the run (reading every status.json and meta.json over
  SFTP would cost a round trip per run); after the transfer, :func:`refine_runs_from_cache`
  records the real status and creation time from the freshly cached metadata files.

Names the name rule refuses (:mod:`runicorn.format.names`: not UTF-8, control characters, a
backslash, reserved, too deep or too long a path) and hidden names above the run level are
skipped with a warning, as are the later of two paths a case-insensitive client would store
as one; symbolic links
are reported and never followed; soft-deleted runs (``.deleted``) are left out. An unreadable
directory is a warning; an unreadable root is an ``OSError``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from runicorn._version import __version__
from runicorn.format import layout, names
from runicorn.format.models import ExperimentEntry, FileEntry, ManifestType, SyncManifest
from runicorn.transport.remote import FetchJob, FetchResult, Remote

if TYPE_CHECKING:
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.client import ManifestSyncClient
    from runicorn.sync.selection import RunSelection
    from runicorn.sync.stats import SyncStats

__all__ = [
    "LEGACY_GENERATOR",
    "MAX_TAGS_BYTES",
    "WalkReport",
    "adopt_cached_mtimes",
    "refine_runs_from_cache",
    "sync_legacy",
    "walk_remote",
]

logger = logging.getLogger(__name__)

LEGACY_GENERATOR = f"runicorn {__version__} (legacy walk)"
MAX_TAGS_BYTES = 16 * 1024 * 1024
"""``.experiments_metadata.json`` larger than this is ignored (runs get no tags)."""
MAX_LOGGED_WARNINGS = 50
ROOT = "."
"""How the walk names the remote root when it asks the :class:`Remote` to list it."""


class _Entry(Protocol):
    """What a walk reads of a listed entry (a transport ``RemoteDirEntry``); read-only."""

    @property
    def name(self) -> str: ...

    @property
    def is_dir(self) -> bool: ...

    @property
    def is_symlink(self) -> bool: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime(self) -> float: ...


class _Lister(Protocol):
    """The part of a :class:`Remote` a walk uses."""

    def listdirs(self, paths: list[str]) -> Mapping[str, Sequence[_Entry] | BaseException]: ...

    def read_file(self, path: str, max_bytes: int) -> bytes: ...


@dataclass
class WalkReport:
    """The manifest a walk synthesised and what the walk could not see."""

    manifest: SyncManifest
    warnings: list[str] = field(default_factory=list)
    """One line per skipped or unreadable path; each was also logged."""
    levels: int = 0
    """``listdirs`` calls made: the walk's round-trip cost, independent of the lab's width."""
    directories: int = 0
    """Directories listed."""
    soft_deleted: int = 0

    @property
    def complete(self) -> bool:
        """True when nothing was unreadable or skipped: only then may the sync delete."""
        return not self.warnings


@dataclass
class _Run:
    project: str
    name: str
    run_id: str
    files: list[FileEntry] = field(default_factory=list)
    deleted: bool = False

    @property
    def prefix(self) -> str:
        return layout.run_prefix(self.project, self.name, self.run_id)


def _refused(name: str, path: str) -> str | None:
    """Why the name rule refuses a listed entry (``path`` is relative to the root), or
    ``None``: a name the SFTP server gave as undecodable bytes arrives surrogate-escaped."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return "not a valid file name"
    reason = names.name_problem(name, top="/" not in path)
    if reason is None:
        reason = names.depth_problem(path.count("/") + 1, len(path.encode("utf-8")))
    return reason


def _join(parent: str, name: str) -> str:
    return name if parent == ROOT else f"{parent}/{name}"


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "vanished during the walk"
    if isinstance(error, NotADirectoryError):
        return "not a directory"
    if isinstance(error, OSError) and error.strerror:
        return f"unreadable: {error.strerror}"
    return f"unreadable: {error}"


class _Walk:
    """State of one breadth-first walk."""

    def __init__(
        self, remote: _Lister, remote_root: str, selection: RunSelection | None = None
    ) -> None:
        self.remote = remote
        self.remote_root = remote_root
        self.selection = selection
        self.warnings: list[str] = []
        self.levels = 0
        self.directories = 0
        self.soft_deleted = 0

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(f"{path}: {reason}")

    def list_level(self, paths: list[str]) -> dict[str, Sequence[_Entry] | BaseException]:
        if not paths:
            return {}
        self.levels += 1
        self.directories += len(paths)
        result = dict(self.remote.listdirs(paths))
        for path in paths:
            result.setdefault(path, OSError(f"{path}: the remote returned no listing"))
        return result

    def listing(
        self, results: Mapping[str, Sequence[_Entry] | BaseException], path: str
    ) -> Sequence[_Entry] | None:
        value = results[path]
        if isinstance(value, BaseException):
            if isinstance(value, KeyboardInterrupt | SystemExit):
                raise value
            self.warn(path, _reason(value))
            return None
        return sorted(value, key=lambda entry: entry.name)

    def subdirs(self, entries: Sequence[_Entry], parent: str, *, strict: bool) -> list[str]:
        """Visible, safe subdirectory names at a layout level; files are ignored unless
        ``strict`` (inside ``runs/`` only directories belong, as the scanner reports)."""
        names: list[str] = []
        for entry in entries:
            if layout.is_hidden(entry.name):
                continue
            path = _join(parent, entry.name)
            reason = _refused(entry.name, path)
            if reason is not None:
                self.warn(path, f"{reason}; skipped")
            elif entry.is_symlink:
                self.warn(path, "symbolic link not followed")
            elif entry.is_dir:
                names.append(entry.name)
            elif strict:
                self.warn(path, "not a directory")
        return names

    def run(self) -> list[_Run]:
        root_results = self.list_level([ROOT])
        root_value = root_results[ROOT]
        if isinstance(root_value, BaseException):
            if isinstance(root_value, KeyboardInterrupt | SystemExit):
                raise root_value
            reason = (
                "no such directory on the server"
                if isinstance(root_value, FileNotFoundError)
                else _reason(root_value)
            )
            raise OSError(
                f"cannot list the remote experiments root {self.remote_root}: "
                f"{reason}; check the path and its permissions on the server"
            ) from root_value
        projects = self.subdirs(sorted(root_value, key=lambda e: e.name), ROOT, strict=False)
        # a top-level runs directory is the runs-path layout, never a project
        runs_tree = layout.RUNS_DIRNAME in projects
        projects = [project for project in projects if project != layout.RUNS_DIRNAME]
        if self.selection is not None:
            # Top-level directories no selected run can be under are never listed.
            runs_tree = runs_tree and self.selection.may_select_project(layout.RUNS_DIRNAME)
            projects = [p for p in projects if self.selection.may_select_project(p)]

        level = self.list_level(projects + ([layout.RUNS_DIRNAME] if runs_tree else []))
        # directories below runs/ not known yet to be runs or path components: (dir, path)
        candidates: list[tuple[str, str]] = []
        if runs_tree:
            entries = self.listing(level, layout.RUNS_DIRNAME)
            for name in self.subdirs(entries or (), layout.RUNS_DIRNAME, strict=False):
                candidates.append((_join(layout.RUNS_DIRNAME, name), ""))
        experiments: list[str] = []
        for project in projects:
            entries = self.listing(level, project)
            if entries is not None:
                experiments += [
                    _join(project, n) for n in self.subdirs(entries, project, strict=False)
                ]

        level = self.list_level(experiments)
        runs_dirs: list[str] = []
        for experiment in experiments:
            entries = self.listing(level, experiment)
            for entry in entries or ():
                if entry.name != layout.RUNS_DIRNAME:
                    continue
                path = _join(experiment, entry.name)
                if entry.is_symlink:
                    self.warn(path, "symbolic link not followed")
                elif not entry.is_dir:
                    self.warn(path, "not a directory")
                else:
                    runs_dirs.append(path)

        level = self.list_level(runs_dirs)
        runs: dict[str, _Run] = {}
        for runs_dir in runs_dirs:
            entries = self.listing(level, runs_dir)
            if entries is None:
                continue
            project, name, _ = runs_dir.split("/")
            for run_id in self.subdirs(entries, runs_dir, strict=True):
                runs[_join(runs_dir, run_id)] = _Run(project, name, run_id)

        # Run directories and everything below them, one level per call. Each pending
        # directory carries its run and its path inside the run; the runs-path candidates
        # are listed on the same calls, and become runs or path components once listed.
        pending: list[tuple[str, _Run, str]] = [(path, run, "") for path, run in runs.items()]
        unreadable_runs: set[str] = set()
        while pending or candidates:
            level = self.list_level([path for path, _, _ in pending] + [c for c, _ in candidates])
            following: list[tuple[str, _Run, str]] = []
            for path, run, in_run in pending:
                entries = self.listing(level, path)
                if entries is None:
                    if not in_run:
                        unreadable_runs.add(path)
                    continue
                if in_run:
                    following += self.run_files(entries, path, run, in_run)
                else:
                    following += self.top_of_run(entries, path, run)
            next_candidates: list[tuple[str, str]] = []
            for path, run_path in candidates:
                entries = self.listing(level, path)
                if entries is None:
                    continue  # warned; neither a run nor a path component known to be one
                name = path.rsplit("/", 1)[1]
                if layout.is_run_dir_listing({entry.name for entry in entries}):
                    run = _Run(layout.RUNS_DIRNAME, run_path, name)
                    runs[path] = run
                    following += self.top_of_run(entries, path, run)
                else:
                    child_path = f"{run_path}/{name}" if run_path else name
                    next_candidates += [
                        (_join(path, child), child_path)
                        for child in self.subdirs(entries, path, strict=False)
                    ]
            pending = following
            candidates = next_candidates
        return sorted(
            (run for path, run in runs.items() if not run.deleted and path not in unreadable_runs),
            key=lambda run: (run.project, run.name, run.run_id),
        )

    def top_of_run(
        self, entries: Sequence[_Entry], path: str, run: _Run
    ) -> list[tuple[str, _Run, str]]:
        """The listing of a run directory: soft-deleted, or its files and subdirectories."""
        if any(e.name == layout.DELETED_MARKER for e in entries):
            run.deleted = True
            self.soft_deleted += 1
            return []
        return self.run_files(entries, path, run, "")

    def run_files(
        self, entries: Sequence[_Entry], path: str, run: _Run, in_run: str
    ) -> list[tuple[str, _Run, str]]:
        """Record the files of one directory of a run; return its subdirectories to list."""
        subdirs: list[tuple[str, _Run, str]] = []
        for entry in entries:
            child = _join(path, entry.name)
            path_in_run = f"{in_run}{entry.name}"
            reason = _refused(entry.name, child)
            if reason is not None:
                self.warn(child, f"{reason}; skipped")
            elif entry.is_symlink:
                self.warn(child, "symbolic link not followed")
            elif entry.is_dir:
                subdirs.append((child, run, path_in_run + "/"))
            elif layout.is_synced_file(path_in_run):
                run.files.append(
                    FileEntry(
                        path=run.prefix + path_in_run,
                        size=int(entry.size),
                        mtime=float(entry.mtime),
                        priority=layout.priority_for(path_in_run),
                        is_append_only=layout.is_append_only(path_in_run),
                    )
                )
        return subdirs


def _read_tags(remote: _Lister, warnings: list[str]) -> dict[str, list[str]]:
    try:
        data = remote.read_file(layout.EXPERIMENTS_METADATA_FILENAME, MAX_TAGS_BYTES)
    except FileNotFoundError:
        return {}
    except OSError as error:
        warnings.append(f"{layout.EXPERIMENTS_METADATA_FILENAME}: {_reason(error)}; no tags")
        return {}
    return layout.tags_by_run(layout.parse_json_object(data))


def _without_twins(runs: list[_Run], walk: _Walk) -> list[_Run]:
    """The runs (sorted) without the later of two runs or files whose paths a
    case-insensitive or normalising client would store as one (as the scan drops them)."""
    seen_runs: dict[str, str] = {}
    kept: list[_Run] = []
    for run in runs:
        prefix = run.prefix
        other = seen_runs.setdefault(names.fold(prefix), prefix)
        if other != prefix:
            walk.warn(prefix[:-1], names.REASON_COLLISION.format(other=other[:-1]) + "; skipped")
            continue
        kept.append(run)
        seen: dict[str, str] = {}
        unique: list[FileEntry] = []
        for entry in sorted(run.files, key=lambda entry: entry.path):
            other = seen.setdefault(names.fold(entry.path), entry.path)
            if other == entry.path:
                unique.append(entry)
            else:
                walk.warn(entry.path, names.REASON_COLLISION.format(other=other) + "; skipped")
        run.files = unique
    return kept


def walk_remote(
    remote: _Lister,
    remote_root: str,
    *,
    hostname: str | None = None,
    clock: Callable[[], float] = time.time,
    selection: RunSelection | None = None,
) -> WalkReport:
    """Walk the remote tree breadth-first and synthesise a FULL manifest of revision 0.

    With a ``selection``, top-level directories holding no selected run are not listed (the
    manifest then leaves their runs out; the client applies the selection to the rest).

    Raises ``OSError`` when the root itself cannot be listed. Everything else that could not
    be read is in ``WalkReport.warnings`` (and logged), and the walk goes on without it.
    """
    walk = _Walk(remote, remote_root, selection)
    runs = _without_twins(walk.run(), walk)
    tags = _read_tags(remote, walk.warnings)
    experiments: list[ExperimentEntry] = []
    for run in runs:
        files = sorted(run.files, key=lambda entry: entry.path)
        mtimes = [entry.mtime for entry in files]
        experiments.append(
            ExperimentEntry(
                run_id=run.run_id,
                project=run.project,
                name=run.name,
                status=layout.UNKNOWN_STATUS,
                created_at=min(mtimes, default=0.0),
                updated_at=max(mtimes, default=0.0),
                files=files,
                tags=tags.get(run.run_id),
                path=layout.run_path_of(run.project, run.name),
            )
        )
    experiments.sort(key=lambda exp: (exp.project, exp.name, exp.run_id))
    manifest = SyncManifest(
        manifest_type=ManifestType.FULL,
        revision=0,
        snapshot_id="",
        generated_at=clock(),
        server_hostname=hostname or socket.gethostname(),
        remote_root=posixpath.normpath(remote_root) if remote_root else remote_root,
        experiments=experiments,
        generator_version=LEGACY_GENERATOR,
        tail_hash_algorithm=None,
        tail_hash_window=None,
        problems=None,  # what the walk missed is in WalkReport.warnings (and blocks deletion)
    )
    # The walk filtered every name already; validating the result anyway keeps one rule
    # book (spec §3.9) between what a server publishes and what we synthesise.
    SyncManifest.from_dict(manifest.to_dict(), source=f"legacy walk of {remote_root}")
    warnings = sorted(walk.warnings)
    for line in warnings[:MAX_LOGGED_WARNINGS]:
        logger.warning("legacy walk skipped %s", line)
    if len(warnings) > MAX_LOGGED_WARNINGS:
        logger.warning("... and %d more paths skipped", len(warnings) - MAX_LOGGED_WARNINGS)
    logger.info(
        "legacy walk of %s: %d runs, %d files in %d listing rounds (%d directories)",
        remote_root,
        manifest.total_experiments,
        manifest.total_files,
        walk.levels,
        walk.directories,
    )
    return WalkReport(
        manifest=manifest,
        warnings=warnings,
        levels=walk.levels,
        directories=walk.directories,
        soft_deleted=walk.soft_deleted,
    )


def adopt_cached_mtimes(
    manifest: SyncManifest, local: Sequence[tuple[str, int, float, str | None]]
) -> int:
    """Let whole-second SFTP mtimes match the sub-second ones the cache recorded.

    SFTP v3 reports mtimes in whole seconds, while a manifest (and so the cache state)
    carries nanoseconds: without this, falling back from manifest to legacy sync would
    fetch every file again. A walked file whose size equals the recorded size and whose
    mtime is the recorded one truncated to the second takes the recorded mtime -- the
    same-second quick check rsync makes. Returns how many entries were adopted.
    """
    known = {path: (size, mtime) for path, size, mtime, _hash in local}
    adopted = 0
    for entry in manifest.iter_files():
        record = known.get(entry.path)
        if record is None or not entry.mtime.is_integer():
            continue
        size, mtime = record
        if size == entry.size and mtime != entry.mtime and int(mtime) == int(entry.mtime):
            entry.mtime = mtime
            adopted += 1
    return adopted


NEWLINE_WINDOW = 64 * 1024
"""How far back from its end an append-only file is searched for its last newline: a last
line longer than this is taken whole."""


def cut_at_last_newline(
    remote: Remote, manifest: SyncManifest, local: Sequence[tuple[str, int, float, str | None]]
) -> int:
    """Move the size of each append-only file that will be fetched back to just after its
    last newline, so that a line the trainer is still writing is never copied half; returns
    how many were cut. Files the cache holds at the walked size and mtime are not read. A
    tail that cannot be read leaves its size (the transfer then reports the file)."""
    known = {path: (size, mtime) for path, size, mtime, _hash in local}
    wanted = [
        entry
        for entry in manifest.iter_files()
        if entry.is_append_only
        and entry.size > 0
        and known.get(entry.path) != (entry.size, entry.mtime)
    ]
    if not wanted:
        return 0
    tails: dict[int, bytearray] = {}
    jobs = []
    for index, entry in enumerate(wanted):
        start = max(0, entry.size - NEWLINE_WINDOW)
        tails[index] = bytearray()

        def sink(_offset: int, data: bytes, buffer: bytearray = tails[index]) -> None:
            buffer += data

        jobs.append(FetchJob(entry.path, start, entry.size - start, sink, priority=1, tag=index))
    failed: set[int] = set()

    def on_result(result: FetchResult) -> None:
        if not result.ok:
            failed.add(result.job.tag)  # type: ignore[arg-type]

    remote.fetch(jobs, on_result, workers=1)
    cut = 0
    for index, entry in enumerate(wanted):
        if index in failed:
            continue
        tail = tails[index]
        newline = tail.rfind(b"\n")
        start = entry.size - len(tail)
        if newline >= 0:
            end = start + newline + 1
        elif start == 0:
            end = 0  # not one complete line yet
        else:
            continue  # a last line longer than the window: taken whole
        if end != entry.size:
            entry.size = end
            cut += 1
    return cut


def sync_legacy(
    client: ManifestSyncClient,
    report: WalkReport,
    cache: LocalCacheManager,
    progress_callback: Callable[[int, int, str], None] | None = None,
    *,
    refine: bool = True,
) -> SyncStats:
    """Apply a walk's manifest through the client's diff/transfer/state engine, then give
    the synced runs their real status (see :func:`refine_runs_from_cache`)."""
    local = cache.file_entries()
    adopted = adopt_cached_mtimes(report.manifest, local)
    if adopted:
        logger.debug("%d walked file(s) matched the cache at whole-second precision", adopted)
    cut = cut_at_last_newline(client.remote, report.manifest, local)
    if cut:
        logger.debug("%d append-only file(s) cut after their last complete line", cut)
    stats = client.sync_with_manifest(report.manifest, progress_callback=progress_callback)
    if refine:
        refine_runs_from_cache(cache, report.manifest)
    return stats


def refine_runs_from_cache(cache: LocalCacheManager, manifest: SyncManifest) -> int:
    """Record each walked run's status and creation time from its synced metadata files.

    The walk only knows ``unknown`` (reading every status.json over SFTP would cost a round
    trip per run); once the files are in the cache the answer is a local read away. Returns
    how many runs were updated.
    """
    from runicorn.sync.cache import RunRecord

    walked = {(e.project, e.name, e.run_id): e for e in manifest.experiments}
    records: dict[str, list[RunRecord]] = {}
    for cached in cache.list_runs():
        exp = walked.get((cached.project, cached.name, cached.run_id))
        if exp is None:
            continue
        meta = _read_cached_json(cache, exp.prefix + "meta.json")
        status = _read_cached_json(cache, exp.prefix + "status.json")
        records.setdefault(cached.remote_id, []).append(
            RunRecord(
                project=exp.project,
                name=exp.name,
                run_id=exp.run_id,
                status=layout.derive_status(status),
                created_at=layout.derive_created_at(meta, status, fallback=exp.created_at),
                updated_at=exp.updated_at,
                tags=tuple(exp.tags) if exp.tags else None,
                last_synced=None,
            )
        )
    for remote_id, runs in records.items():
        cache.save_runs(remote_id, runs)
    return sum(len(runs) for runs in records.values())


def _read_cached_json(cache: LocalCacheManager, relative_path: str) -> dict[str, Any] | None:
    """A cached metadata file as a JSON object; ``None`` if missing, a link or not JSON."""
    try:
        path = cache.path_for(relative_path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as handle:
        return layout.parse_json_object(handle.read(MAX_TAGS_BYTES))

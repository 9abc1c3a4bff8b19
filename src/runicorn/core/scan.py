"""Scan an experiments root: find the run directories and stat every file in them.

This pure-Python module is the specification of the scan; ``csrc/_native_scan.pyx`` is its
compiled twin and must return exactly the same result for the same tree.

The scan knows only the shapes of the two layouts, ``<project>/<name>/runs/<run_id>/`` and
``runs/<path...>/<run_id>/`` (see :mod:`runicorn.format.layout`); what the files mean is
decided by the caller. It never follows a
symbolic link, and it never aborts on one bad entry: problems are collected and returned
beside the result so that one unreadable run cannot hide the rest of the lab.

Every name it would list passes the name rule of :mod:`runicorn.format.names` first (valid
UTF-8, no control characters, not too long, not reserved by the client, not too deep): a name
that does not is reported and skipped, a directory with all that lies below it. Two paths of
one run that a case-insensitive client would store as one keep the first (see
:func:`_drop_collisions`). The walk below a run is iterative and stops at
:data:`~runicorn.format.names.MAX_DEPTH`, so no tree can exhaust a stack.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from runicorn.format import names as _names
from runicorn.format.layout import RUNS_DIRNAME, is_hidden, is_run_dir_listing, run_prefix

FileStat = tuple[str, int, int, int, int]
"""``(path_in_run, size, mtime_ns, ctime_ns, inode)``; ``path_in_run`` is POSIX, relative to
the run directory (``media/step_1.png``)."""

RunScan = tuple[str, str, str, list[FileStat]]
"""``(project, name, run_id, files)`` with ``files`` sorted by ``path_in_run``; a runs-path
run is ``("runs", path, run_id, files)`` (see :func:`runicorn.format.layout.run_path_of`)."""

Problem = tuple[str, str]
"""``(path relative to the root, reason)``."""

MAX_READ_BYTES = 64 * 1024
"""The largest file whose bytes a scan returns; larger ones are the caller's to read."""

REASON_SYMLINK = "symbolic link not followed"
REASON_NOT_A_DIRECTORY = "not a directory"
REASON_NOT_REGULAR = "not a regular file"
REASON_VANISHED = "vanished during the scan"

POLICY_REASONS = frozenset({REASON_SYMLINK, REASON_NOT_A_DIRECTORY, REASON_NOT_REGULAR})
"""Reasons that are the scan's rules, not gaps in what it read: a link is never followed and
a FIFO never listed, however often the scan runs. Every other problem (unreadable, vanished,
a name the rule refuses) means the scan saw less than the tree holds."""


def reason_unreadable(error: OSError) -> str:
    """The problem text for a directory or file that could not be read."""
    return f"unreadable: {os.strerror(error.errno)}" if error.errno else "unreadable"


class ScanResult(NamedTuple):
    runs: list[RunScan]
    """Sorted by ``(project, name, run_id)``."""
    problems: list[Problem]
    """Sorted by path; each one also a warning for the user."""
    contents: dict[str, bytes]
    """Bytes of the run-level files the caller asked for, by path relative to the root, in
    no particular order; a file larger than :data:`MAX_READ_BYTES`, or unreadable, is absent."""
    newest_mtime_ns: int | None
    """The newest ``mtime_ns`` among the records of ``runs`` (``None`` without any): the
    generator asks it of every scan, and the scan has each record at hand once."""


def _list_dir(path: str, rel: str, problems: list[Problem]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: entry.name)
    except FileNotFoundError:
        problems.append((rel, REASON_VANISHED))
    except NotADirectoryError:
        problems.append((rel, REASON_NOT_A_DIRECTORY))
    except OSError as error:
        problems.append((rel, reason_unreadable(error)))
    return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _subdirs(
    path: str, rel: str, problems: list[Problem], report_files: bool
) -> Iterator[tuple[str, str, str]]:
    """Yield ``(name, path, rel)`` of the visible subdirectories of a layout level."""
    return _subdirs_of(_list_dir(path, rel, problems), rel, problems, report_files)


def _subdirs_of(
    listing: list[os.DirEntry[str]], rel: str, problems: list[Problem], report_files: bool
) -> Iterator[tuple[str, str, str]]:
    """:func:`_subdirs` of a listing already read."""
    for entry in listing:
        if is_hidden(entry.name):
            continue
        child_rel = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_symlink():
            problems.append((child_rel, REASON_SYMLINK))
        elif _is_dir(entry):
            reason = _refused(entry.name, child_rel, not rel)
            if reason is None:
                yield entry.name, entry.path, child_rel
            else:
                problems.append((child_rel, reason))
        elif report_files:
            problems.append((child_rel, REASON_NOT_A_DIRECTORY))


def _refused(name: str, rel: str, top: bool = False) -> str | None:
    """Why the name rule refuses an entry (its name, then its path's depth and length)."""
    reason = _names.name_problem(name, top=top)
    if reason is None and len(rel) > _SHORT_PATH:
        reason = _names.depth_problem(rel.count("/") + 1, _utf8_length(rel))
    return reason


# getattr: the demo scans on a client, and Windows has none of these flags.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SHORT_PATH = min(_names.MAX_DEPTH * 2 - 2, _names.MAX_PATH_BYTES // 4)
"""A path of at most this many characters is within both path limits: no need to count."""


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _read_whole(path: str) -> bytes | None:
    """The bytes of a small regular file, or ``None`` when it is unreadable, larger than
    :data:`MAX_READ_BYTES` or no longer a regular file (never follows a link, never blocks
    on a FIFO that replaced it)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        remaining = MAX_READ_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if remaining <= 0 else b"".join(chunks)


def _scan_run_files(
    path: str,
    rel: str,
    prefix: str,
    files: list[FileStat],
    problems: list[Problem],
    read: Collection[str] = (),
    contents: dict[str, bytes] | None = None,
    listing: list[os.DirEntry[str]] | None = None,
) -> None:
    """Append a stat record for every regular file below a run directory (one lstat each),
    and the bytes of the files named in ``read`` (at the run's top) to ``contents``;
    ``listing`` is the directory's listing when the caller has already read it.

    Iterative: directories still to list wait on a stack, each with its path in the run."""
    pending: list[tuple[str, str, str, list[os.DirEntry[str]] | None]] = [
        (path, rel, prefix, listing)
    ]
    top = True
    while pending:
        path, rel, prefix, listing = pending.pop()
        for entry in _list_dir(path, rel, problems) if listing is None else listing:
            child_rel = f"{rel}/{entry.name}"
            in_run = prefix + entry.name
            reason = _refused(entry.name, child_rel)
            if reason is not None:
                problems.append((child_rel, reason))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                problems.append((child_rel, REASON_VANISHED))
                continue
            except OSError as error:
                problems.append((child_rel, reason_unreadable(error)))
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                files.append((in_run, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
                if (
                    top
                    and entry.name in read
                    and st.st_size <= MAX_READ_BYTES
                    and contents is not None
                ):
                    data = _read_whole(entry.path)
                    if data is not None:
                        contents[child_rel] = data
            elif stat.S_ISDIR(mode):
                pending.append((entry.path, child_rel, in_run + "/", None))
            elif stat.S_ISLNK(mode):
                problems.append((child_rel, REASON_SYMLINK))
            else:
                problems.append((child_rel, REASON_NOT_REGULAR))
        top = False


def _scan_project(
    root: str, project: str, read: frozenset[str]
) -> tuple[list[RunScan], list[Problem], dict[str, bytes], int | None]:
    newest: int | None = None
    runs: list[RunScan] = []
    problems: list[Problem] = []
    contents: dict[str, bytes] = {}
    project_path = os.path.join(root, project)
    for name, name_path, name_rel in _subdirs(project_path, project, problems, False):
        runs_path = os.path.join(name_path, RUNS_DIRNAME)
        runs_rel = f"{name_rel}/{RUNS_DIRNAME}"
        try:
            runs_st = os.lstat(runs_path)
        except FileNotFoundError:
            continue  # an experiment directory without runs yet
        except OSError as error:
            problems.append((runs_rel, reason_unreadable(error)))
            continue
        if stat.S_ISLNK(runs_st.st_mode):
            problems.append((runs_rel, REASON_SYMLINK))
            continue
        if not stat.S_ISDIR(runs_st.st_mode):
            problems.append((runs_rel, REASON_NOT_A_DIRECTORY))
            continue
        for run_id, run_path, run_rel in _subdirs(runs_path, runs_rel, problems, True):
            files: list[FileStat] = []
            _scan_run_files(run_path, run_rel, "", files, problems, read, contents)
            newest = _add_run(runs, (project, name, run_id, files), newest)
    return runs, problems, contents, newest


_Unit = tuple[bool, str]
"""One unit of a scan's work: ``(False, project)``, or ``(True, name)`` for the directory
``runs/<name>`` of the runs-path layout (a run, or the first component of runs' paths)."""


def _scan_unit(
    root: str, unit: _Unit, read: frozenset[str]
) -> tuple[list[RunScan], list[Problem], dict[str, bytes], int | None]:
    runs_path, name = unit
    if runs_path:
        return _scan_run_path_unit(root, name, read)
    return _scan_project(root, name, read)


def _add_run(
    runs: list[RunScan],
    run: RunScan,
    newest: int | None,
) -> int | None:
    """Append a run (its files sorted by name); return the newest mtime seen so far."""
    files = run[3]
    files.sort(key=lambda record: record[0])
    runs.append(run)
    if files:
        run_newest = max(record[2] for record in files)
        if newest is None or run_newest > newest:
            return run_newest
    return newest


def _scan_run_path_unit(
    root: str, name: str, read: frozenset[str]
) -> tuple[list[RunScan], list[Problem], dict[str, bytes], int | None]:
    """The runs-path layout below ``runs/<name>``, at any depth.

    A visible directory holding ``meta.json`` or ``status.json`` is a run (everything below
    it is its files); any other visible directory is a path component and is walked on.
    Regular files among path components are ignored silently, as at the project levels.
    Each directory of ``runs/`` is a unit of its own, so an SDK 0.6+ root, which holds all
    its runs in ``runs/``, is still scanned on several threads.
    """
    newest: int | None = None
    runs: list[RunScan] = []
    problems: list[Problem] = []
    contents: dict[str, bytes] = {}
    # (directory, its listing, rel, the run path it is) of directories not yet known to be
    # runs or path components: each directory is listed once
    rel = f"{RUNS_DIRNAME}/{name}"
    path = os.path.join(root, RUNS_DIRNAME, name)
    listing = _list_dir(path, rel, problems)
    if problems:
        return runs, problems, contents, newest  # unreadable or vanished
    pending = [(path, listing, rel, name, "")]
    while pending:
        path, listing, rel, name, run_path = pending.pop()
        if is_run_dir_listing({entry.name for entry in listing}):
            files: list[FileStat] = []
            _scan_run_files(path, rel, "", files, problems, read, contents, listing)
            newest = _add_run(runs, (RUNS_DIRNAME, run_path, name, files), newest)
            continue
        child_run_path = f"{run_path}/{name}" if run_path else name
        for child, child_path, child_rel in _subdirs_of(listing, rel, problems, False):
            reported = len(problems)
            child_listing = _list_dir(child_path, child_rel, problems)
            if len(problems) == reported:  # else unreadable or vanished: neither run nor path
                pending.append((child_path, child_listing, child_rel, child, child_run_path))
    return runs, problems, contents, newest


def _read_names(read: Collection[str]) -> frozenset[str]:
    """The names a run-level file can have among ``read`` (a ``/`` or NUL never matches)."""
    if isinstance(read, str) or not all(isinstance(name, str) for name in read):
        raise TypeError("read must be a collection of file names (str)")
    return frozenset(name for name in read if "/" not in name and "\0" not in name)


def scan_experiments(root: str, threads: int = 1, read: Collection[str] = ()) -> ScanResult:
    """Scan every run below ``root`` and stat each of its files once.

    Both layouts are scanned: ``<project>/<name>/runs/<run_id>/`` and, below a top-level
    ``runs`` directory (never a project), ``runs/<path...>/<run_id>/``, where a directory is a
    run when it holds ``meta.json`` or ``status.json``. Runs come sorted by
    ``(project, name, run_id)``, a runs-path run being ``("runs", path, run_id, files)``.

    Regular files at the root, in a project, in an experiment directory or among the path
    components below ``runs`` are ignored silently; a non-directory where a project-name
    ``runs`` or run directory should be, a symbolic link anywhere (never followed), an
    unreadable directory and a file that vanished mid-scan are reported as problems and
    skipped. Hidden names (leading dot) above the run level are skipped (``runs/.recycle``
    among them). With ``threads > 1`` projects are scanned concurrently (worth it on NFS or
    Lustre, where every stat is a network round trip); the result does not depend on it.

    ``read`` names run-level files (``meta.json``) whose bytes are returned too, read while
    their directory is at hand: a generation that needs them anyway saves a path lookup per
    file, and the compiled scan reads them on its threads without the GIL.

    Raises ``OSError`` when ``root`` itself cannot be listed: an empty result there would
    be a lie.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    names = _read_names(read)
    with os.scandir(root) as it:
        top = sorted(it, key=lambda entry: entry.name)
    problems: list[Problem] = []
    units: list[_Unit] = []
    for entry in top:
        if is_hidden(entry.name):
            continue
        if entry.is_symlink():
            problems.append((entry.name, REASON_SYMLINK))
        elif _is_dir(entry):
            reason = _names.name_problem(entry.name, top=True)
            if reason is None:
                units += _units_of(root, entry.name, problems)
            else:
                problems.append((entry.name, reason))
    if threads == 1 or len(units) < 2:
        parts = [_scan_unit(root, unit, names) for unit in units]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(lambda unit: _scan_unit(root, unit, names), units))
    runs: list[RunScan] = []
    contents: dict[str, bytes] = {}
    newest: int | None = None
    for project_runs, project_problems, project_contents, project_newest in parts:
        runs.extend(project_runs)
        problems.extend(project_problems)
        contents.update(project_contents)
        if project_newest is not None and (newest is None or project_newest > newest):
            newest = project_newest
    runs.sort(key=lambda run: (run[0], run[1], run[2]))  # the runs-path units interleave
    return _finish(runs, problems, contents, newest)


def _finish(
    runs: list[RunScan],
    problems: list[Problem],
    contents: dict[str, bytes],
    newest: int | None,
) -> ScanResult:
    """The result of a scan from its sorted runs: collisions dropped, problems sorted (the
    last step of both backends' scans)."""
    _drop_collisions(runs, problems)
    problems.sort()
    return ScanResult(runs, problems, contents, newest)


def _drop_collisions(runs: list[RunScan], problems: list[Problem]) -> None:
    """Remove, in place, every run and file whose path a case-insensitive or normalising
    client would store as one already listed (:func:`runicorn.format.names.fold`), and
    report each. Runs are taken in their sorted order and files in theirs: the first keeps
    its place, so the result does not depend on the order the tree was read in."""
    seen_runs: dict[str, str] = {}
    kept: list[RunScan] = []
    for run in runs:
        prefix = run_prefix(*run[:3])
        key = _names.fold(prefix)
        other = seen_runs.setdefault(key, prefix)
        if other != prefix:
            problems.append((prefix[:-1], _names.REASON_COLLISION.format(other=other[:-1])))
            continue
        kept.append(run)
        files = run[3]
        if len({_names.fold(record[0]) for record in files}) == len(files):
            continue  # the common case: no two paths of the run fold alike
        seen: dict[str, str] = {}
        unique: list[FileStat] = []
        for record in files:
            other = seen.setdefault(_names.fold(record[0]), record[0])
            if other == record[0]:
                unique.append(record)
            else:
                problems.append(
                    (prefix + record[0], _names.REASON_COLLISION.format(other=prefix + other))
                )
        files[:] = unique
    runs[:] = kept


def _units_of(root: str, top: str, problems: list[Problem]) -> list[_Unit]:
    """The units of work of a top-level directory: the project, or for ``runs`` each of its
    visible directories (listed here, once)."""
    if top != RUNS_DIRNAME:
        return [(False, top)]
    listing = _list_dir(os.path.join(root, RUNS_DIRNAME), RUNS_DIRNAME, problems)
    return [(True, name) for name, _, _ in _subdirs_of(listing, RUNS_DIRNAME, problems, False)]

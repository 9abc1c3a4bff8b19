"""Rescan parts of an experiments tree: the root's listing, one scope, or one run.

The long-running publisher keeps its last scan in memory and, told by inotify which
directories changed, rescans only those parts. A *scope* is a top-level entry of the root
(a project, or ``runs``) or an entry of ``runs/`` (``runs/<name>``), with everything below
it; every run and every problem of a full scan belongs to exactly one scope
(:func:`scope_of`). Each function here returns, for its part of the tree, exactly what
:func:`runicorn.core.scan.scan_experiments` returns for that part -- it is built from the
same helpers -- so a scan patched from them equals a full scan of the same tree.

One step of the full scan is not local: a run whose path a case-insensitive client would
store as an earlier run's is dropped (``_drop_collisions``). The functions here drop only
within a run (two files of one run that fold alike), and return those problems apart
(``collisions``), so the caller can drop them with the run when it loses to another.

Pure Python only: a rescan touches a few runs at a time, not the whole tree, and the
compiled twin's result is the same as the pure one's by the twin contract.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from typing import NamedTuple

from runicorn.core.scan import (
    REASON_SYMLINK,
    FileStat,
    Problem,
    RunScan,
    _add_run,
    _drop_collisions,
    _list_dir,
    _read_names,
    _refused,
    _scan_project,
    _scan_run_files,
    _scan_run_path_unit,
)
from runicorn.format import names as _names
from runicorn.format.layout import RUNS_DIRNAME, is_hidden, is_run_dir_listing, run_prefix

RunKey = tuple[str, str, str]
"""``(project, name, run_id)`` of a scanned run."""

COLLISION_PREFIX = _names.REASON_COLLISION.split("{", 1)[0]
"""How every collision problem's reason begins."""

Identity = tuple[int, int, bool]
"""``(st_dev, st_ino, is_symlink)`` of a scope's top entry: a scope whose entry was replaced
under the same name is scanned again."""


class ScopeScan(NamedTuple):
    """What a full scan finds in one scope."""

    runs: list[RunScan]
    problems: list[Problem]
    """Every problem but the collisions within runs."""
    contents: dict[str, bytes]
    collisions: dict[RunKey, list[Problem]]
    """Per run, its files dropped for folding like another of its files."""


class RunRescan(NamedTuple):
    """What a full scan finds for one run: its record and the problems below its directory."""

    run: RunScan
    problems: list[Problem]
    contents: dict[str, bytes]
    collisions: list[Problem]


def own_collisions(run: RunScan) -> list[Problem]:
    """Drop, in place, the files of ``run`` that fold like an earlier one of it; returns
    the problems the full scan reports for them."""
    problems: list[Problem] = []
    _drop_collisions([run], problems)
    return problems


def is_collision(problem: Problem) -> bool:
    return problem[1].startswith(COLLISION_PREFIX)


def scope_of(path: str) -> str:
    """The scope of a path relative to the root: its first component, or ``runs/<name>``
    below ``runs`` (``runs`` itself is a scope: the problems of its own listing)."""
    first, _, rest = path.partition("/")
    if first != RUNS_DIRNAME or not rest:
        return first
    return f"{RUNS_DIRNAME}/{rest.partition('/')[0]}"


def scope_of_run(project: str, name: str, run_id: str) -> str:
    """The scope of a scanned run (``(project, name, run_id)`` of a :data:`RunScan`)."""
    return scope_of(run_prefix(project, name, run_id))


def list_scopes(root: str) -> dict[str, Identity]:
    """Every scope of the tree now, with the identity of its top entry.

    The root's visible symbolic links and directories, and, when ``runs`` is a directory,
    those of ``runs/`` (regular files there are ignored, as by the full scan). Raises
    ``OSError`` when the root cannot be listed, as the full scan does.
    """
    scopes: dict[str, Identity] = {}
    with os.scandir(root) as top:
        entries = list(top)
    for entry in entries:
        identity = _identity(entry)
        if identity is None:
            continue
        scopes[entry.name] = identity
        if entry.name == RUNS_DIRNAME and not identity[2]:
            try:
                with os.scandir(entry.path) as below:
                    children = list(below)
            except OSError:
                continue  # the scope ``runs`` reports it
            for child in children:
                child_identity = _identity(child)
                if child_identity is not None:
                    scopes[f"{RUNS_DIRNAME}/{child.name}"] = child_identity
    return scopes


def _identity(entry: os.DirEntry[str]) -> Identity | None:
    """The identity of a visible symbolic link or directory; ``None`` for anything else."""
    if is_hidden(entry.name):
        return None
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return (st.st_dev, st.st_ino, True)
    if stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino, False)
    return None


def scan_scope(root: str, scope: str, read: Collection[str] = ()) -> ScopeScan:
    """The runs, problems and read contents a full scan finds in ``scope`` now (nothing
    when the scope's entry is gone or no longer a directory or link)."""
    names = _read_names(read)
    runs: list[RunScan] = []
    problems: list[Problem] = []
    contents: dict[str, bytes] = {}
    collisions: dict[RunKey, list[Problem]] = {}
    path = os.path.join(root, scope)
    below_runs = scope.startswith(RUNS_DIRNAME + "/")
    try:
        st = os.lstat(path)
    except OSError:
        return ScopeScan(runs, problems, contents, collisions)
    if stat.S_ISLNK(st.st_mode):
        problems.append((scope, REASON_SYMLINK))
        return ScopeScan(runs, problems, contents, collisions)
    if not stat.S_ISDIR(st.st_mode):
        return ScopeScan(runs, problems, contents, collisions)  # files there are ignored
    if below_runs:
        reason = _refused(scope.split("/", 1)[1], scope)
    else:
        reason = _names.name_problem(scope, top=True)
    if reason is not None:
        problems.append((scope, reason))
    elif scope == RUNS_DIRNAME:
        _list_dir(path, scope, problems)  # its own listing's problem, if any
    elif below_runs:
        runs, problems, contents, _ = _scan_run_path_unit(root, scope.split("/", 1)[1], names)
    else:
        runs, problems, contents, _ = _scan_project(root, scope, names)
    for run in runs:
        dropped = own_collisions(run)
        if dropped:
            collisions[(run[0], run[1], run[2])] = dropped
    return ScopeScan(runs, problems, contents, collisions)


def scan_run(root: str, run: RunKey, read: Collection[str] = ()) -> RunRescan | None:
    """The record and problems a full scan finds for the known run ``run`` now, or ``None``
    when only a rescan of its scope can tell (its directory is gone, no longer a directory,
    or -- below ``runs/`` -- no longer readable or no longer a run)."""
    project, name, run_id = run
    rel = run_prefix(project, name, run_id)[:-1]
    path = os.path.join(root, rel)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    names = _read_names(read)
    files: list[FileStat] = []
    problems: list[Problem] = []
    contents: dict[str, bytes] = {}
    if project == RUNS_DIRNAME:
        listing = _list_dir(path, rel, problems)
        if problems or not is_run_dir_listing({entry.name for entry in listing}):
            return None
        _scan_run_files(path, rel, "", files, problems, names, contents, listing)
    else:
        _scan_run_files(path, rel, "", files, problems, names, contents)
    runs: list[RunScan] = []
    _add_run(runs, (project, name, run_id, files), None)
    return RunRescan(runs[0], problems, contents, own_collisions(runs[0]))

"""The experiments tree as the last generation saw it, kept in memory by the publisher.

A one-shot generation scans the whole tree. The long-running publisher knows from inotify
which directories changed, so it keeps a :class:`LiveTree`: every run's manifest entry and
memos as last built, every scope's problems, and a digest of every run's scan records. A
generation then rescans only what changed (:meth:`LiveTree.refresh`) and rebuilds only the
runs whose records changed; everything else is reused as built.

The tree walks the whole root again when told to (:meth:`LiveTree.rescan`: lost events, a
replaced root, a rescan request, polling) and before its first generation. Anything that
fails half-way makes the next refresh a full walk too: the tree is never trusted half-updated.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import orjson
from blake3 import blake3

from runicorn.core.backend import Backend
from runicorn.core.memo import FileMemo
from runicorn.core.rescan import (
    Identity,
    RunKey,
    is_collision,
    list_scopes,
    scan_run,
    scan_scope,
    scope_of,
    scope_of_run,
)
from runicorn.core.scan import Problem, RunScan
from runicorn.format import layout
from runicorn.format import names as _names
from runicorn.format.layout import is_hidden
from runicorn.format.models import ExperimentEntry, ManifestType
from runicorn.format.published import LazyManifest
from runicorn.generate.state import STATE_VERSION, RunMemo

__all__ = [
    "AssembledManifest",
    "EncodedRuns",
    "LiveTree",
    "Refresh",
    "RunKey",
    "RunState",
    "pack_memos",
]


@dataclass(slots=True)
class RunState:
    """One run as last built: what a generation needs of it without rescanning it.

    Compact on purpose: at 100,000 runs the tree holds 850,000 file entries, which as
    objects (an entry, its path, size, time and hash each an object) take most of a gigabyte.
    The entry is kept as the JSON it is published as, the memos packed; only a run being
    rebuilt is unpacked.
    """

    scope: str
    fold: str
    """Its path as a case-insensitive client folds it (two runs folding alike: the first
    in sorted order is kept, as by the full scan)."""
    digest: bytes = b""
    """BLAKE3 of the run's scan records when it was built; empty: rebuild it next time."""
    scanned_ns: int = 0
    """When the scan that built it started: its memos' reuse boundary."""
    encoded: bytes | None = None
    """The run's manifest entry as published, without its tags and closing brace (tags
    change apart from the run), compressed with zlib (a quarter of the size; only the
    runs a manifest lists are inflated to assemble it); ``None`` when the run is
    soft-deleted or not listed."""
    status: str = ""
    updated_at: float = 0.0
    files: int = 0
    total_bytes: int = 0
    append_only: int = 0
    memos: bytes = b""
    """:func:`pack_memos` of the run's memo and its append-only files' memos."""

    def unpack_memos(self) -> tuple[RunMemo | None, list[tuple[str, FileMemo]]]:
        if not self.memos:
            return None, []
        run_memo, files = orjson.loads(self.memos)
        return (
            None
            if run_memo is None
            else RunMemo(_key(run_memo[0]), _key(run_memo[1]), run_memo[2], run_memo[3]),
            [
                (path, FileMemo((key[0], key[1], key[2], key[3]), size, tail_hash))
                for path, key, size, tail_hash in files
            ],
        )


def _key(value: list[int] | None) -> tuple[int, int, int, int] | None:
    return None if value is None else (value[0], value[1], value[2], value[3])


def pack_memos(run_memo: RunMemo | None, files: Iterable[tuple[str, FileMemo]]) -> bytes:
    """A run's memos as :attr:`RunState.memos` keeps them."""
    packed_run = (
        None
        if run_memo is None
        else [run_memo.meta_key, run_memo.status_key, run_memo.status, run_memo.created_at]
    )
    packed = orjson.dumps(
        [packed_run, [[path, m.key, m.recorded_size, m.tail_hash] for path, m in files]]
    )
    # orjson leaves its output in a buffer of at least 4 KB: copied, the tree keeps only
    # the bytes (at 100,000 runs, 350 MB less)
    return memoryview(packed).tobytes()


@dataclass
class Refresh:
    """What :meth:`LiveTree.refresh` found: the runs to build again, and what they need."""

    scan_started_ns: int
    dirty: list[tuple[RunScan, bytes]]
    """Runs new or changed since they were built, sorted, each with its records' digest."""
    contents: dict[str, bytes]
    """Metadata bytes read by the scan (see ``read`` of the scan functions)."""
    full_walk: bool
    rescanned_runs: int = 0
    """How many runs the refresh scanned (all of them on a full walk)."""


@dataclass
class LiveTree:
    """The tree of one root between generations; see the module docstring.

    :meth:`changed` and :meth:`rescan` record what a change source reported; the generator
    calls :meth:`refresh`, builds the dirty runs and hands them back with :meth:`store`.
    Not thread-safe: the publisher drives it from its one loop.
    """

    root: str
    settle_margin_ns: int
    """A run is reused only if its newest file is this much older than its last scan."""
    scope_walk_runs: int = 20_000
    """From this many runs on, a walk of the built tree goes scope by scope (see
    :meth:`_walk`)."""
    runs: dict[RunKey, RunState] = field(default_factory=dict)
    scopes: dict[str, Identity] = field(default_factory=dict)
    scope_problems: dict[str, list[Problem]] = field(default_factory=dict)
    scope_runs: dict[str, set[RunKey]] = field(default_factory=dict)
    _by_rel: dict[str, RunKey] = field(default_factory=dict)
    _collisions: dict[RunKey, list[Problem]] = field(default_factory=dict)
    """Per run, the problems of its files dropped for folding like another of its files."""
    _order: list[RunKey] | None = None
    """The runs kept, sorted (``None``: to be recomputed, with :attr:`_losers`)."""
    _losers: list[Problem] = field(default_factory=list)
    """The problems of the runs dropped for folding like an earlier run."""
    _pending: set[str] = field(default_factory=set)
    _full: bool = True
    full_walk_at: float | None = None
    """``time.monotonic()`` of the last full walk, ``None`` before the first."""
    memo_saved: dict[str, int] = field(default_factory=dict)
    """Per state file, the ``scan_started_ns`` of the memos last written there."""
    memo_saved_at: dict[str, float] = field(default_factory=dict)
    logged_problems: list[Problem] | None = None
    """The problems last logged: a generation logs them only when they change."""

    # -- what changed --------------------------------------------------------------------

    def changed(self, directories: Iterable[str]) -> None:
        """Directories (relative to the root, ``""`` the root) in which something changed."""
        self._pending.update(directories)

    def rescan(self) -> None:
        """Walk the whole tree at the next refresh (anything may have changed)."""
        self._full = True
        self._pending.clear()

    @property
    def seeded(self) -> bool:
        return self.full_walk_at is not None

    @property
    def walk_pending(self) -> bool:
        return self._full

    # -- refreshing ----------------------------------------------------------------------

    def refresh(self, backend: Backend, threads: int, read: Collection[str]) -> Refresh:
        """Rescan what changed (everything on a full walk) and return the runs to rebuild.

        Runs gone from the tree are dropped here; a run whose records are unchanged and
        whose files all predate its last scan by :attr:`settle_margin_ns` is not dirty.
        Raises ``OSError`` when the root cannot be listed.
        """
        started_ns = time.time_ns()
        if self._full:
            # Taken first: changes reported while the walk runs are for the next refresh.
            self._full = False
            self._pending.clear()
            try:
                dirty, contents, rescanned = self._walk(backend, threads, read)
            except BaseException:
                self._full = True
                raise
            full = True
        else:
            pending, self._pending = self._pending, set()
            try:
                found, contents, rescanned = self._patch(pending, read)
            except BaseException:
                self._full = True
                raise
            dirty = [item for run in found if (item := self._dirty(run)) is not None]
            full = False
        dirty.sort(key=lambda item: item[0][:3])
        return Refresh(started_ns, dirty, contents, full, rescanned)

    def _dirty(self, run: RunScan) -> tuple[RunScan, bytes] | None:
        """``run`` with the digest of its records, or ``None`` when it is as last built."""
        records = run[3]
        digest = blake3(orjson.dumps(records)).digest()
        known = self.runs.get((run[0], run[1], run[2]))
        if known is not None and known.digest == digest:
            newest = max((record[2] for record in records), default=None)
            if newest is None or newest < known.scanned_ns - self.settle_margin_ns:
                return None
        return run, digest

    def _walk(
        self, backend: Backend, threads: int, read: Collection[str]
    ) -> tuple[list[tuple[RunScan, bytes]], dict[str, bytes], int]:
        """Scan the whole tree, file every run and problem under its scope, and return the
        dirty runs (see :meth:`_dirty`).

        A large tree already built is walked scope by scope (pure Python, about 1.8 times
        the compiled scan's CPU): the compiled scan returns every record at once, and at
        100,000 runs those records beside the tree would pass a gigabyte. Only dirty runs'
        records are kept."""
        scopes = list_scopes(self.root)
        if self.seeded and len(self.runs) >= self.scope_walk_runs:
            keys, dirty, scope_problems, contents, collisions = self._walk_scopes(scopes, read)
        else:
            scan = backend.scan_experiments(self.root, threads, read)
            runs, contents = scan.runs, scan.contents
            by_rel = {layout.run_prefix(*run[:3])[:-1]: (run[0], run[1], run[2]) for run in runs}
            scope_problems = {}
            collisions = {}
            walked = False
            for problem in scan.problems:
                if not is_collision(problem):
                    scope_problems.setdefault(scope_of(problem[0]), []).append(problem)
                    continue
                key = _containing(by_rel, problem[0])
                if key is None or problem[0] == layout.run_prefix(*key)[:-1]:
                    # A run dropped for folding like another: the full scan keeps no record
                    # of it, and the tree needs one (it is listed when the other goes).
                    # Collisions are rare: walk the scopes one by one, keeping every run.
                    del runs, by_rel, scan
                    keys, dirty, scope_problems, contents, collisions = self._walk_scopes(
                        scopes, read
                    )
                    walked = True
                    break
                collisions.setdefault(key, []).append(problem)
            if not walked:
                keys = [(run[0], run[1], run[2]) for run in runs]
                dirty = [item for run in runs if (item := self._dirty(run)) is not None]
        self.scopes = scopes
        self.scope_problems = scope_problems
        self._collisions = collisions
        found_keys = set(keys)
        self.scope_runs = {}
        for key in keys:
            scope = scope_of_run(*key)
            self.scope_runs.setdefault(scope, set()).add(key)
            self._place(key, scope)
        for key in [key for key in self.runs if key not in found_keys]:
            self._drop(key)
        self.full_walk_at = time.monotonic()
        return dirty, contents, len(keys)

    def _walk_scopes(
        self, scopes: dict[str, Identity], read: Collection[str]
    ) -> tuple[
        list[RunKey],
        list[tuple[RunScan, bytes]],
        dict[str, list[Problem]],
        dict[str, bytes],
        dict[RunKey, list[Problem]],
    ]:
        """The whole tree scanned scope by scope (no run dropped for folding like another):
        every run's key, the dirty runs, and the problems, contents and collisions."""
        keys: list[RunKey] = []
        dirty: list[tuple[RunScan, bytes]] = []
        problems: dict[str, list[Problem]] = {}
        contents: dict[str, bytes] = {}
        collisions: dict[RunKey, list[Problem]] = {}
        for scope in sorted(scopes):
            result = scan_scope(self.root, scope, read)
            for run in result.runs:
                keys.append((run[0], run[1], run[2]))
                item = self._dirty(run)
                if item is not None:
                    dirty.append(item)
            if result.problems:
                problems[scope] = result.problems
            contents.update(result.contents)
            collisions.update(result.collisions)
        return keys, dirty, problems, contents, collisions

    def _patch(
        self, pending: set[str], read: Collection[str]
    ) -> tuple[list[RunScan], dict[str, bytes], int]:
        """Rescan the scopes and runs the changed directories lie in."""
        scopes_to_scan: set[str] = set()
        runs_to_scan: set[RunKey] = set()
        experiments: set[tuple[str, str]] = set()
        if "" in pending or layout.RUNS_DIRNAME in pending:
            scopes_to_scan |= self._relist_root()
        for rel in pending:
            if not rel or rel == layout.RUNS_DIRNAME:
                continue
            key = self._run_containing(rel)
            if key is not None:
                runs_to_scan.add(key)
                continue
            experiment = self._experiment_of(rel)
            if experiment is not None:
                experiments.add(experiment)
            else:
                scopes_to_scan.add(scope_of(rel))
        found: list[RunScan] = []
        contents: dict[str, bytes] = {}
        for scope, name in sorted(experiments):
            if scope in scopes_to_scan:
                continue
            new = self._relist_experiment(scope, name)
            if new is None:
                scopes_to_scan.add(scope)
                continue
            for key in new:
                rescan = scan_run(self.root, key, read)
                if rescan is None:
                    scopes_to_scan.add(scope)
                    break
                self._place(key, scope)
                self.scope_runs.setdefault(scope, set()).add(key)
                problems = self.scope_problems.get(scope, []) + rescan.problems
                problems.sort()
                self._set_problems(scope, problems)
                self._set_collisions(key, rescan.collisions)
                contents.update(rescan.contents)
                found.append(rescan.run)
        for key in sorted(runs_to_scan):
            state = self.runs.get(key)
            if state is None or state.scope in scopes_to_scan:
                continue
            rescan = scan_run(self.root, key, read)
            if rescan is None:
                scopes_to_scan.add(state.scope)
                continue
            prefix = layout.run_prefix(*key)
            rel = prefix[:-1]
            problems = [
                p for p in self.scope_problems.get(state.scope, []) if not _below(p[0], rel)
            ]
            problems.extend(rescan.problems)
            problems.sort()
            self._set_problems(state.scope, problems)
            self._set_collisions(key, rescan.collisions)
            contents.update(rescan.contents)
            found.append(rescan.run)
        if any(scope not in self.scopes for scope in scopes_to_scan):
            scopes_to_scan |= self._relist_root()  # a scope whose root event is still queued
        found = [
            run
            for run in found
            if (state := self.runs.get(run[:3])) is not None and state.scope not in scopes_to_scan
        ]
        for scope in sorted(scopes_to_scan):
            found.extend(self._rescan_scope(scope, read, contents))
        return found, contents, len(found)

    def _experiment_of(self, rel: str) -> tuple[str, str] | None:
        """``(project, name)`` when ``rel`` is the ``runs`` directory of an experiment of the
        project layout, or a directory right in it: a run created there is found by listing
        that directory, not by scanning the whole project (15,000 runs in a project of a
        100,000-run lab)."""
        parts = rel.split("/")
        if len(parts) not in (3, 4) or parts[2] != layout.RUNS_DIRNAME:
            return None
        scope = parts[0]
        if scope == layout.RUNS_DIRNAME or scope not in self.scopes:
            return None
        return scope, parts[1]

    def _relist_experiment(self, scope: str, name: str) -> list[RunKey] | None:
        """List ``<scope>/<name>/runs`` again: its new runs, sorted, to be scanned. ``None``
        when only a rescan of the project can tell what the full scan would find: the
        experiment is new to the tree, a run is gone, two runs differ only in case, or the
        listing holds anything but directories the name rule accepts."""
        known = {key for key in self.scope_runs.get(scope, ()) if key[1] == name}
        if not known:
            return None
        runs_rel = f"{scope}/{name}/{layout.RUNS_DIRNAME}"
        ids: set[str] = set()
        try:
            st = os.lstat(os.path.join(self.root, runs_rel))
            if not stat.S_ISDIR(st.st_mode):
                return None
            with os.scandir(os.path.join(self.root, runs_rel)) as entries:
                for entry in entries:
                    if is_hidden(entry.name):
                        continue
                    if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                        return None
                    rel = f"{runs_rel}/{entry.name}"
                    if _names.name_problem(entry.name) is not None or (
                        _names.depth_problem(rel.count("/") + 1, len(rel.encode())) is not None
                    ):
                        return None
                    ids.add(entry.name)
        except OSError:
            return None
        present = {(scope, name, run_id) for run_id in ids}
        if not known <= present or len({_names.fold(run_id) for run_id in ids}) != len(ids):
            return None  # a run gone may uncover its case twin: the project's scan decides
        return sorted(present - known)

    def _relist_root(self) -> set[str]:
        """List the root again: scopes gone are dropped; new or replaced ones (and
        ``runs``, whose listing problems live in its scope) are returned to be scanned."""
        scopes = list_scopes(self.root)
        known = self.scopes
        to_scan = {scope for scope, identity in scopes.items() if known.get(scope) != identity}
        if layout.RUNS_DIRNAME in scopes:
            to_scan.add(layout.RUNS_DIRNAME)
        for scope in [scope for scope in self.scopes if scope not in scopes]:
            self._forget_scope(scope)
        self.scopes = scopes
        return to_scan

    def _rescan_scope(
        self, scope: str, read: Collection[str], contents: dict[str, bytes]
    ) -> list[RunScan]:
        """Scan a whole scope again; its runs no longer there are dropped."""
        if scope not in self.scopes:
            self._forget_scope(scope)  # gone, or below a ``runs`` that is not a directory
            return []
        result = scan_scope(self.root, scope, read)
        self._set_problems(scope, result.problems)
        keys = {(run[0], run[1], run[2]) for run in result.runs}
        for key in self.scope_runs.get(scope, set()) - keys:
            self._drop(key)
        self.scope_runs[scope] = keys
        for key in keys:
            self._place(key, scope)
            self._set_collisions(key, result.collisions.get(key, []))
        contents.update(result.contents)
        return result.runs

    def _forget_scope(self, scope: str) -> None:
        for key in self.scope_runs.pop(scope, set()):
            self._drop(key)
        self.scope_problems.pop(scope, None)

    def _set_problems(self, scope: str, problems: list[Problem]) -> None:
        if problems:
            self.scope_problems[scope] = problems
        else:
            self.scope_problems.pop(scope, None)

    def _set_collisions(self, key: RunKey, problems: list[Problem]) -> None:
        if problems:
            self._collisions[key] = problems
        else:
            self._collisions.pop(key, None)

    def _place(self, key: RunKey, scope: str) -> None:
        if key not in self.runs:
            prefix = layout.run_prefix(*key)
            self.runs[key] = RunState(scope, _names.fold(prefix))
            self._by_rel[prefix[:-1]] = key
            self._order = None

    def _drop(self, key: RunKey) -> None:
        state = self.runs.pop(key, None)
        if state is None:
            return
        self._collisions.pop(key, None)
        self._by_rel.pop(layout.run_prefix(*key)[:-1], None)
        self.scope_runs.get(state.scope, set()).discard(key)
        self._order = None

    def _run_containing(self, rel: str) -> RunKey | None:
        """The known run whose directory is ``rel`` or holds it."""
        return _containing(self._by_rel, rel)

    # -- built runs ----------------------------------------------------------------------

    def store(
        self,
        key: RunKey,
        digest: bytes,
        scanned_ns: int,
        entry: ExperimentEntry | None,
        encoded: bytes | None,
        memos: bytes,
    ) -> None:
        """Remember a run as just built (an empty ``digest`` makes it dirty next time):
        ``encoded`` is its entry as published, ``memos`` :func:`pack_memos` of its memos."""
        state = self.runs.get(key)
        if state is None:
            return
        state.digest = digest
        state.scanned_ns = scanned_ns
        state.memos = memos
        if entry is None or encoded is None:
            state.encoded = None
            return
        state.encoded = encoded
        state.status = entry.status
        state.updated_at = entry.updated_at
        state.files = len(entry.files)
        state.total_bytes = sum(f.size for f in entry.files)
        state.append_only = sum(f.is_append_only for f in entry.files)

    def problems(self) -> list[Problem]:
        """Every problem of the tree, sorted, as a full scan reports them."""
        order = self._kept()
        problems = [p for scope_problems in self.scope_problems.values() for p in scope_problems]
        problems.extend(self._losers)
        if self._collisions:
            kept = set(order)
            for key, dropped in self._collisions.items():
                if key in kept:
                    problems.extend(dropped)
        problems.sort()
        return problems

    def ordered(self) -> list[tuple[RunKey, RunState]]:
        """Every run the full scan keeps, sorted as it sorts them."""
        runs = self.runs
        return [(key, runs[key]) for key in self._kept()]

    def _kept(self) -> list[RunKey]:
        """The runs sorted, without those folding like an earlier one (recomputed when
        runs come or go)."""
        if self._order is not None:
            return self._order
        order: list[RunKey] = []
        losers: list[Problem] = []
        seen: dict[str, RunKey] = {}
        for key in sorted(self.runs):
            other = seen.setdefault(self.runs[key].fold, key)
            if other == key:
                order.append(key)
            else:
                rel, other_rel = layout.run_prefix(*key)[:-1], layout.run_prefix(*other)[:-1]
                losers.append((rel, _names.REASON_COLLISION.format(other=other_rel)))
        self._order, self._losers = order, losers
        return order

    def memo_boundary_ns(self) -> int:
        """The oldest scan any run was built from: a reuse boundary valid for every memo."""
        return min((s.scanned_ns for s in self.runs.values() if s.scanned_ns), default=0)

    def encode_memos(self, scan_started_ns: int) -> bytes:
        """The memo file (:meth:`GeneratorState.encode_memos`) of every run's memos, encoded
        run by run and joined: a 100,000-run tree never has them all as objects at once."""
        files: list[bytes] = []
        runs: list[bytes] = []
        for key, state in self.runs.items():
            run_memo, file_memos = state.unpack_memos()
            if file_memos:
                encoded = {path: [m.key, m.recorded_size, m.tail_hash] for path, m in file_memos}
                files.append(orjson.dumps(encoded)[1:-1])
            if run_memo is not None:
                memo = (
                    run_memo.meta_key,
                    run_memo.status_key,
                    run_memo.status,
                    run_memo.created_at,
                )
                runs.append(orjson.dumps({layout.run_prefix(*key): memo})[1:-1])
        head = orjson.dumps({"state_version": STATE_VERSION, "scan_started_ns": scan_started_ns})
        return b"".join(
            [head[:-1], b',"files":{', b",".join(files), b'},"runs":{', b",".join(runs), b"}}"]
        )


def _containing(by_rel: dict[str, RunKey], rel: str) -> RunKey | None:
    """The run of ``by_rel`` (runs by directory) whose directory is ``rel`` or holds it."""
    path = rel
    while path:
        key = by_rel.get(path)
        if key is not None:
            return key
        path = os.path.dirname(path)
    return None


def _below(path: str, rel: str) -> bool:
    """Whether ``path`` is ``rel`` or lies below it."""
    return path == rel or path.startswith(rel + "/")


class AssembledManifest(LazyManifest):
    """A manifest assembled from the tree's encoded runs (:class:`EncodedRuns`).

    Its statistics were counted while it was assembled and its experiments are decoded
    from the encoded array only when asked for (:class:`LazyManifest`): the publisher reads
    the header and the statistics, and at 100,000 runs the objects would take most of a
    gigabyte.
    """

    __slots__ = ()

    def __init__(
        self,
        manifest_type: ManifestType,
        generated_at: float,
        server_hostname: str,
        remote_root: str,
        array: bytes,
        totals: tuple[int, int, int],
    ) -> None:
        """``array``: the experiments as published (a JSON array); ``totals``: how many
        experiments, files and bytes it lists. Revision and snapshot are decided later."""
        LazyManifest.__init__(
            self,
            array,
            totals,
            manifest_type=manifest_type,
            revision=0,
            snapshot_id="",
            generated_at=generated_at,
            server_hostname=server_hostname,
            remote_root=remote_root,
        )


class EncodedRuns:
    """An experiments array joined from the tree's encoded runs (:attr:`RunState.encoded`),
    counting what it lists as it goes, so a manifest gets its statistics without a run
    being decoded."""

    __slots__ = ("_pieces", "append_only", "experiments", "files", "total_bytes")

    def __init__(self) -> None:
        self._pieces = [b"["]
        self.experiments = self.files = self.total_bytes = self.append_only = 0

    def add(self, encoded: bytes, tags: list[str] | None, state: RunState) -> None:
        """One run: its entry as the tree encoded it, then its tags and the closing brace
        (tags are kept apart: they change without the run changing)."""
        pieces = self._pieces
        if self.experiments:
            pieces.append(b",")
        pieces.append(zlib.decompress(encoded))
        pieces.append(b',"tags":' + orjson.dumps(tags) + b"}" if tags else b"}")
        self.experiments += 1
        self.files += state.files
        self.total_bytes += state.total_bytes
        self.append_only += state.append_only

    def manifest(
        self,
        manifest_type: ManifestType,
        generated_at: float,
        server_hostname: str,
        remote_root: str,
    ) -> tuple[AssembledManifest, bytes]:
        """The manifest listing the runs added, and its experiments array as published.
        Ends this array: its pieces are let go once joined."""
        self._pieces.append(b"]")
        array = b"".join(self._pieces)
        self._pieces = []
        totals = (self.experiments, self.files, self.total_bytes)
        manifest = AssembledManifest(
            manifest_type, generated_at, server_hostname, remote_root, array, totals
        )
        return manifest, array

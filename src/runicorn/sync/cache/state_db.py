"""The cache's sync state: what was synced, kept in one SQLite database (WAL).

The state lives in SQLite because a sync saves it incrementally (a commit every few files),
and a transaction either happened or did not: a sync killed at any point resumes from the
last commit without re-fetching finished files. File paths in the database are relative to
the cache root, as the manifest lists them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from runicorn.format.layout import run_prefix

if TYPE_CHECKING:
    from runicorn.core.diff import LocalEntry

STATE_DB_NAME = "state.sqlite3"
SCHEMA_VERSION = 1

_IN_CHUNK = 500
"""Paths per ``IN (...)`` lookup: well under SQLite's limit on bound parameters."""


class CacheError(Exception):
    """The local cache failed (its state database, its directory, its lock), not the server.

    Deliberately neither ``OSError`` nor ``ValueError``: those mean the manifest could not
    be read or was refused, and a service falls back to the legacy walk on them, which
    would only meet the same broken cache after a full walk of the server.
    """


def _cache_error(db_path: Path, error: sqlite3.Error) -> CacheError:
    text = str(error) or type(error).__name__
    hint = ""
    if "disk I/O" in text or "full" in text:
        hint = " (a full disk, or a file system without the locking SQLite needs)"
    elif "readonly" in text or "read-only" in text or "unable to open" in text:
        hint = " (check that the cache directory is writable by this user)"
    return CacheError(f"the cache's state database {db_path} failed: {text}{hint}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    tail_hash TEXT,
    synced_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_run_status ON files (path, size, mtime, tail_hash)
    WHERE substr(path, -12) = '/status.json';
CREATE TABLE IF NOT EXISTS runs (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    tags TEXT,
    last_synced REAL,
    PRIMARY KEY (project, name, run_id)
);
CREATE INDEX IF NOT EXISTS runs_by_id ON runs (run_id);
CREATE TABLE IF NOT EXISTS failed_files (
    path TEXT PRIMARY KEY,
    remote_id TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_attempt REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remotes (
    remote_id TEXT PRIMARY KEY,
    last_sync REAL,
    last_outcome TEXT
);
CREATE TABLE IF NOT EXISTS run_digests (
    prefix TEXT PRIMARY KEY,
    remote_id TEXT NOT NULL,
    digest BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_manifests (
    remote_id TEXT NOT NULL,
    manifest_type TEXT NOT NULL,
    revision INTEGER NOT NULL,
    snapshot_id TEXT NOT NULL,
    generated_at REAL NOT NULL,
    clean INTEGER NOT NULL,
    vanished INTEGER NOT NULL DEFAULT 0,
    applied_at REAL NOT NULL,
    PRIMARY KEY (remote_id, manifest_type)
);
"""


@dataclass(frozen=True)
class CachedRun:
    """One run in the cache, as a UI lists it."""

    project: str
    name: str
    run_id: str
    status: str
    last_synced: float | None
    path: Path
    size: int
    """Bytes of the run's synced files, as recorded."""
    created_at: float = 0.0
    updated_at: float = 0.0
    tags: tuple[str, ...] = ()
    remote_id: str = ""


@dataclass(frozen=True)
class RunRecord:
    """What a sync writes about a run (from a manifest's experiment entry)."""

    project: str
    name: str
    run_id: str
    status: str
    created_at: float
    updated_at: float
    tags: tuple[str, ...] | None
    last_synced: float | None
    """``None`` keeps the previous value (the run still has files pending)."""


SyncedRow = tuple[str, int, float, "str | None"]
"""A synced file as :meth:`StateDatabase.save_progress` takes it: ``(path, size, mtime,
tail_hash)``, what :class:`FileRecord` is."""


class FileRecord(NamedTuple):
    """One synced file: it is on disk at ``path`` with this size, mtime and tail hash (a
    tuple: a cold sync records a million of them)."""

    path: str
    size: int
    mtime: float
    tail_hash: str | None


@dataclass(frozen=True)
class FailedFile:
    """A file a sync could not fetch, kept so the next sync retries it and a UI can say why."""

    path: str
    remote_id: str
    error: str
    attempts: int
    last_attempt: float


@dataclass(frozen=True)
class AppliedManifest:
    """The last manifest of one type a sync applied from a remote."""

    remote_id: str
    manifest_type: str
    revision: int
    snapshot_id: str
    generated_at: float
    clean: bool
    """False when some files failed: the same revision must be applied again."""
    applied_at: float
    vanished: int = 0
    """Cached runs of this remote the manifest did not list and that were kept."""


RunKey = tuple[str, str, str]
"""``(project, name, run_id)`` of a run."""


def _run_key(path: str, runs: dict[str, RunKey]) -> RunKey | None:
    """``(project, name, run_id)`` of a mirrored file path, or ``None`` off every run.

    ``runs`` maps run prefixes (:func:`run_prefix`) to keys: a runs-path run's depth is not
    fixed, so the path's directory prefixes are looked up, shortest first.
    """
    end = path.find("/")
    while end >= 0:
        key = runs.get(path[: end + 1])
        if key is not None:
            return key
        end = path.find("/", end + 1)
    return None


def _cached_run(
    row: tuple[Any, ...], sizes: dict[RunKey, int], run_path: Callable[[str, str, str], Path]
) -> CachedRun:
    project, name, run_id, status, last_synced, created, updated, tags, remote_id = row
    return CachedRun(
        project=project,
        name=name,
        run_id=run_id,
        status=status,
        last_synced=last_synced,
        path=run_path(project, name, run_id),
        size=sizes.get((project, name, run_id), 0),
        created_at=created,
        updated_at=updated,
        tags=tuple(orjson.loads(tags)) if tags else (),
        remote_id=remote_id,
    )


class StateDatabase:
    """The SQLite state of one cache: synced files, runs, failures, applied manifests.

    Safe to share between threads (one connection behind a lock). The database is created
    on the first write, after ``prepare`` has made its directory; reads of a cache that has
    none return nothing, so a dry run against a new cache writes nothing.
    """

    def __init__(self, db_path: Path, *, prepare: Callable[[], None]) -> None:
        self.db_path = db_path
        self._prepare = prepare
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._no_failures = False
        """Set when ``failed_files`` is known empty: a commit of synced files then skips
        deleting their (absent) failures. Known only within one sync (another process's
        sync may record failures between two): :meth:`set_dirty` forgets it."""

    # -- connection -----------------------------------------------------------------------

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        try:
            return self._open(create=create)
        except sqlite3.Error as error:
            raise _cache_error(self.db_path, error) from error

    def _open(self, *, create: bool) -> sqlite3.Connection | None:
        with self._lock:
            if self._conn is not None:
                return self._conn
            if not create and not self.db_path.exists():
                return None
            if create:
                self._prepare()
            conn = sqlite3.connect(
                self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            self._conn = conn
            return conn

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connect(create=False)
            if conn is None:
                return []
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                raise _cache_error(self.db_path, error) from error

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of state changes: all of them land, or none do."""
        with self._lock:
            conn = self._connect(create=True)
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise _cache_error(self.db_path, error) from error
            try:
                yield conn
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _cache_error(self.db_path, error) from error
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _cache_error(self.db_path, error) from error

    def exists(self) -> bool:
        """Whether the database is there (opening it if so); never creates it."""
        return self._connect(create=False) is not None

    def close(self) -> None:
        self._no_failures = False
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- runs -------------------------------------------------------------------------------

    def list_runs(self, run_path: Callable[[str, str, str], Path]) -> list[CachedRun]:
        """Every recorded run with the bytes of its recorded files; ``run_path`` says where
        the tree keeps a run (``project, name, run_id`` to its directory)."""
        rows = self._read(
            "SELECT project, name, run_id, status, last_synced, created_at, updated_at, tags,"
            " remote_id FROM runs ORDER BY project, name, run_id"
        )
        prefixes = {run_prefix(*row[:3]): (row[0], row[1], row[2]) for row in rows}
        sizes: dict[RunKey, int] = {}
        for path, size in self._read("SELECT path, size FROM files"):
            key = _run_key(path, prefixes)
            if key is not None:
                sizes[key] = sizes.get(key, 0) + size
        return [_cached_run(row, sizes, run_path) for row in rows]

    def save_runs(self, remote_id: str, runs: Sequence[RunRecord]) -> None:
        """Insert or update runs from a manifest; ``last_synced=None`` keeps the old value."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO runs (project, name, run_id, remote_id, status, created_at,"
                " updated_at, tags, last_synced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (project, name, run_id) DO UPDATE SET"
                " remote_id = excluded.remote_id, status = excluded.status,"
                " created_at = excluded.created_at, updated_at = excluded.updated_at,"
                " tags = excluded.tags,"
                " last_synced = COALESCE(excluded.last_synced, runs.last_synced)",
                [
                    (
                        r.project,
                        r.name,
                        r.run_id,
                        remote_id,
                        r.status,
                        r.created_at,
                        r.updated_at,
                        orjson.dumps(list(r.tags)).decode() if r.tags else None,
                        r.last_synced,
                    )
                    for r in runs
                ],
            )

    def forget_run(self, project: str, name: str, run_id: str) -> bool:
        """Drop a run and the records of every file and failure under its directory;
        ``False`` when the run was not recorded. Never creates the database."""
        if not self.exists():
            return False
        # An exact, case-sensitive prefix as a range of the path index: SQL LIKE folds ASCII
        # case (it dropped P/E/runs/R1's records with p/e/runs/r1's). The prefix ends in
        # "/", and "0" follows "/": exactly the paths starting with it sort in between.
        prefix = run_prefix(project, name, run_id)
        under = (prefix, prefix[:-1] + "0")
        with self.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM runs WHERE project = ? AND name = ? AND run_id = ?",
                (project, name, run_id),
            ).rowcount
            conn.execute("DELETE FROM files WHERE path >= ? AND path < ?", under)
            conn.execute("DELETE FROM failed_files WHERE path >= ? AND path < ?", under)
            conn.execute("DELETE FROM run_digests WHERE prefix = ?", (prefix,))
        return deleted > 0

    def run_digests(self, remote_id: str) -> dict[str, bytes]:
        """Per run prefix, the digest of the run's manifest JSON as a sync last applied it
        cleanly from ``remote_id`` (:func:`runicorn.format.models.run_digest`)."""
        return {
            str(prefix): bytes(digest)
            for prefix, digest in self._read(
                "SELECT prefix, digest FROM run_digests WHERE remote_id = ?", (remote_id,)
            )
        }

    def save_run_digests(
        self,
        remote_id: str,
        digests: dict[str, bytes],
        *,
        forget: Iterable[str] = (),
        replace_all: bool = False,
    ) -> None:
        """Record ``digests`` and forget those of the runs ``forget``; ``replace_all``: the
        remote's other digests are forgotten too (a full manifest was applied)."""
        with self.transaction() as conn:
            if replace_all:
                conn.execute("DELETE FROM run_digests WHERE remote_id = ?", (remote_id,))
            conn.executemany(
                "DELETE FROM run_digests WHERE prefix = ?", [(prefix,) for prefix in forget]
            )
            conn.executemany(
                "INSERT OR REPLACE INTO run_digests (prefix, remote_id, digest) VALUES (?, ?, ?)",
                [(prefix, remote_id, digest) for prefix, digest in digests.items()],
            )

    def runs_of_remote(self, remote_id: str) -> list[RunKey]:
        """``(project, name, run_id)`` of every cached run that came from ``remote_id``."""
        return [
            (project, name, run_id)
            for project, name, run_id in self._read(
                "SELECT project, name, run_id FROM runs WHERE remote_id = ?"
                " ORDER BY project, name, run_id",
                (remote_id,),
            )
        ]

    def running_run_count(self, remote_id: str) -> int:
        """How many cached runs from ``remote_id`` are recorded as ``running`` (one query:
        a no-change sync may ask, whatever the lab's size)."""
        rows = self._read(
            "SELECT COUNT(*) FROM runs WHERE remote_id = ? AND status = 'running'", (remote_id,)
        )
        return int(rows[0][0]) if rows else 0

    def cached_run_ids(self, remote_id: str, run_ids: Iterable[str]) -> set[str]:
        """Which of ``run_ids`` the cache holds runs of from ``remote_id``: index lookups,
        for a manifest listing a few of the cache's runs."""
        wanted = sorted(set(run_ids))
        found: set[str] = set()
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            found.update(
                str(row[0])
                for row in self._read(
                    "SELECT run_id FROM runs WHERE remote_id = ? AND run_id IN"
                    f" ({','.join('?' * len(chunk))})",
                    [remote_id, *chunk],
                )
            )
        return found

    def remote_ids(self) -> set[str]:
        """Every remote the cache holds runs of or has synced from."""
        rows = self._read("SELECT remote_id FROM runs UNION SELECT remote_id FROM remotes")
        return {str(row[0]) for row in rows}

    # -- files ------------------------------------------------------------------------------

    def file_entries(self) -> list[LocalEntry]:
        """Every recorded file, sorted by path (SQLite's byte order equals Python's)."""
        return [
            (path, size, mtime, tail_hash)
            for path, size, mtime, tail_hash in self._read(
                "SELECT path, size, mtime, tail_hash FROM files ORDER BY path"
            )
        ]

    def file_entries_under(self, prefixes: Iterable[str]) -> list[LocalEntry]:
        """The recorded files whose path starts with one of ``prefixes`` (run directories,
        ending in ``/``), sorted by path: one range of the primary key per prefix, so an
        active manifest's few runs cost their own files, not every file of the cache."""
        rows: list[LocalEntry] = []
        with self._lock:
            conn = self._connect(create=False)
            if conn is None:
                return rows
            for prefix in sorted(set(prefixes)):
                if not prefix.endswith("/"):
                    raise ValueError(f"a run prefix ends with '/': {prefix!r}")
                # "/" + 1 is "0": [prefix, upper) holds exactly the paths below the prefix.
                upper = prefix[:-1] + "0"
                rows.extend(
                    conn.execute(
                        "SELECT path, size, mtime, tail_hash FROM files"
                        " WHERE path >= ? AND path < ? ORDER BY path",
                        (prefix, upper),
                    )
                )
        return rows

    def status_entries(self) -> list[LocalEntry]:
        """The recorded ``status.json`` of every run, sorted by path: one per run directory,
        read from a partial index (not a scan of every recorded file)."""
        return [
            (path, size, mtime, tail_hash)
            for path, size, mtime, tail_hash in self._read(
                "SELECT path, size, mtime, tail_hash FROM files"
                " WHERE substr(path, -12) = '/status.json' ORDER BY path"
            )
        ]

    def status_entries_of(self, prefixes: Iterable[str]) -> list[LocalEntry]:
        """The recorded ``status.json`` of the run directories ``prefixes`` (ending in
        ``/``), sorted by path: primary-key lookups, not a scan."""
        paths = sorted({prefix + "status.json" for prefix in prefixes})
        rows: list[LocalEntry] = []
        for start in range(0, len(paths), _IN_CHUNK):
            chunk = paths[start : start + _IN_CHUNK]
            rows.extend(
                self._read(
                    "SELECT path, size, mtime, tail_hash FROM files WHERE path IN"
                    f" ({','.join('?' * len(chunk))})",
                    chunk,
                )
            )
        rows.sort()
        return rows

    def running_run_prefixes(self) -> list[str]:
        """The directory prefix of every run recorded as ``running``."""
        return [
            run_prefix(*row)
            for row in self._read("SELECT project, name, run_id FROM runs WHERE status = 'running'")
        ]

    def run_containers(self) -> dict[str, list[str]]:
        """The directories that hold recorded run directories (``project/name/runs/``,
        ``runs/`` …), each with the prefixes of its recorded runs."""
        containers: dict[str, list[str]] = {}
        for row in self._read("SELECT project, name, run_id FROM runs"):
            prefix = run_prefix(*row)
            containers.setdefault(prefix[: -len(row[2]) - 1], []).append(prefix)
        return containers

    def container_names(self) -> list[str]:
        """The keys of :meth:`run_containers`, read from the primary key's leading columns
        (one index walk, no row per run in Python)."""
        return sorted(
            {
                run_prefix(project, name, "x")[:-2]
                for project, name in self._read("SELECT DISTINCT project, name FROM runs")
            }
        )

    def quick_check_stamps(self) -> dict[str, list[int]]:
        """What the last sync saw of each run container: ``[inode, mtime_ns]``."""
        rows = self._read("SELECT value FROM meta WHERE key = 'container_stamps'")
        if not rows:
            return {}
        try:
            stamps = orjson.loads(rows[0][0])
        except orjson.JSONDecodeError:
            return {}
        return stamps if isinstance(stamps, dict) else {}

    def save_quick_check_stamps(self, stamps: dict[str, list[int]]) -> None:
        """Replace what :meth:`quick_check_stamps` returns."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('container_stamps', ?)",
                (orjson.dumps(stamps, option=orjson.OPT_SORT_KEYS).decode(),),
            )

    def save_progress(
        self,
        *,
        remote_id: str,
        synced: Sequence[SyncedRow] = (),
        forget: Sequence[str] = (),
        failed: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Record finished files (:class:`FileRecord` or the same plain tuple), forget
        stale records and note failures, in one commit."""
        now = time.time()
        with self.transaction() as conn:
            if forget:
                conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in forget])
            if synced:
                conn.executemany(
                    "INSERT OR REPLACE INTO files (path, size, mtime, tail_hash, synced_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(*record, now) for record in synced],
                )
                if not self._no_failures:
                    conn.executemany(
                        "DELETE FROM failed_files WHERE path = ?", [(r[0],) for r in synced]
                    )
                    self._no_failures = (
                        conn.execute("SELECT 1 FROM failed_files LIMIT 1").fetchone() is None
                    )
            if failed:
                self._no_failures = False
                conn.executemany(
                    "INSERT INTO failed_files (path, remote_id, error, attempts, last_attempt)"
                    " VALUES (?, ?, ?, 1, ?) ON CONFLICT (path) DO UPDATE SET"
                    " error = excluded.error, attempts = attempts + 1,"
                    " last_attempt = excluded.last_attempt, remote_id = excluded.remote_id",
                    [(path, remote_id, error, now) for path, error in failed],
                )

    def failed_files(self, remote_id: str | None = None) -> list[FailedFile]:
        """Files a sync could not fetch; the next sync retries them."""
        sql = "SELECT path, remote_id, error, attempts, last_attempt FROM failed_files"
        params: tuple[str, ...] = ()
        if remote_id is not None:
            sql += " WHERE remote_id = ?"
            params = (remote_id,)
        return [FailedFile(*row) for row in self._read(sql + " ORDER BY path", params)]

    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of paths the server no longer lists."""
        rows = [(path,) for path in paths]
        if rows:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM failed_files WHERE path = ?", rows)

    # -- remotes and applied manifests ------------------------------------------------------

    def applied_manifest(self, remote_id: str, manifest_type: str) -> AppliedManifest | None:
        """The last manifest of this type applied from ``remote_id``, if any."""
        rows = self._read(
            "SELECT remote_id, manifest_type, revision, snapshot_id, generated_at, clean,"
            " applied_at, vanished FROM applied_manifests"
            " WHERE remote_id = ? AND manifest_type = ?",
            (remote_id, manifest_type),
        )
        if not rows:
            return None
        row = rows[0]
        return AppliedManifest(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])

    def save_applied_manifest(
        self,
        remote_id: str,
        manifest_type: str,
        revision: int,
        snapshot_id: str,
        generated_at: float,
        *,
        clean: bool,
        vanished: int = 0,
    ) -> None:
        """Remember the manifest a sync applied, so the next one can skip an unchanged one."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO applied_manifests (remote_id, manifest_type, revision,"
                " snapshot_id, generated_at, clean, vanished, applied_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    remote_id,
                    manifest_type,
                    revision,
                    snapshot_id,
                    generated_at,
                    int(clean),
                    vanished,
                    time.time(),
                ),
            )

    def selection_applied(self, remote_id: str) -> str:
        """The fingerprint of the run selection the last full manifest from ``remote_id``
        was applied under (``""``: every run, or none applied yet)."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (f"selection {remote_id}",))
        return str(rows[0][0]) if rows else ""

    def save_selection_applied(self, remote_id: str, fingerprint: str) -> None:
        """Record the selection a full manifest from ``remote_id`` was applied under."""
        with self.transaction() as conn:
            if fingerprint:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (f"selection {remote_id}", fingerprint),
                )
            else:
                conn.execute("DELETE FROM meta WHERE key = ?", (f"selection {remote_id}",))

    def has_full_manifest_stamp(self) -> bool:
        """Whether a full manifest stamp is recorded for any remote (never creates the
        database)."""
        rows = self._read("SELECT value FROM meta WHERE key LIKE 'full_stamp %'")
        return any(str(value).startswith("[") for (value,) in rows)

    def full_manifest_stamp(self, remote_id: str) -> tuple[str, int, int] | float | None:
        """``(snapshot_id, size, mtime)`` of the full manifest file of ``remote_id`` as the
        last sync found it; the time a sync asked for it and could not keep it (a float);
        or ``None``."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (f"full_stamp {remote_id}",))
        if not rows:
            return None
        try:
            value = orjson.loads(rows[0][0])
            if isinstance(value, float):
                return value
            snapshot_id, size, mtime = value
            return str(snapshot_id), int(size), int(mtime)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None

    def save_full_manifest_stamp(
        self, remote_id: str, stamp: tuple[str, int, int] | float | None
    ) -> None:
        """Replace (``None``: forget) what :meth:`full_manifest_stamp` returns."""
        key = f"full_stamp {remote_id}"
        with self.transaction() as conn:
            if stamp is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                value = float(stamp) if isinstance(stamp, float) else list(stamp)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (key, orjson.dumps(value).decode()),
                )

    def save_remote_sync(self, remote_id: str, outcome: str) -> None:
        """Record when ``remote_id`` was last synced and how it went."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO remotes (remote_id, last_sync, last_outcome)"
                " VALUES (?, ?, ?)",
                (remote_id, time.time(), outcome),
            )

    def last_sync(self, remote_id: str) -> tuple[float, str] | None:
        """``(time, outcome)`` of the last sync from ``remote_id``."""
        rows = self._read(
            "SELECT last_sync, last_outcome FROM remotes WHERE remote_id = ?", (remote_id,)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    # -- interrupted-sync marker -------------------------------------------------------------

    def set_dirty(self, dirty: bool) -> None:
        """Mark a sync in progress; a set mark at start means the last one was killed."""
        self._no_failures = False
        with self.transaction() as conn:
            if dirty:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dirty', '1')")
            else:
                conn.execute("DELETE FROM meta WHERE key = 'dirty'")

    def is_dirty(self) -> bool:
        """Whether a sync set the mark and never cleared it (it was killed)."""
        return bool(self._read("SELECT 1 FROM meta WHERE key = 'dirty'"))

    # -- runs the upstream viewer still hides ---------------------------------------------------

    def viewer_hidden_runs(self) -> set[str]:
        """Run ids put back from the viewer's recycle bin that no viewer has un-hidden yet."""
        rows = self._read("SELECT value FROM meta WHERE key = 'viewer_hidden'")
        return set(orjson.loads(rows[0][0])) if rows else set()

    def set_viewer_hidden_runs(self, run_ids: Iterable[str]) -> None:
        """Replace the set :meth:`viewer_hidden_runs` returns."""
        ids = sorted(set(run_ids))
        with self.transaction() as conn:
            if ids:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('viewer_hidden', ?)",
                    (orjson.dumps(ids).decode(),),
                )
            else:
                conn.execute("DELETE FROM meta WHERE key = 'viewer_hidden'")

    # -- the full check of the files on disk ------------------------------------------------

    def verified_at(self) -> float | None:
        """When a sync last checked every recorded file on disk (``None``: never)."""
        rows = self._read("SELECT value FROM meta WHERE key = 'verified_at'")
        return float(rows[0][0]) if rows else None

    def set_verified_at(self, when: float) -> None:
        """Record that every recorded file was checked on disk at ``when``."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('verified_at', ?)",
                (repr(float(when)),),
            )

"""The local cache: a mirror of the server's run tree plus the sync state that describes it.

Layout under ``root_dir``::

    <project>/<name>/runs/<run_id>/...   the mirrored files, exactly as on the server
    .runicorn-cache/state.sqlite3        what was synced (SQLite, WAL)
    .runicorn-cache/sync.lock            held by the one sync writing into this cache

The state directory is a dot name: the manifest validator refuses hidden project names, so
no manifest path can ever reach it. The state lives in SQLite because a sync saves it
incrementally (a commit every few files), and a transaction either happened or did not:
a sync killed at any point resumes from the last commit without re-fetching finished files.

Every path that comes from a server goes through :meth:`LocalCacheManager.path_for` or
:meth:`LocalCacheManager.open_parent`, which re-validate it and never follow a symbolic
link inside the cache, so nothing is ever written outside ``root_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from runicorn._sys.atomic import TEMP_PREFIX, exclusive_lock
from runicorn._sys.fd_budget import directory_handle_share, soft_limit
from runicorn.format.layout import run_prefix

logger = logging.getLogger(__name__)

STATE_DIRNAME = ".runicorn-cache"
"""The cache's own directory under ``root_dir`` (a dot name: unreachable from manifests)."""

STATE_DB_NAME = "state.sqlite3"
LOCK_NAME = "sync.lock"
SCHEMA_VERSION = 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MAX_DIRECTORY_HANDLES = 128
"""Directories :meth:`LocalCacheManager.directory_handles` keeps open at most (fewer when the
process may open few files: an eighth of ``RLIMIT_NOFILE``)."""

LocalEntry = tuple[str, int, float, "str | None"]
"""``(path, size, mtime, tail_hash)``: what :func:`runicorn.core.diff.diff_entries` takes."""

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


@dataclass(frozen=True)
class FileRecord:
    """One synced file: it is on disk at ``path`` with this size, mtime and tail hash."""

    path: str
    size: int
    mtime: float
    tail_hash: str | None


@dataclass(frozen=True)
class FailedFile:
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


def split_relative_path(relative_path: str) -> list[str]:
    """Check a manifest path again (spec 3.9) and return its components; ``ValueError`` if
    it could escape the cache or collide with the cache's own files."""
    if not isinstance(relative_path, str) or not relative_path:
        raise ValueError(f"cache path must be a non-empty string, got {relative_path!r}")
    if "\0" in relative_path or "\\" in relative_path:
        raise ValueError(f"cache path {relative_path!r} contains a NUL or backslash")
    if relative_path.startswith("/") or (len(relative_path) > 1 and relative_path[1] == ":"):
        raise ValueError(f"cache path {relative_path!r} is absolute")
    parts = relative_path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"cache path {relative_path!r} has an empty, '.' or '..' component")
        if part.startswith(TEMP_PREFIX):
            raise ValueError(f"cache path {relative_path!r} uses the reserved temp prefix")
    if parts[0].startswith("."):
        raise ValueError(
            f"cache path {relative_path!r} starts with a hidden name (reserved for the cache)"
        )
    return parts


def _run_key(path: str) -> tuple[str, str, str] | None:
    """``(project, name, run_id)`` of a mirrored file path, or ``None`` off the run layout."""
    parts = path.split("/", 4)
    if len(parts) < 5:
        return None
    return parts[0], parts[1], parts[3]


def _directory_handle_limit() -> int:
    limit = soft_limit()
    if limit is None:
        return MAX_DIRECTORY_HANDLES
    return min(MAX_DIRECTORY_HANDLES, directory_handle_share(limit))


class LocalCacheManager:
    """Owns one cache directory: its mirrored tree, its state database and its lock.

    Safe to share between threads (one SQLite connection behind a lock). Nothing is created
    on disk until the first write, so a dry run against a new cache writes nothing.
    """

    def __init__(self, root_dir: Path) -> None:
        self.root_dir = Path(os.path.abspath(root_dir))
        self.state_dir = self.root_dir / STATE_DIRNAME
        self.db_path = self.state_dir / STATE_DB_NAME
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._handles: OrderedDict[tuple[str, ...], int] | None = None
        self._handle_limit = 0

    # -- connection -----------------------------------------------------------------------

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        with self._lock:
            if self._conn is not None:
                return self._conn
            if not create and not self.db_path.exists():
                return None
            if create:
                self.ensure_state_dir()
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

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            conn = self._connect(create=False)
            if conn is None:
                return []
            return conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of state changes: all of them land, or none do."""
        with self._lock:
            conn = self._connect(create=True)
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def ensure_state_dir(self) -> None:
        """Create the cache root and its state directory (refusing a symlinked state dir)."""
        self.root_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.state_dir, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(self.state_dir).st_mode):
                raise ValueError(
                    f"{self.state_dir} exists but is not a directory; move it away so the "
                    "cache can keep its state there"
                ) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def sync_lock(self) -> Iterator[None]:
        """Held by the sync writing into this cache; a second sync waits for the first."""
        self.ensure_state_dir()
        with exclusive_lock(self.state_dir / LOCK_NAME):
            yield

    # -- safe paths -----------------------------------------------------------------------

    def path_for(self, relative_path: str) -> Path:
        """The cache path of a manifest path, after checking it cannot leave the cache.

        Raises ``ValueError`` for ``..``, absolute paths, NUL or backslash, reserved names,
        and when any existing component below ``root_dir`` is a symbolic link: a symlinked
        directory pointing elsewhere must never be followed.
        """
        parts = split_relative_path(relative_path)
        current = self.root_dir
        for part in parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break  # nothing below a missing component can be a link yet
            except OSError as error:
                if error.errno != errno.ENAMETOOLONG:
                    raise
                break  # a name the file system cannot hold was never created here
            except NotADirectoryError:
                raise ValueError(
                    f"cache path {relative_path!r}: a file stands where a directory should be"
                ) from None
            if stat.S_ISLNK(mode):
                raise ValueError(
                    f"cache path {relative_path!r}: {current} is a symbolic link; refusing to "
                    "follow it (remove the link so the sync can write a real directory there)"
                )
        return self.root_dir.joinpath(*parts)

    def open_parent(self, relative_path: str, *, create: bool = True) -> tuple[int, str]:
        """Open the directory that holds ``relative_path`` and return ``(dir_fd, name)``.

        Each component is opened relative to its parent with ``O_NOFOLLOW`` (created when
        ``create``), so a symlink swapped in between a check and a write is refused too.
        The caller closes ``dir_fd``. ``ValueError`` for an unsafe path or a link. Inside
        :meth:`directory_handles` the walk starts from the nearest directory kept open.
        """
        parts = split_relative_path(relative_path)
        directory = tuple(parts[:-1])
        fd, start = -1, 0
        with self._lock:
            handles = self._handles
            if handles is not None:
                for depth in range(len(directory), -1, -1):  # the nearest kept ancestor
                    kept = handles.get(directory[:depth])
                    if kept is not None:
                        handles.move_to_end(directory[:depth])
                        fd, start = os.dup(kept), depth
                        break
        if fd < 0:
            if create:
                self.root_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root_dir, _DIR_FLAGS)
            if handles is not None:
                self._keep_handle(handles, (), fd)
        for depth in range(start, len(directory)):
            # closes the parent, always
            fd = self._descend(fd, directory[depth], relative_path, create)
            if handles is not None:
                self._keep_handle(handles, directory[: depth + 1], fd)
        return fd, parts[-1]

    @contextlib.contextmanager
    def directory_handles(self) -> Iterator[None]:
        """Keep the directories :meth:`open_parent` opens open until the block ends.

        A sync writes about ten files into each run directory, and each file was two walks
        from the cache root, one ``open`` per component: most of a cold sync's local system
        calls. A kept handle is a directory that was opened safely (no link followed), so
        reusing it follows no link either. :meth:`remove_run` drops them all. Nested blocks
        share the outer one's handles.
        """
        with self._lock:
            nested = self._handles is not None
            if not nested:
                self._handles = OrderedDict()
                self._handle_limit = _directory_handle_limit()
        try:
            yield
        finally:
            if not nested:
                self._drop_handles(keep_caching=False)

    def _keep_handle(
        self, handles: OrderedDict[tuple[str, ...], int], directory: tuple[str, ...], fd: int
    ) -> None:
        with self._lock:
            if self._handles is not handles or directory in handles:
                return  # the block ended or the handles were dropped meanwhile
            handles[directory] = os.dup(fd)
            while len(handles) > self._handle_limit:
                _, oldest = handles.popitem(last=False)
                os.close(oldest)

    def _drop_handles(self, *, keep_caching: bool) -> None:
        with self._lock:
            handles = self._handles
            if handles is None:
                return
            self._handles = OrderedDict() if keep_caching else None
        for fd in handles.values():
            os.close(fd)

    @staticmethod
    def _descend(fd: int, part: str, relative_path: str, create: bool) -> int:
        """Open child directory ``part`` of ``fd`` without following links; closes ``fd``."""
        try:
            try:
                child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ValueError(
                    f"cache path {relative_path!r}: component {part!r} is a symbolic link or "
                    "not a directory; refusing to follow it"
                ) from None
            raise
        finally:
            os.close(fd)
        return child

    # -- temp files of killed syncs --------------------------------------------------------

    def temp_files(self) -> list[Path]:
        """Leftover temp files (``atomic.TEMP_PREFIX``) of a sync that was killed."""
        found: list[Path] = []
        if not self.root_dir.is_dir():
            return found
        for directory, dirnames, filenames in os.walk(self.root_dir):
            if directory == str(self.root_dir):
                dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
            found.extend(
                Path(directory, name) for name in filenames if name.startswith(TEMP_PREFIX)
            )
        return sorted(found)

    def clean_temp_files(self) -> int:
        """Remove leftover temp files; returns how many. Call only under :meth:`sync_lock`."""
        removed = 0
        for path in self.temp_files():
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %d temp file(s) left by an interrupted sync", removed)
        return removed

    # -- user-facing queries --------------------------------------------------------------

    def list_runs(self) -> list[CachedRun]:
        """Every run in the cache with its status, last sync time and recorded size."""
        sizes: dict[tuple[str, str, str], int] = {}
        for path, size in self._read("SELECT path, size FROM files"):
            key = _run_key(path)
            if key is not None:
                sizes[key] = sizes.get(key, 0) + size
        rows = self._read(
            "SELECT project, name, run_id, status, last_synced, created_at, updated_at, tags,"
            " remote_id FROM runs ORDER BY project, name, run_id"
        )
        return [self._cached_run(row, sizes) for row in rows]

    def _cached_run(self, row: tuple, sizes: dict[tuple[str, str, str], int]) -> CachedRun:
        project, name, run_id, status, last_synced, created, updated, tags, remote_id = row
        return CachedRun(
            project=project,
            name=name,
            run_id=run_id,
            status=status,
            last_synced=last_synced,
            path=self.root_dir / run_prefix(project, name, run_id).rstrip("/"),
            size=sizes.get((project, name, run_id), 0),
            created_at=created,
            updated_at=updated,
            tags=tuple(orjson.loads(tags)) if tags else (),
            remote_id=remote_id,
        )

    def get_run(self, run_id: str) -> CachedRun | None:
        """The run with this id (run ids carry a timestamp and random hex: unique in practice)."""
        for run in self.list_runs():
            if run.run_id == run_id:
                return run
        return None

    def disk_usage(self) -> int:
        """Bytes of every regular file under the cache root, state included (lstat sizes)."""
        total = 0
        if not self.root_dir.is_dir():
            return 0
        for directory, _dirs, filenames in os.walk(self.root_dir):
            for name in filenames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(directory, name))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
        return total

    def remove_run(self, project: str, name: str, run_id: str) -> bool:
        """Delete a run's files and its state; ``False`` when the cache did not have it."""
        prefix = run_prefix(project, name, run_id)
        run_dir = self.path_for(prefix.rstrip("/"))
        self._drop_handles(keep_caching=True)  # none may name a directory about to go
        existed = False
        try:
            if stat.S_ISDIR(os.lstat(run_dir).st_mode):
                shutil.rmtree(run_dir)
                existed = True
        except OSError as error:
            # Absent, or named too long for this file system (its files all failed): only
            # the state remembers such a run.
            if error.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                raise
        if self._connect(create=False) is None:
            return existed
        pattern = _like_prefix(prefix)
        with self.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM runs WHERE project = ? AND name = ? AND run_id = ?",
                (project, name, run_id),
            ).rowcount
            conn.execute("DELETE FROM files WHERE path LIKE ? ESCAPE '\\'", (pattern,))
            conn.execute("DELETE FROM failed_files WHERE path LIKE ? ESCAPE '\\'", (pattern,))
        return existed or deleted > 0

    # -- sync state: files ------------------------------------------------------------------

    def file_entries(self) -> list[LocalEntry]:
        """Every recorded file, sorted by path (SQLite's byte order equals Python's)."""
        return [
            (path, size, mtime, tail_hash)
            for path, size, mtime, tail_hash in self._read(
                "SELECT path, size, mtime, tail_hash FROM files ORDER BY path"
            )
        ]

    def damaged_files(self, entries: Iterable[LocalEntry] | None = None) -> set[str]:
        """Recorded files that are missing on disk, not regular, or of another size.

        One ``lstat`` per file, no reads: the cheap local check before trusting the state.
        """
        damaged: set[str] = set()
        root = str(self.root_dir)
        for path, size, _mtime, _hash in entries if entries is not None else self.file_entries():
            try:
                st = os.lstat(os.path.join(root, path))
            except OSError:
                damaged.add(path)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                damaged.add(path)
        return damaged

    def save_progress(
        self,
        *,
        remote_id: str,
        synced: Sequence[FileRecord] = (),
        forget: Sequence[str] = (),
        failed: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Record finished files, forget stale records and note failures, in one commit."""
        now = time.time()
        with self.transaction() as conn:
            if forget:
                conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in forget])
            if synced:
                conn.executemany(
                    "INSERT OR REPLACE INTO files (path, size, mtime, tail_hash, synced_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(r.path, r.size, r.mtime, r.tail_hash, now) for r in synced],
                )
                conn.executemany(
                    "DELETE FROM failed_files WHERE path = ?", [(r.path,) for r in synced]
                )
            if failed:
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
        params: tuple = ()
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

    # -- sync state: runs and remotes -------------------------------------------------------

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

    def runs_of_remote(self, remote_id: str) -> list[tuple[str, str, str]]:
        """``(project, name, run_id)`` of every cached run that came from ``remote_id``."""
        return [
            (project, name, run_id)
            for project, name, run_id in self._read(
                "SELECT project, name, run_id FROM runs WHERE remote_id = ?"
                " ORDER BY project, name, run_id",
                (remote_id,),
            )
        ]

    def applied_manifest(self, remote_id: str, manifest_type: str) -> AppliedManifest | None:
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

    def save_remote_sync(self, remote_id: str, outcome: str) -> None:
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
        with self.transaction() as conn:
            if dirty:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dirty', '1')")
            else:
                conn.execute("DELETE FROM meta WHERE key = 'dirty'")

    def is_dirty(self) -> bool:
        return bool(self._read("SELECT 1 FROM meta WHERE key = 'dirty'"))


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"

"""The local cache: a mirror of the server's run tree plus the sync state that describes it.

Layout under ``root_dir``::

    <project>/<name>/runs/<run_id>/...   the mirrored files, exactly as on the server
    .runicorn-cache/state.sqlite3        what was synced (SQLite, WAL)
    .runicorn-cache/sync.lock            held by the one sync writing into this cache
    .runicorn-cache/mirrors.json         the one server and root the cache mirrors

The state directory is a dot name: the manifest validator refuses hidden project names, so
no manifest path can ever reach it. :mod:`.tree` owns the files (safe paths, directory
handles, leftovers), :mod:`.state_db` the SQLite state, and :mod:`.manager` composes them
into :class:`LocalCacheManager`, the one object the sync engine and users hold.
"""

from runicorn.sync.cache.manager import (
    IDENTITY_NAME,
    LOCK_NAME,
    CacheOwnerError,
    LocalCacheManager,
)
from runicorn.sync.cache.state_db import (
    STATE_DB_NAME,
    AppliedManifest,
    CachedRun,
    CacheError,
    FailedFile,
    FileRecord,
    RunRecord,
    SyncedRow,
)
from runicorn.sync.cache.tree import STATE_DIRNAME, plain_name, split_relative_path

__all__ = [
    "IDENTITY_NAME",
    "LOCK_NAME",
    "STATE_DB_NAME",
    "STATE_DIRNAME",
    "AppliedManifest",
    "CacheError",
    "CacheOwnerError",
    "CachedRun",
    "FailedFile",
    "FileRecord",
    "LocalCacheManager",
    "RunRecord",
    "SyncedRow",
    "plain_name",
    "split_relative_path",
]

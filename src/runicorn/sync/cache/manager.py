"""LocalCacheManager: one cache directory, its tree and its state behind one object.

The sync engine and users see one cache; inside it are two parts that change for different
reasons: :class:`~runicorn.sync.cache.tree.CacheTree` (the files, reached without following
a link) and :class:`~runicorn.sync.cache.state_db.StateDatabase` (what was synced). The
manager composes them and holds the writer lock; the few operations that touch both
(listing runs with their paths, removing a run, checking recorded files on disk) live here.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from runicorn._sys.atomic import LockTimeoutError, exclusive_lock, write_atomically
from runicorn.sync.cache.state_db import (
    STATE_DB_NAME,
    AppliedManifest,
    CachedRun,
    CacheError,
    FailedFile,
    RunRecord,
    StateDatabase,
    SyncedRow,
)
from runicorn.sync.cache.tree import CacheTree, is_marked_remote_cache

if TYPE_CHECKING:
    from runicorn._sys.dirs import Directory
    from runicorn.core.diff import LocalEntry

LOCK_NAME = "sync.lock"
IDENTITY_NAME = "mirrors.json"
"""In the state directory: the one server and root this cache mirrors (``remote_id``)."""


class CacheOwnerError(RuntimeError):
    """The cache mirrors another server or root than the one a sync was asked to read.

    Not an ``OSError`` or ``ValueError``: no fallback (the legacy walk) may try again, since
    the second server would overwrite the first one's runs.
    """


_SFTP_ID = re.compile(r"^sftp://(?:[^@/]*@)?(?P<host>\[[^\]/]*\]|[^:/]*)(?::\d+)?/(?P<root>.*)$")


def same_server(one: str, other: str) -> bool:
    """Whether two ``remote_id`` values name the same server and root. The user and port
    may differ (another account, a tunnel to the same host): the files are the same."""
    return _server_key(one) == _server_key(other)


def _server_key(remote_id: str) -> str:
    match = _SFTP_ID.match(remote_id)
    if match is None:
        return remote_id
    return f"sftp://{match.group('host')}/{match.group('root').strip('/')}"


class LocalCacheManager:
    """Owns one cache directory: its mirrored tree, its state database and its lock.

    Safe to share between threads. Nothing is created on disk until the first write, so a
    dry run against a new cache writes nothing.
    """

    def __init__(self, root_dir: Path) -> None:
        self.tree = CacheTree(root_dir)
        self.root_dir = self.tree.root_dir
        self.state_dir = self.tree.state_dir
        self.db_path = self.state_dir / STATE_DB_NAME
        self.state = StateDatabase(self.db_path, prepare=self.tree.ensure_state_dir)

    # -- lifetime and locking -------------------------------------------------------------

    def ensure_state_dir(self) -> None:
        """Create the cache root and its state directory (refusing a symlinked state dir)."""
        self.tree.ensure_state_dir()

    @contextlib.contextmanager
    def sync_lock(self, timeout: float | None = None) -> Iterator[None]:
        """Held by the sync writing into this cache; a second sync waits for the first,
        ``timeout`` seconds at most (``None``: as long as it takes).

        :class:`CacheError` when the lock cannot be taken: the wait timed out, or the cache
        directory cannot be created or written.
        """
        lock = self.state_dir / LOCK_NAME
        with contextlib.ExitStack() as held:
            try:
                self.tree.ensure_state_dir()
                held.enter_context(exclusive_lock(lock, timeout=timeout))
            except LockTimeoutError as error:
                raise CacheError(
                    f"another sync has been writing into the cache {self.root_dir} for more "
                    f"than {timeout:g} s (it holds {lock}); wait for it to finish, or raise "
                    "the lock timeout (lock_timeout, --lock-timeout)"
                ) from error
            except OSError as error:
                where = error.filename or self.root_dir
                raise CacheError(
                    f"cannot use the cache directory {self.root_dir}: {where}: "
                    f"{error.strerror or error}"
                ) from error
            yield

    @property
    def identity_path(self) -> Path:
        """The file recording the server and root this cache mirrors."""
        return self.state_dir / IDENTITY_NAME

    def mirrored_remote(self) -> str | None:
        """The ``remote_id`` (``sftp://user@host:port/root`` or ``file:///path``) this cache
        mirrors, or ``None`` before its first sync."""
        try:
            document = orjson.loads(self.identity_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as error:
            raise CacheOwnerError(
                f"{self.identity_path} is unreadable ({error}); it names the server this "
                "cache mirrors: restore it, or delete it if this cache holds one server's runs"
            ) from None
        remote_id = document.get("remote_id") if isinstance(document, dict) else None
        return remote_id if isinstance(remote_id, str) and remote_id else None

    def claim(self, remote_id: str) -> None:
        """Record that this cache mirrors ``remote_id``, or refuse another server or root
        (:func:`same_server`: the user and port may differ).

        Called by every writing sync under the lock. A cache made before the identity file
        existed adopts ``remote_id`` when its state knows no other remote.
        """
        recorded = self.mirrored_remote()
        if recorded is not None and same_server(recorded, remote_id):
            return
        if recorded is None:
            others = sorted(r for r in self.state.remote_ids() if not same_server(r, remote_id))
            if not others:
                self.ensure_state_dir()
                write_atomically(
                    self.identity_path,
                    orjson.dumps({"remote_id": remote_id}, option=orjson.OPT_INDENT_2),
                )
                return
            recorded = others[0]
        raise CacheOwnerError(
            f"the cache {self.root_dir} mirrors {recorded}, not {remote_id}; a second server "
            "would overwrite the first one's runs. Sync into another cache directory (each "
            "remote of a config file gets its own). If it is the same server under a new "
            f"address or user, delete {self.identity_path} and sync again"
        )

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One atomic unit of state changes: all of them land, or none do."""
        return self.state.transaction()

    def close(self) -> None:
        """Close the state database (it reopens on the next use)."""
        self.state.close()

    # -- the tree ---------------------------------------------------------------------------

    def path_for(self, relative_path: str) -> Path:
        """The cache path of a manifest path; see :meth:`CacheTree.path_for`."""
        return self.tree.path_for(relative_path)

    def open_parent(self, relative_path: str, *, create: bool = True) -> tuple[Directory, str]:
        """``(directory, name)`` of a manifest path's directory; see
        :meth:`CacheTree.open_parent`."""
        return self.tree.open_parent(relative_path, create=create)

    def directory_handles(self) -> contextlib.AbstractContextManager[None]:
        """Keep the directories :meth:`open_parent` opens until the block ends."""
        return self.tree.directory_handles()

    def temp_files(self) -> list[Path]:
        """Leftover temp files of a sync that was killed."""
        return self.tree.temp_files()

    def clean_temp_files(self) -> int:
        """Remove leftover temp files; returns how many. Call only under :meth:`sync_lock`."""
        return self.tree.clean_temp_files()

    def disk_usage(self) -> int:
        """Bytes of every regular file under the cache root, state included."""
        return self.tree.disk_usage()

    # -- both: runs and recorded files -------------------------------------------------------

    def list_runs(self) -> list[CachedRun]:
        """Every run in the cache with its status, last sync time and recorded size."""
        return self.state.list_runs(self.tree.run_path)

    def get_run(self, run_id: str) -> CachedRun | None:
        """The run with this id (run ids carry a timestamp and random hex: unique in practice)."""
        for run in self.list_runs():
            if run.run_id == run_id:
                return run
        return None

    def remove_run(self, project: str, name: str, run_id: str) -> bool:
        """Delete a run's files and its state; ``False`` when the cache did not have it."""
        existed = self.tree.remove_run_files(project, name, run_id)
        forgotten = self.state.forget_run(project, name, run_id)
        return existed or forgotten

    def remove_file(self, relative_path: str) -> bool:
        """Delete one cached file (its record is forgotten by the caller's next commit)."""
        return self.tree.remove_file(relative_path)

    def damaged_files(self, entries: Iterable[LocalEntry] | None = None) -> set[str]:
        """Recorded files (all, or ``entries``) that are missing on disk, not regular, of
        another size or written locally since they were synced: one ``lstat`` each, the
        cheap check before trusting the state."""
        return self.tree.damaged_files(entries if entries is not None else self.file_entries())

    # -- what the upstream viewer does to the cache -------------------------------------------

    @property
    def is_marked_remote_cache(self) -> bool:
        """Whether the upstream viewer recognises this cache as a remote cache (by its path)
        and so never rewrites the status of a run whose process it cannot find."""
        return is_marked_remote_cache(self.root_dir)

    def recycled_runs(self) -> dict[str, tuple[Path, CachedRun]]:
        """Mirrored runs the upstream viewer moved to its recycle bin, by run id: the
        recycled directory and the run as the state knows it. Cheap when the bin is absent."""
        recycled = self.tree.recycled_runs()
        if not recycled:
            return {}
        return {
            run.run_id: (recycled[run.run_id], run)
            for run in self.list_runs()
            if run.run_id in recycled
        }

    def put_back(self, run_id: str) -> bool:
        """Move a mirrored run out of the viewer's recycle bin to its mirrored place (or drop
        the recycled copy when that place is taken). ``False`` when it was not recycled."""
        found = self.recycled_runs().get(run_id)
        if found is None:
            return False
        recycled, run = found
        self.tree.put_back(recycled, run.path)
        return True

    def viewer_hidden_runs(self) -> set[str]:
        """Runs put back from the viewer's recycle bin that its index still hides."""
        return self.state.viewer_hidden_runs()

    def set_viewer_hidden_runs(self, run_ids: Iterable[str]) -> None:
        """Replace the set :meth:`viewer_hidden_runs` returns."""
        self.state.set_viewer_hidden_runs(run_ids)

    def damaged_runs(self) -> set[str]:
        """The quick check: recorded ``status.json`` files that are missing on disk, not
        regular, or changed (as :meth:`damaged_files` judges them), of the runs that could
        have changed locally since the last sync.

        Those are the runs recorded ``running`` (the upstream viewer rewrites the status of
        a run whose process it cannot find) and every run of a container directory
        (``project/name/runs/``) whose inode or mtime moved since the last sync stamped it
        (:meth:`stamp_containers`): a run directory removed, moved away or put there moves
        its container's mtime. So it costs one ``lstat`` per container and per running run,
        not one per run of the cache."""
        stamps = self.state.quick_check_stamps()
        moved = [
            container
            for container in self.state.container_names()
            if self._container_stamp(container) != stamps.get(container)
        ]
        prefixes = set(self.state.running_run_prefixes())
        if moved:
            containers = self.state.run_containers()
            for container in moved:
                prefixes.update(containers.get(container, ()))
        return self.tree.damaged_files(self.state.status_entries_of(prefixes))

    def stamp_containers(self) -> None:
        """Remember each run container's inode and mtime as they are now, after a sync
        checked or installed its runs: the next quick check looks into the containers
        that moved since."""
        stamps: dict[str, list[int]] = {}
        for container in self.state.container_names():
            stamp = self._container_stamp(container)
            if stamp is not None:
                stamps[container] = stamp
        if stamps != self.state.quick_check_stamps():
            self.state.save_quick_check_stamps(stamps)

    def _container_stamp(self, container: str) -> list[int] | None:
        try:
            st = os.lstat(os.path.join(self.root_dir, container))
        except OSError:
            return None
        return [st.st_ino, st.st_mtime_ns]

    def damaged_under(self, entries: Sequence[LocalEntry], prefixes: Iterable[str]) -> set[str]:
        """:meth:`damaged_files` of the sorted ``entries`` whose path starts with one of
        ``prefixes`` (run directories, ending in ``/``): the full check of a few runs."""
        chosen: list[LocalEntry] = []
        for prefix in sorted(set(prefixes)):
            index = bisect.bisect_left(entries, (prefix,))
            while index < len(entries) and entries[index][0].startswith(prefix):
                chosen.append(entries[index])
                index += 1
        return self.tree.damaged_files(chosen)

    def verified_at(self) -> float | None:
        """When a sync last checked every recorded file on disk (``None``: never)."""
        return self.state.verified_at()

    def set_verified_at(self, when: float) -> None:
        """Record that every recorded file was checked on disk at ``when``."""
        self.state.set_verified_at(when)

    # -- the state --------------------------------------------------------------------------

    def file_entries(self) -> list[LocalEntry]:
        """Every recorded file, sorted by path."""
        return self.state.file_entries()

    def file_entries_under(self, prefixes: Iterable[str]) -> list[LocalEntry]:
        """The recorded files below the run directories ``prefixes`` (ending in ``/``),
        sorted by path."""
        return self.state.file_entries_under(prefixes)

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
        self.state.save_progress(remote_id=remote_id, synced=synced, forget=forget, failed=failed)

    def failed_files(self, remote_id: str | None = None) -> list[FailedFile]:
        """Files a sync could not fetch; the next sync retries them."""
        return self.state.failed_files(remote_id)

    def clear_failures(self, paths: Iterable[str]) -> None:
        """Forget failures of paths the server no longer lists."""
        self.state.clear_failures(paths)

    def save_runs(self, remote_id: str, runs: Sequence[RunRecord]) -> None:
        """Insert or update runs from a manifest; ``last_synced=None`` keeps the old value."""
        self.state.save_runs(remote_id, runs)

    def has_full_manifest_stamp(self) -> bool:
        """Whether a sync recorded the server's full manifest stamp in this cache."""
        return self.state.has_full_manifest_stamp()

    def full_manifest_stamp(self, remote_id: str) -> tuple[str, int, int] | float | None:
        """``(snapshot_id, size, mtime)`` of the server's full manifest file as the last
        sync found it (the no-change check's shortcut); when a sync asked for it last but
        could not keep it, that time; or ``None``."""
        return self.state.full_manifest_stamp(remote_id)

    def save_full_manifest_stamp(
        self, remote_id: str, stamp: tuple[str, int, int] | float | None
    ) -> None:
        """Replace (``None``: forget) what :meth:`full_manifest_stamp` returns."""
        self.state.save_full_manifest_stamp(remote_id, stamp)

    def cached_run_ids(self, remote_id: str, run_ids: Iterable[str]) -> set[str]:
        """Which of ``run_ids`` the cache holds runs of from ``remote_id``."""
        return self.state.cached_run_ids(remote_id, run_ids)

    def run_digests(self, remote_id: str) -> dict[str, bytes]:
        """Per run prefix, the digest of its manifest JSON as last applied cleanly."""
        return self.state.run_digests(remote_id)

    def save_run_digests(
        self,
        remote_id: str,
        digests: dict[str, bytes],
        *,
        forget: Iterable[str] = (),
        replace_all: bool = False,
    ) -> None:
        """Record digests of runs applied cleanly; see :meth:`StateDatabase.save_run_digests`."""
        self.state.save_run_digests(remote_id, digests, forget=forget, replace_all=replace_all)

    def runs_of_remote(self, remote_id: str) -> list[tuple[str, str, str]]:
        """``(project, name, run_id)`` of every cached run that came from ``remote_id``."""
        return self.state.runs_of_remote(remote_id)

    def running_run_count(self, remote_id: str) -> int:
        """How many cached runs from ``remote_id`` are recorded as ``running``."""
        return self.state.running_run_count(remote_id)

    def applied_manifest(self, remote_id: str, manifest_type: str) -> AppliedManifest | None:
        """The last manifest of this type applied from ``remote_id``, if any."""
        return self.state.applied_manifest(remote_id, manifest_type)

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
        """Remember the manifest a sync applied."""
        self.state.save_applied_manifest(
            remote_id,
            manifest_type,
            revision,
            snapshot_id,
            generated_at,
            clean=clean,
            vanished=vanished,
        )

    def selection_applied(self, remote_id: str) -> str:
        """See :meth:`StateDatabase.selection_applied`."""
        return self.state.selection_applied(remote_id)

    def save_selection_applied(self, remote_id: str, fingerprint: str) -> None:
        """See :meth:`StateDatabase.save_selection_applied`."""
        self.state.save_selection_applied(remote_id, fingerprint)

    def save_remote_sync(self, remote_id: str, outcome: str) -> None:
        """Record when ``remote_id`` was last synced and how it went."""
        self.state.save_remote_sync(remote_id, outcome)

    def last_sync(self, remote_id: str) -> tuple[float, str] | None:
        """``(time, outcome)`` of the last sync from ``remote_id``."""
        return self.state.last_sync(remote_id)

    def set_dirty(self, dirty: bool) -> None:
        """Mark a sync in progress; a set mark at start means the last one was killed."""
        self.state.set_dirty(dirty)

    def is_dirty(self) -> bool:
        """Whether the last sync was killed before it cleared its mark."""
        return self.state.is_dirty()

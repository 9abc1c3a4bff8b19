"""The cache tree: the mirrored files under a cache's ``root_dir``, reached without ever
following a symbolic link.

Every path that comes from a server goes through :meth:`CacheTree.path_for` or
:meth:`CacheTree.open_parent`, which re-validate it and refuse a link at any component, so
nothing is ever written outside ``root_dir``. The tree knows nothing of the sync state; it
reserves the state directory (a dot name, unreachable from manifests) and leaves it alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn._sys.dirs import Directory, is_link, open_directory
from runicorn._sys.fd_budget import directory_handle_share, soft_limit
from runicorn.format.client_names import client_path_problem
from runicorn.format.layout import run_prefix

if TYPE_CHECKING:
    from runicorn.core.diff import LocalEntry

logger = logging.getLogger(__name__)

STATE_DIRNAME = ".runicorn-cache"
"""The cache's own directory under ``root_dir`` (a dot name: unreachable from manifests)."""

MTIME_SLACK_NS = 1_000_000_000
"""How much newer than recorded a cached file may look before it counts as written locally
(timestamp rounding on coarse file systems)."""

VIEWER_RECYCLE_DIR = ("runs", ".recycle")
"""Where the upstream viewer moves runs deleted in its UI, under the directory it serves."""

REMOTE_CACHE_MARKERS = (".runicorn_remote_cache", "remote_cache", "_remote_")
"""Substrings of a run's path by which the upstream viewer recognises a remote cache (and
then never rewrites the run's status): see :func:`is_marked_remote_cache`."""

CLIENT_PLATFORM = sys.platform
"""The platform whose name rule (:mod:`runicorn.format.client_names`) cache paths must pass:
on Windows, device names, trailing dots and spaces and ``<>:"|?*`` are refused rather than
written as another file."""

MAX_DIRECTORY_HANDLES = 128
"""Directories :meth:`CacheTree.directory_handles` keeps open at most (fewer when the
process may open few files: an eighth of ``RLIMIT_NOFILE``)."""


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
    if CLIENT_PLATFORM == "win32":
        reason = client_path_problem(relative_path, CLIENT_PLATFORM)
        if reason is not None:
            raise ValueError(
                f"cache path {relative_path!r}: {reason}; this machine cannot store it as it "
                "is, so it is not synced (rename it on the server to sync it here)"
            )
    return parts


def plain_name(name: str) -> bool:
    """Whether a last path component passes :func:`split_relative_path` (its own checks)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "\0" not in name
        and "\\" not in name
        and not name.startswith(TEMP_PREFIX)
    )


def _directory_handle_limit() -> int:
    limit = soft_limit()
    if limit is None:
        return MAX_DIRECTORY_HANDLES
    return min(MAX_DIRECTORY_HANDLES, directory_handle_share(limit))


class CacheTree:
    """The files under one cache directory: safe paths, kept directory handles, leftovers.

    Safe to share between threads (the kept handles sit behind a lock). Nothing is created
    on disk until the first write.
    """

    def __init__(self, root_dir: Path) -> None:
        self.root_dir = Path(os.path.abspath(root_dir))
        self.state_dir = self.root_dir / STATE_DIRNAME
        self._lock = threading.Lock()
        self._handles: OrderedDict[str, Directory] | None = None
        self._handle_limit = 0

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

    def run_path(self, project: str, name: str, run_id: str) -> Path:
        """Where a run's files are mirrored (unchecked: for display, not for writing)."""
        return self.root_dir / run_prefix(project, name, run_id).rstrip("/")

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
                info = os.lstat(current)
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
            if is_link(info):
                raise ValueError(
                    f"cache path {relative_path!r}: {current} is a symbolic link; refusing to "
                    "follow it (remove the link so the sync can write a real directory there)"
                )
        return self.root_dir.joinpath(*parts)

    def open_parent(self, relative_path: str, *, create: bool = True) -> tuple[Directory, str]:
        """Open the directory that holds ``relative_path`` and return ``(directory, name)``.

        Each component is opened relative to its parent without following a link (created
        when ``create``; :mod:`runicorn._sys.dirs`), so where the system has ``dir_fd`` a
        symlink swapped in between a check and a write is refused too (without it, each
        component is checked right before use). The caller closes ``directory``.
        ``ValueError`` for an unsafe path or a link. Inside :meth:`directory_handles` the
        walk starts from the nearest directory kept open.
        """
        directory, _sep, name = relative_path.rpartition("/")
        with self._lock:
            handles = self._handles
            if handles is not None and directory and plain_name(name):
                # A kept directory was validated when it was opened: only the name is new.
                kept = handles.get(directory)
                if kept is not None:
                    handles.move_to_end(directory)
                    return kept.dup(), name
        parts = split_relative_path(relative_path)
        current: Directory | None = None
        start = 0
        with self._lock:
            handles = self._handles
            if handles is not None:
                for depth in range(len(parts) - 1, -1, -1):  # the nearest kept ancestor
                    key = "/".join(parts[:depth])
                    kept = handles.get(key)
                    if kept is not None:
                        handles.move_to_end(key)
                        current, start = kept.dup(), depth
                        break
        if current is None:
            if create:
                self.root_dir.mkdir(parents=True, exist_ok=True)
            current = open_directory(self.root_dir)
            if handles is not None:
                self._keep_handle(handles, "", current)
        for depth in range(start, len(parts) - 1):
            # closes the parent, always
            current = self._descend(current, parts[depth], relative_path, create)
            if handles is not None:
                self._keep_handle(handles, "/".join(parts[: depth + 1]), current)
        return current, parts[-1]

    @contextlib.contextmanager
    def directory_handles(self) -> Iterator[None]:
        """Keep the directories :meth:`open_parent` opens open until the block ends.

        A sync writes about ten files into each run directory, and each file would
        otherwise be a walk from the cache root, one ``open`` per component: most of a cold
        sync's local system calls. A kept handle is a directory that was opened safely (no
        link followed), so reusing it follows no link either. :meth:`remove_run_files`
        drops them all. Nested blocks share the outer one's handles.
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
        self, handles: OrderedDict[str, Directory], key: str, directory: Directory
    ) -> None:
        with self._lock:
            if self._handles is not handles or key in handles:
                return  # the block ended or the handles were dropped meanwhile
            handles[key] = directory.dup()
            while len(handles) > self._handle_limit:
                _, oldest = handles.popitem(last=False)
                oldest.close()

    def _drop_handles(self, *, keep_caching: bool) -> None:
        with self._lock:
            handles = self._handles
            if handles is None:
                return
            self._handles = OrderedDict() if keep_caching else None
        for directory in handles.values():
            directory.close()

    @staticmethod
    def _descend(directory: Directory, part: str, relative_path: str, create: bool) -> Directory:
        """Open child directory ``part`` without following links; closes ``directory``."""
        try:
            child = directory.child(part, create=create)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ValueError(
                    f"cache path {relative_path!r}: component {part!r} is a symbolic link or "
                    "not a directory; refusing to follow it"
                ) from None
            raise
        finally:
            directory.close()
        return child

    # -- temp files of killed syncs --------------------------------------------------------

    def temp_files(self) -> list[Path]:
        """Leftover temp files (``atomic.TEMP_PREFIX``) of a sync that was killed."""
        return sorted(
            self.root_dir.joinpath(*parts, entry.name)
            for _fd, parts, entry in walk_files(self.root_dir, skip_top=STATE_DIRNAME)
            if entry.name.startswith(TEMP_PREFIX)
        )

    def clean_temp_files(self) -> int:
        """Remove leftover temp files; returns how many. Call only under the sync lock."""
        removed = 0
        for directory, _parts, entry in walk_files(self.root_dir, skip_top=STATE_DIRNAME):
            if entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    directory.unlink(entry.name)
                    removed += 1
        if removed:
            logger.info("removed %d temp file(s) left by an interrupted sync", removed)
        return removed

    # -- what is on disk --------------------------------------------------------------------

    def disk_usage(self) -> int:
        """Bytes of every regular file under the cache root, state included (lstat sizes)."""
        total = 0
        for _fd, _parts, entry in walk_files(self.root_dir):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        return total

    def remove_run_files(self, project: str, name: str, run_id: str) -> bool:
        """Delete a run's directory, never through a link; ``False`` when it was not there."""
        run_dir = self.path_for(run_prefix(project, name, run_id).rstrip("/"))
        self._drop_handles(keep_caching=True)  # none may name a directory about to go
        try:
            if stat.S_ISDIR(os.lstat(run_dir).st_mode):
                remove_tree(run_dir)
                return True
        except OSError as error:
            # Absent, or named too long for this file system (its files all failed): only
            # the state remembers such a run.
            if error.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                raise
        return False

    def remove_file(self, relative_path: str) -> bool:
        """Delete one cached file, its parents opened without following links; ``False``
        when it was not there. A directory in its place is left alone (``IsADirectoryError``)."""
        try:
            directory, name = self.open_parent(relative_path, create=False)
        except FileNotFoundError:
            return False
        try:
            if stat.S_ISDIR(directory.lstat(name).st_mode):
                raise IsADirectoryError(errno.EISDIR, "a directory, not a file", relative_path)
            directory.unlink(name)
            return True
        except FileNotFoundError:
            return False
        finally:
            directory.close()

    def damaged_files(self, entries: Iterable[LocalEntry]) -> set[str]:
        """Of these recorded files, those missing on disk, not regular, of another size, or
        written locally since the sync installed them.

        One ``lstat`` per file, no reads: the cheap local check before trusting the state.
        A sync gives every file it installs the server's mtime, so a file modified since
        (a viewer rewriting ``status.json``) is newer on disk than on record. Only *newer*
        counts, by more than :data:`MTIME_SLACK_NS`: file systems with coarse timestamps
        round an installed mtime down, and a far-future server mtime is clamped down (a
        negative one, which some file systems clamp *up*, is not compared).
        """
        damaged: set[str] = set()
        root = str(self.root_dir)
        for path, size, mtime, _hash in entries:
            try:
                st = os.lstat(os.path.join(root, path))
            except OSError:
                damaged.add(path)
                continue
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_size != size
                or (mtime >= 0 and st.st_mtime_ns > mtime * 1_000_000_000 + MTIME_SLACK_NS)
            ):
                damaged.add(path)
        return damaged

    # -- what the upstream viewer does to a cache --------------------------------------------

    def recycled_runs(self) -> dict[str, Path]:
        """Run directories in the upstream viewer's recycle bin (``runs/.recycle/<run_id>``).

        The viewer moves a run there when it is deleted in its UI. Two ``lstat`` calls when
        the bin does not exist (the usual case); links are never followed.
        """
        recycle = self.root_dir.joinpath(*VIEWER_RECYCLE_DIR)
        try:
            for directory in (recycle.parent, recycle):
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    return {}
            with os.scandir(recycle) as entries:
                return {
                    entry.name: Path(entry.path)
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False)
                }
        except OSError:
            return {}

    def put_back(self, recycled: Path, run_dir: Path) -> bool:
        """Move a recycled run directory back to where the sync mirrors it, keeping its
        files (and their mtimes, so nothing is fetched again). When the mirrored directory
        exists already, the recycled copy is deleted instead: one run, one directory.
        ``True`` when the directory was moved back."""
        relative = run_dir.relative_to(self.root_dir).as_posix()
        target = self.path_for(relative)  # refuses links on the way
        self._drop_handles(keep_caching=True)  # a kept handle may name the recycled directory
        try:
            os.lstat(target)
        except FileNotFoundError:
            directory, name = self.open_parent(relative, create=True)
            try:
                directory.move_in(str(recycled), name)
            finally:
                directory.close()
            return True
        remove_tree(recycled)
        return False


_Identity = tuple[int, int]


def _is_directory(entry: os.DirEntry[str]) -> bool:
    """A real directory: not a link, nor (on Windows) a junction, which is removed as the
    link it is and never entered."""
    try:
        return entry.is_dir(follow_symlinks=False) and not is_link(
            entry.stat(follow_symlinks=False)
        )
    except OSError:
        return False


class _Descent:
    """A depth-first walk that holds one directory open at a time, whatever the depth.

    Python's ``os.walk`` (before 3.12) and ``shutil.rmtree`` recurse once per level and take
    whole paths, so a tree a few hundred levels deep exhausts the stack or ``PATH_MAX``.
    This walk keeps, per level, the identity of the directory and its subdirectories not yet
    visited; it goes down a :class:`~runicorn._sys.dirs.Directory` at a time (``openat``
    where there is ``dir_fd``; never through a link) and up with ``..``, checked against
    the identity it recorded, so a directory moved meanwhile stops it with an error instead
    of sending it elsewhere."""

    def __init__(self, top: Path) -> None:
        self.directory = open_directory(top, follow=False)
        self.levels: list[tuple[_Identity, list[str]]] = []
        self.parts: list[str] = []
        """The open directory's path below the top, as components."""

    def list(self, remove_files: bool) -> list[os.DirEntry[str]]:
        """The entries of the open directory that are not directories (unlinked, and then
        not returned, with ``remove_files``); its subdirectories are recorded to visit."""
        files: list[os.DirEntry[str]] = []
        subdirectories: list[str] = []
        with self.directory.scandir() as entries:
            for entry in entries:
                if _is_directory(entry):
                    subdirectories.append(entry.name)
                elif remove_files:
                    with contextlib.suppress(FileNotFoundError):
                        self.directory.unlink(entry.name)
                else:
                    files.append(entry)
        self.levels.append((self.directory.identity(), subdirectories))
        return files

    def skip(self, name: str) -> None:
        """Do not visit the subdirectory ``name`` of the open directory."""
        pending = self.levels[-1][1]
        if name in pending:
            pending.remove(name)

    def advance(self, remove_directories: bool) -> bool:
        """Open the next directory to list, going up (and with ``remove_directories``
        removing each directory left, empty by then) as needed; ``False`` when the walk is
        over, back at the top. A subdirectory that cannot be opened, or that became a link,
        is passed over."""
        while True:
            pending = self.levels[-1][1]
            while pending:
                name = pending.pop()
                try:
                    child = self.directory.child(name)
                except OSError:
                    continue
                self.directory.close()
                self.directory = child
                self.parts.append(name)
                return True
            self.levels.pop()
            if not self.levels:
                return False
            parent = self.directory.parent()
            self.directory.close()
            self.directory = parent
            left = self.parts.pop()
            if parent.identity() != self.levels[-1][0]:
                raise OSError(
                    errno.ESTALE,
                    f"a directory moved during the walk below {'/'.join(self.parts) or '.'}",
                )
            if remove_directories:
                self.directory.rmdir(left)

    def close(self) -> None:
        self.directory.close()


def walk_files(
    top: Path, *, skip_top: str | None = None
) -> Iterator[tuple[Directory, tuple[str, ...], os.DirEntry[str]]]:
    """Every entry below ``top`` that is not a directory (links included, never followed),
    as ``(directory, directory's path below top as parts, entry)``: the directory is open
    while the entry is handled, for ``directory.unlink(entry.name)``. Iterative and one
    descriptor deep (see :class:`_Descent`); ``skip_top`` names a directory of ``top`` left
    out. Nothing when ``top`` is not a directory."""
    try:
        walk = _Descent(top)
    except OSError:
        return
    try:
        while True:
            files = walk.list(remove_files=False)
            if skip_top and not walk.parts:
                walk.skip(skip_top)
            parts = tuple(walk.parts)
            for entry in files:
                yield walk.directory, parts, entry
            if not walk.advance(remove_directories=False):
                return
    finally:
        walk.close()


def remove_tree(top: Path) -> None:
    """``shutil.rmtree(top)`` without recursion, at any depth, never through a link: ``top``
    itself must be a directory (a link there raises ``OSError``); a link inside it is
    removed, never followed."""
    walk = _Descent(top)
    try:
        walk.list(remove_files=True)
        while walk.advance(remove_directories=True):
            walk.list(remove_files=True)
    finally:
        walk.close()
    os.rmdir(top)


def is_marked_remote_cache(path: Path | str) -> bool:
    """Whether the upstream viewer treats runs under ``path`` as a remote cache.

    Its rule (``update_status_if_process_dead``): a run whose directory path, lower-cased,
    contains one of :data:`REMOTE_CACHE_MARKERS` is never marked failed for a dead process.
    """
    lowered = str(path).lower()
    return any(marker in lowered for marker in REMOTE_CACHE_MARKERS)

"""Where the publisher learns that the experiments tree changed: inotify, or polling.

:class:`InotifySource` watches every directory of the tree and reports the directories in
which something happened; :class:`PollingSource` knows nothing and says "maybe everything"
on an interval, so the caller's incremental generation does the detecting. Which one to use
is decided by :func:`polling_reason`: inotify only sees writes made through this kernel, so a
file system that other hosts write to (NFS, Lustre, ...) must be polled, and a tree needing
more watches than the user has left must be too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from runicorn._sys.atomic import temp_prefix_for
from runicorn.format.layout import (
    EXPERIMENTS_METADATA_FILENAME,
    INDEX_FILE_PREFIX,
    RUN_MARKERS,
    RUNS_DIRNAME,
    is_hidden,
)
from runicorn.format.models import ManifestFormat
from runicorn.generate.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_EXCL_UNLINK,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    InotifyUnavailable,
    max_user_watches,
    parse_events,
    watches_in_use,
)

logger = logging.getLogger(__name__)

WATCH_MASK = (
    IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
"""Every way a directory's files can change; ``IN_Q_OVERFLOW`` is always delivered."""

WATCH_HEADROOM_FRACTION = 0.1
"""Share of the user's watch limit left to other programs (editors, file indexers): the
publisher falls back to polling rather than starve them."""

ROOT_CHECK_SECONDS = 1.0
"""While idle, how often the root's identity is checked: a root deleted and recreated, or
renamed away with a new one put in its place, is re-watched within this long."""

POLL_PACE = 4.0
"""See :meth:`PollingSource.pace`."""

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "gpfs",
        "beegfs",
        "glusterfs",
        "afs",
        "9p",
        "orangefs",
        "pvfs2",
        "gfs2",
        "ocfs2",
        "fuse.sshfs",
        "fuse.ceph-fuse",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.juicefs",
        "fuse.gcsfuse",
        "fuse.beegfs",
    }
)
"""File systems other hosts write to: inotify on this host never hears of their writes."""


class ChangeSourceFailed(Exception):
    """The change source cannot go on (watch limit reached, inotify gone); poll instead."""


class WatchBudgetExceeded(ChangeSourceFailed):
    """The tree needs more inotify watches than this user has left."""


@dataclass
class Changes:
    """What a source saw since the last :meth:`wait`."""

    directories: set[str] = field(default_factory=set)
    """Directories (relative to the root, ``""`` for the root) in which something changed."""
    rescan: bool = False
    """Anything may have changed: events were lost, the root was replaced, or a poll tick."""

    def __bool__(self) -> bool:
        return self.rescan or bool(self.directories)


class Waker:
    """A self-pipe: :meth:`wake` (from another thread or a signal handler) ends a wait."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        # Never blocks: a signal handler may interrupt close() on the same thread, and a
        # waker being closed has nobody left to wake. A full pipe is already a wake-up.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self._write_fd, b"\0")
        finally:
            self._lock.release()

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._read_fd, 4096):
                pass

    def close(self) -> None:
        """Close the pipe; later wake-ups do nothing (its descriptors may be reused)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _select(fds: list[int], timeout: float | None) -> list[int]:
    """The readable ones of ``fds`` after at most ``timeout`` seconds (``None``: no limit)."""
    if timeout is not None and timeout < 0:
        timeout = 0
    readable, _, _ = select.select(fds, [], [], timeout)
    return readable


# --- choosing a source -----------------------------------------------------------------


def _unescape_mount_path(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in field_text:
        return field_text
    out = []
    index = 0
    while index < len(field_text):
        char = field_text[index]
        digits = field_text[index + 1 : index + 4]
        if char == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field_text[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(char)
            index += 1
    return "".join(out)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """``(mount point, file system type)`` of every mount, in mount order."""
    result: list[tuple[str, str]] = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return result
    for line in lines:
        fields = line.split(" ")
        try:
            separator = fields.index("-")
        except ValueError:
            continue
        if len(fields) <= separator + 1 or len(fields) < 5:
            continue
        result.append((_unescape_mount_path(fields[4]), fields[separator + 1]))
    return result


def network_filesystem(root: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the network file system holding ``root`` or mounted below it, if any.

    The mount holding the root is the last-mounted one whose mount point is a prefix of its
    real path (a later mount on the same point hides the earlier one).
    """
    real = os.path.realpath(root)
    holding: tuple[str, str] | None = None
    below: str | None = None
    for point, fs_type in mounts(mountinfo):
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if holding is None or len(point) >= len(holding[0]):
                holding = (point, fs_type)
        elif point.startswith(real.rstrip("/") + "/") and fs_type in NETWORK_FILESYSTEMS:
            below = fs_type
    if holding is not None and holding[1] in NETWORK_FILESYSTEMS:
        return holding[1]
    return below


def polling_reason(root: Path) -> str | None:
    """Why ``root`` cannot be watched with inotify, or ``None`` when it can be tried."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/sys/fs/inotify"):
        return "inotify is not available on this system"
    fs_type = network_filesystem(root)
    if fs_type is not None:
        return (
            f"{root} is on a {fs_type} file system, written by other hosts whose changes "
            "inotify does not see"
        )
    return None


def watch_budget() -> tuple[int | None, int, int | None]:
    """``(available, in use, limit)`` of inotify watches for this user; ``available`` is
    ``None`` when the limit cannot be read (then only the kernel's ``ENOSPC`` stops us)."""
    limit = max_user_watches()
    used = watches_in_use()
    if limit is None:
        return None, used, None
    headroom = int(limit * WATCH_HEADROOM_FRACTION)
    return max(0, limit - used - headroom), used, limit


# --- inotify ---------------------------------------------------------------------------


class InotifySource:
    """Watches every directory of the experiments tree and reports where changes happened.

    Directories are watched before they are listed, so a file created meanwhile is either
    listed or reported. A directory that appears is watched and reported whole, since files
    may have been written into it before its watch landed. Lost events (queue overflow), a
    replaced root or a failed re-watch turn into :attr:`Changes.rescan`.
    """

    name = "inotify"

    def __init__(
        self,
        root: Path,
        waker: Waker,
        *,
        outputs: Collection[Path] = (),
        budget: int | None = None,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self._root_str = str(self.root)
        self._waker = waker
        # The publisher's own files (manifests, their lock, state and temp files) may sit
        # inside the tree when --output puts them there: their writes are not changes.
        self._ignored: dict[str, tuple[str, ...]] = {}
        for output in outputs:
            path = Path(os.path.abspath(output))
            for name in (path.name, path.name + ManifestFormat.GZIP_SUFFIX):
                self._ignored[str(path.parent)] = (
                    *self._ignored.get(str(path.parent), ()),
                    name,
                    "." + name,
                    temp_prefix_for(Path(name)),
                )
        self._budget = budget
        self._inotify: Inotify | None = None
        self._paths: dict[int, str] = {}
        self._wds: dict[str, int] = {}
        self._root_identity: tuple[int, int] | None = None
        self._root_checked = 0.0
        self._injected: list[bytes] = []
        self._injected_lock = threading.Lock()

    @property
    def watch_count(self) -> int:
        return len(self._wds)

    def start(self) -> None:
        """Watch the whole tree; raises :class:`ChangeSourceFailed` when it cannot."""
        self._watch_root()

    def rescan(self) -> None:
        """Watch whatever is not watched yet (after lost events, or on request)."""
        if self._inotify is None:
            return
        if self._root_identity is None or self._root_replaced():
            self._watch_root()
        else:
            self._walk("")

    def inject(self, raw: bytes) -> None:
        """Queue raw ``struct inotify_event`` bytes as if the kernel had sent them.

        The seam tests use to simulate what cannot be caused on demand, such as a queue
        overflow (:func:`runicorn.generate.inotify.encode_event`). Thread-safe.
        """
        with self._injected_lock:
            self._injected.append(raw)
        self._waker.wake()

    def wait(self, timeout: float | None) -> Changes:
        """Block until something changed, :meth:`Waker.wake` was called, or ``timeout``."""
        assert self._inotify is not None, "start() first"
        changes = Changes()
        limit = ROOT_CHECK_SECONDS if timeout is None else min(timeout, ROOT_CHECK_SECONDS)
        readable = _select([self._inotify.fileno(), self._waker.fileno()], limit)
        if self._waker.fileno() in readable:
            self._waker.drain()
        with self._injected_lock:
            injected, self._injected = self._injected, []
        for raw in injected:
            self._handle(parse_events(raw), changes)
        if self._inotify.fileno() in readable:
            # Everything queued now, in a few reads: one burst becomes one set of changes.
            for _ in range(64):
                events = self._inotify.read_events()
                if not events:
                    break
                self._handle(events, changes)
        now = time.monotonic()
        if now - self._root_checked >= ROOT_CHECK_SECONDS or self._root_identity is None:
            self._root_checked = now
            if self._root_replaced():
                logger.info(
                    "%s %s; watching the tree now there",
                    self._root_str,
                    "appeared" if self._root_identity is None else "was replaced",
                )
                self._watch_root()
                changes.rescan = True
        return changes

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._paths.clear()
        self._wds.clear()

    # -- watching -----------------------------------------------------------------------

    def _root_replaced(self) -> bool:
        try:
            st = os.stat(self._root_str)
        except OSError:
            return self._root_identity is not None
        return (st.st_dev, st.st_ino) != self._root_identity

    def _watch_root(self) -> None:
        """Drop every watch and watch the tree now at the root path (if there is one).

        A fresh instance rather than removing watches one by one: events still queued for
        the old tree go with it.
        """
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        try:
            self._inotify = Inotify()
        except InotifyUnavailable as error:
            raise ChangeSourceFailed(str(error)) from error
        self._paths.clear()
        self._wds.clear()
        try:
            st = os.stat(self._root_str)
        except OSError:
            self._root_identity = None
            logger.warning("%s does not exist; waiting for it to appear", self._root_str)
            return
        self._root_identity = (st.st_dev, st.st_ino)
        self._walk("")

    def needed_watches(self) -> int:
        """How many watches the tree at the root needs now (one per directory): a walk that
        adds nothing, for the message when there are too few."""
        count = 0
        stack = [""]
        while stack:
            rel = stack.pop()
            count += 1
            stack.extend(self._subdirectories(rel))
        return count

    def _full_path(self, rel: str) -> str:
        return os.path.join(self._root_str, rel) if rel else self._root_str

    def _wanted(self, rel: str, name: str, is_dir: bool = True) -> bool:
        """Whether the child ``name`` of the directory ``rel`` is part of the tree.

        The rules of the scan: at the root every visible entry counts (a symbolic link is
        a problem the scan reports) and the tags file, but not the SDK's ``runicorn.db``
        index, written all the time and never synced; elsewhere hidden names count only
        inside a run directory (not ``.runicorn/``, not ``runs/.recycle/``).
        """
        if not rel and not is_dir:
            if name == EXPERIMENTS_METADATA_FILENAME:
                return True
            if name.startswith(INDEX_FILE_PREFIX) or is_hidden(name):
                return False
        if is_hidden(name) and not self._inside_run(rel):
            return False
        ignored = self._ignored.get(self._full_path(rel))
        return ignored is None or not name.startswith(ignored)

    def _inside_run(self, rel: str) -> bool:
        """Whether ``rel`` is a run directory or below one, in either layout: the fourth
        level of ``<project>/<name>/runs/<run_id>/``, or below ``runs/`` a directory that
        holds a run marker (``meta.json``, ``status.json``), itself or an ancestor."""
        parts = rel.split("/") if rel else []
        if not parts:
            return False
        if parts[0] != RUNS_DIRNAME:
            return len(parts) >= 4 and parts[2] == RUNS_DIRNAME
        for depth in range(2, len(parts) + 1):
            directory = os.path.join(self._root_str, *parts[:depth])
            if any(os.path.lexists(os.path.join(directory, m)) for m in RUN_MARKERS):
                return True
        return False

    def _subdirectories(self, rel: str) -> list[str]:
        """The directories below ``rel`` that belong to the tree (none if it is unreadable
        or vanished: the generation reports that)."""
        found: list[str] = []
        try:
            with os.scandir(self._full_path(rel)) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir and self._wanted(rel, entry.name):
                        found.append(f"{rel}/{entry.name}" if rel else entry.name)
        except OSError:
            pass
        return found

    def _walk(self, top: str) -> None:
        """Watch ``top`` and every directory below it (depth first, watch before list)."""
        stack = [top]
        while stack:
            rel = stack.pop()
            if self._add(rel):
                stack.extend(self._subdirectories(rel))

    def _add(self, rel: str) -> bool:
        assert self._inotify is not None
        if self._budget is not None and len(self._wds) >= self._budget and rel not in self._wds:
            raise WatchBudgetExceeded(
                f"the tree needs more than the {self._budget} inotify watches available"
            )
        try:
            wd = self._inotify.add_watch(self._full_path(rel), WATCH_MASK)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise WatchBudgetExceeded(
                    f"the kernel refused more inotify watches after {len(self._wds)} "
                    "(fs.inotify.max_user_watches reached)"
                ) from error
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
                return False  # vanished, replaced by a file or unreadable: nothing to watch
            raise ChangeSourceFailed(f"inotify_add_watch failed: {error}") from error
        stale = self._paths.get(wd)
        if stale is not None and stale != rel:
            self._wds.pop(stale, None)
        self._paths[wd] = rel
        self._wds[rel] = wd
        return True

    def _forget(self, top: str) -> None:
        """Drop the watches of ``top`` and everything below it (moved away or deleted)."""
        assert self._inotify is not None
        prefix = top + "/"
        for rel in [rel for rel in self._wds if rel == top or rel.startswith(prefix)]:
            wd = self._wds.pop(rel)
            self._paths.pop(wd, None)
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)

    # -- events -------------------------------------------------------------------------

    def _handle(self, events: list[InotifyEvent], changes: Changes) -> None:
        for event in events:
            mask = event.mask
            if mask & IN_Q_OVERFLOW:
                logger.warning("inotify queue overflowed; rescanning %s", self._root_str)
                self.rescan()
                changes.rescan = True
                continue
            rel = self._paths.get(event.wd)
            if rel is None:
                continue  # a watch already forgotten
            if mask & IN_IGNORED:
                self._paths.pop(event.wd, None)
                if self._wds.get(rel) == event.wd:
                    del self._wds[rel]
                if not rel:
                    self._root_checked = 0.0  # the root went: check it on this wait
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if not rel:
                    self._root_checked = 0.0
                    changes.rescan = True
                continue  # the parent reports it as IN_DELETE / IN_MOVED_FROM
            if not event.name:
                changes.directories.add(rel)
                continue
            if not self._wanted(rel, event.name, bool(mask & IN_ISDIR)):
                continue
            child = f"{rel}/{event.name}" if rel else event.name
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    self._walk(child)
                    changes.directories.add(child)
                elif mask & (IN_MOVED_FROM | IN_DELETE):
                    self._forget(child)
            changes.directories.add(rel)


# --- polling ---------------------------------------------------------------------------


class PollingSource:
    """Reports "anything may have changed" every ``interval`` seconds."""

    name = "polling"

    def __init__(self, waker: Waker, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"the poll interval must be positive, got {interval}")
        self._waker = waker
        self.interval = interval
        self._next_tick = 0.0

    watch_count = 0

    def start(self) -> None:
        self._next_tick = time.monotonic() + self.interval

    def rescan(self) -> None:
        self._next_tick = time.monotonic()

    def pace(self, generation_seconds: float) -> None:
        """Leave ``POLL_PACE`` times the last generation's duration before the next tick,
        if that is longer than the interval: a lab whose every scan takes seconds is then
        polled with at most a fifth of a core."""
        self._next_tick = max(self._next_tick, time.monotonic() + POLL_PACE * generation_seconds)

    def wait(self, timeout: float | None) -> Changes:
        now = time.monotonic()
        until_tick = self._next_tick - now
        limit = until_tick if timeout is None else min(timeout, until_tick)
        if limit > 0 and self._waker.fileno() in _select([self._waker.fileno()], limit):
            self._waker.drain()
        now = time.monotonic()
        if now < self._next_tick:
            return Changes()
        self._next_tick = now + self.interval
        return Changes(rescan=True)

    def close(self) -> None:
        pass


ChangeSource = InotifySource | PollingSource

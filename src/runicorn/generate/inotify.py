"""Linux inotify through ``ctypes`` on libc: no compiled module, no new dependency.

Only what the publisher needs: one non-blocking, close-on-exec instance, adding and removing
watches, and parsing the ``struct inotify_event`` records a ``read`` returns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import NamedTuple

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT_HEADER = struct.Struct("iIII")
"""``int wd; uint32_t mask, cookie, len;`` followed by ``len`` bytes of NUL-padded name."""

READ_BUFFER_BYTES = 256 * 1024
"""One ``read`` takes up to this much: about 4,000 events with short names."""

MAX_USER_WATCHES_PATH = "/proc/sys/fs/inotify/max_user_watches"


class InotifyEvent(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: str
    """The entry's name inside the watched directory; empty for events on the directory itself."""


class InotifyUnavailable(OSError):
    """inotify cannot be used here (not Linux, no libc symbol, or the kernel refused)."""


def encode_event(wd: int, mask: int, cookie: int = 0, name: str = "") -> bytes:
    """The bytes the kernel would return for one event (names NUL-padded to 4 bytes).

    Tests use it to feed events the kernel cannot be made to produce on demand, such as a
    queue overflow.
    """
    raw = os.fsencode(name)
    length = (len(raw) // 4 + 1) * 4 if raw else 0
    return _EVENT_HEADER.pack(wd, mask, cookie, length) + raw.ljust(length, b"\0")


def parse_events(buffer: bytes) -> list[InotifyEvent]:
    """Split what one ``read`` of an inotify descriptor returned into events.

    The kernel only ever returns whole events; a truncated tail would be a bug elsewhere,
    so it is an error rather than something to carry over.
    """
    events: list[InotifyEvent] = []
    offset = 0
    size = _EVENT_HEADER.size
    end = len(buffer)
    while offset < end:
        if end - offset < size:
            raise ValueError(f"truncated inotify event header at byte {offset} of {end}")
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(buffer, offset)
        offset += size
        if end - offset < length:
            raise ValueError(f"truncated inotify event name at byte {offset} of {end}")
        name = os.fsdecode(buffer[offset : offset + length].split(b"\0", 1)[0]) if length else ""
        offset += length
        events.append(InotifyEvent(wd, mask, cookie, name))
    return events


def max_user_watches() -> int | None:
    """The kernel's per-user watch limit, or ``None`` when it cannot be read."""
    try:
        with open(MAX_USER_WATCHES_PATH, "rb") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def watches_in_use() -> int:
    """Watches the processes this user can inspect hold now (each counts against the limit).

    Counted from ``/proc/<pid>/fdinfo`` of every inotify descriptor we may read; another
    user's watches do not count against ours, and theirs are unreadable anyway.
    """
    total = 0
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as handle:
                    total += sum(line.startswith(b"inotify wd:") for line in handle)
            except OSError:
                continue
    return total


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        init1 = libc.inotify_init1
        add = libc.inotify_add_watch
        rm = libc.inotify_rm_watch
    except (OSError, AttributeError) as error:
        raise InotifyUnavailable(f"inotify is not available in {name}: {error}") from error
    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    rm.argtypes = [ctypes.c_int, ctypes.c_int]
    rm.restype = ctypes.c_int
    return libc


class Inotify:
    """One inotify instance: ``add_watch``/``rm_watch`` and ``read_events`` (non-blocking;
    wait for :meth:`fileno` to be readable first)."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd: int = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise InotifyUnavailable(code, f"inotify_init1 failed: {os.strerror(code)}")
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path``; returns the watch descriptor (the same one if already watched).

        Raises ``OSError`` with the kernel's errno: ``ENOSPC`` when the user's watch limit
        is reached, ``ENOENT``/``ENOTDIR`` when the path vanished or is no longer a directory.
        """
        wd: int = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Stop watching; a watch the kernel already dropped (``EINVAL``) is not an error."""
        if self._libc.inotify_rm_watch(self._fd, wd) < 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:
                raise OSError(code, os.strerror(code))

    def read_events(self) -> list[InotifyEvent]:
        """The events queued now (an empty list when none are)."""
        try:
            buffer = os.read(self._fd, READ_BUFFER_BYTES)
        except BlockingIOError:
            return []
        return parse_events(buffer)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

"""Open a path under a directory without following a symbolic link anywhere on the way.

``O_NOFOLLOW`` guards only the last component of a path: a server that swaps a run's
``media/`` for a link to ``/etc`` after the manifest was made would still have ``media/x``
opened through it. :func:`open_beneath` resolves every component relative to a directory
descriptor and refuses a link at any of them, so nothing outside that directory can be
reached by the names it is given.

Where the kernel has ``openat2`` (Linux 5.6+), one system call does it
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``); elsewhere, or where a
seccomp filter refuses it (``ENOSYS``/``EPERM``), each directory is opened with
``O_NOFOLLOW | O_DIRECTORY`` relative to the one before, which gives the same answer at one
system call per component. Where there is no ``dir_fd`` at all (Windows),
:mod:`runicorn._sys.dirs` checks each component by path instead, with the same errors.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from collections.abc import Callable

__all__ = ["LinkOnPathError", "open_beneath", "refused"]

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}
"""``openat2``'s number in the generic system-call table these architectures share."""

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class LinkOnPathError(OSError):
    """A component of the path is a symbolic link (or leads out of the directory)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _Openat2:
    """``openat2`` through libc's ``syscall``, or ``None`` from :meth:`get` where there is none."""

    _lock = threading.Lock()
    _call: Callable[..., int] | None = None
    _number = 0
    _known = False

    @classmethod
    def get(cls) -> tuple[Callable[..., int], int] | None:
        with cls._lock:
            if not cls._known:
                cls._known = True
                cls._load()
            return None if cls._call is None else (cls._call, cls._number)

    @classmethod
    def _load(cls) -> None:
        machine = os.uname().machine if hasattr(os, "uname") else ""
        if not sys.platform.startswith("linux") or machine not in _SYS_OPENAT2:
            return
        try:
            call = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            return
        call.restype = ctypes.c_long
        cls._call, cls._number = call, _SYS_OPENAT2[machine]

    @classmethod
    def disable(cls) -> None:
        with cls._lock:
            cls._call = None


def refused(path: str) -> LinkOnPathError:
    """The error for a link (or a ``..``) on ``path``: the descriptor and path forms
    (:mod:`runicorn._sys.dirs`) give the same one."""
    return LinkOnPathError(
        errno.ELOOP,
        "a component of the path is a symbolic link (or leads outside the directory); "
        "refusing to follow it",
        path,
    )


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0o666) -> int:
    """A descriptor of ``path`` (relative, ``/``-separated, no ``..``) under ``dir_fd``.

    ``flags`` are :func:`os.open`'s; ``O_NOFOLLOW`` and ``O_CLOEXEC`` are added. A symbolic
    link at any component raises :class:`LinkOnPathError` (an ``OSError`` with ``ELOOP``);
    other failures raise the ``OSError`` the open gave, with ``path`` as its file name.
    ``""`` opens ``dir_fd``'s directory again.
    """
    flags |= _CLOEXEC | _NOFOLLOW
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refused(path)
    if not parts:
        return os.open(".", flags & ~_NOFOLLOW, dir_fd=dir_fd)
    found = _Openat2.get()
    if found is not None:
        call, number = found
        resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, resolve)
        fd = call(
            number,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode("/".join(parts))),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM):
            _Openat2.disable()  # an old kernel or a sandbox: the chain below does the same
        elif code in (errno.ELOOP, errno.EXDEV):
            raise refused(path)
        elif code not in (errno.EAGAIN, errno.ENOTDIR):
            raise OSError(code, os.strerror(code), path)
        # EAGAIN: a rename raced the lookup; ENOTDIR: a file, or a link where a directory
        # was asked for. The chain below retries and tells the two apart.
    return _open_by_chain(dir_fd, parts, path, flags, mode)


def _open_by_chain(dir_fd: int, parts: list[str], path: str, flags: int, mode: int) -> int:
    """Each directory relative to the last with ``O_NOFOLLOW | O_DIRECTORY``, then the file."""
    current = dir_fd
    try:
        for part in parts[:-1]:
            try:
                step = os.open(
                    part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=current
                )
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(current, part):
                    raise refused(path) from None
                raise OSError(error.errno, error.strerror, path) from None
            if current != dir_fd:
                os.close(current)
            current = step
        try:
            return os.open(parts[-1], flags, mode, dir_fd=current)
        except OSError as error:
            if error.errno == errno.ELOOP or (
                error.errno == errno.ENOTDIR and _is_link(current, parts[-1])
            ):
                raise refused(path) from None
            raise OSError(error.errno, error.strerror, path) from None
    finally:
        if current != dir_fd:
            os.close(current)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False

"""A directory reached without following a link, and the few operations done inside it.

The cache tree, the atomic writer and the local remote work relative to a directory they
opened safely: on POSIX a descriptor and the ``*at`` calls (``dir_fd``), so a link swapped
in after a check is refused by the kernel. Windows has no ``dir_fd``, no ``O_NOFOLLOW`` or
``O_DIRECTORY``, and cannot ``open`` a directory: there a directory is its path, and every
name is checked with ``lstat`` -- not a symbolic link, not a junction or other reparse
point -- right before it is used. That leaves a window between the check and the use (see
docs/reliability.md, known limits) that the descriptor form does not have.

:func:`open_directory` picks the form once, for the process (:data:`USE_DIR_FD`); callers
only ever see :class:`Directory`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import Protocol

from runicorn._sys.beneath import LinkOnPathError, open_beneath, refused

__all__ = [
    "USE_DIR_FD",
    "Directory",
    "LinkOnPathError",
    "is_link",
    "link_refused",
    "open_directory",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _dir_fd_usable() -> bool:
    """Whether every call the descriptor form makes takes ``dir_fd`` here (not on Windows)."""
    # (os.replace is not listed there, but takes dir_fd exactly where os.rename does.)
    calls = (os.open, os.stat, os.unlink, os.rmdir, os.mkdir, os.rename, os.utime)
    return (
        all(call in os.supports_dir_fd for call in calls)
        and os.scandir in os.supports_fd
        and bool(_NOFOLLOW)
        and bool(_DIRECTORY)
    )


USE_DIR_FD = _dir_fd_usable()
"""Descriptors and ``dir_fd`` (POSIX), or checked paths (Windows): decided at import."""


def is_link(info: os.stat_result) -> bool:
    """Whether an ``lstat`` result is a symbolic link, or on Windows any reparse point (a
    junction, a mount point): both lead elsewhere."""
    attributes = getattr(info, "st_file_attributes", 0)
    return stat.S_ISLNK(info.st_mode) or bool(attributes & stat.FILE_ATTRIBUTE_REPARSE_POINT)


def link_refused(path: str) -> OSError:
    """The ``ELOOP`` an ``open`` with ``O_NOFOLLOW`` gives for a link, for the path form."""
    return OSError(errno.ELOOP, "is a symbolic link or a junction; refusing to follow it", path)


class Directory(Protocol):
    """A directory opened without following a link at its last component (earlier ones as
    the caller checked them). Names are single components; nothing is ever followed through
    a link at a name. Close it when done (a context manager too)."""

    @property
    def path(self) -> str:
        """Where it was when opened (for messages and the path form)."""
        ...

    def open(self, name: str, flags: int, mode: int = 0o666) -> int:
        """A descriptor of the file ``name``; ``OSError`` (``ELOOP``) if it is a link."""
        ...

    def child(self, name: str, *, create: bool = False, mode: int = 0o755) -> Directory:
        """The subdirectory ``name`` (made first when missing and ``create``); ``OSError``
        with ``ELOOP`` for a link, ``ENOTDIR`` for anything but a directory."""
        ...

    def open_beneath(self, path: str, flags: int, mode: int = 0o666) -> int:
        """The file at the relative ``path`` (``/``-separated) below this directory, no
        component followed if it is a link
        (:class:`~runicorn._sys.beneath.LinkOnPathError`)."""
        ...

    def descend(self, path: str) -> Directory:
        """The directory at the relative ``path`` below this one, as :meth:`open_beneath`
        reaches it (``""``: this directory again)."""
        ...

    def parent(self) -> Directory:
        """The directory above (``..``): check its :meth:`identity` before trusting it."""
        ...

    def identity(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of this directory."""
        ...

    def lstat(self, name: str) -> os.stat_result:
        """``name``'s own status (a link is not followed)."""
        ...

    def scandir(self) -> contextlib.AbstractContextManager[Iterator[os.DirEntry[str]]]:
        """The entries of this directory (``entry.stat(follow_symlinks=False)`` works)."""
        ...

    def unlink(self, name: str) -> None: ...

    def rmdir(self, name: str) -> None: ...

    def replace(self, source: str, target: str) -> None:
        """Rename ``source`` over ``target``, both names in this directory."""
        ...

    def move_in(self, source: str, name: str) -> None:
        """Rename the path ``source`` (anywhere on the same file system) to ``name`` here."""
        ...

    def set_times(self, fd: int, name: str, ns: tuple[int, int]) -> None:
        """Set the times of ``name``, open as ``fd``, to ``ns`` (access, modification)."""
        ...

    def fsync(self) -> None:
        """Make the directory's entries durable, where the system can (not Windows)."""
        ...

    def dup(self) -> Directory:
        """Another handle on the same directory, closed separately."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Directory: ...

    def __exit__(self, *exc_info: object) -> None: ...


class _FdDirectory:
    """The descriptor form: every call is an ``*at`` call relative to :attr:`fd`."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def open(self, name: str, flags: int, mode: int = 0o666) -> int:
        return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=self.fd)

    def child(self, name: str, *, create: bool = False, mode: int = 0o755) -> _FdDirectory:
        flags = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=self.fd)
            fd = os.open(name, flags, dir_fd=self.fd)
        return _FdDirectory(fd, os.path.join(self.path, name))

    def open_beneath(self, path: str, flags: int, mode: int = 0o666) -> int:
        return open_beneath(self.fd, path, flags, mode)

    def descend(self, path: str) -> _FdDirectory:
        fd = open_beneath(self.fd, path, os.O_RDONLY | _DIRECTORY)
        return _FdDirectory(fd, os.path.join(self.path, *_parts(path)))

    def parent(self) -> _FdDirectory:
        fd = os.open("..", os.O_RDONLY | _DIRECTORY | _CLOEXEC, dir_fd=self.fd)
        return _FdDirectory(fd, os.path.dirname(self.path))

    def identity(self) -> tuple[int, int]:
        info = os.fstat(self.fd)
        return (info.st_dev, info.st_ino)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def scandir(self) -> contextlib.AbstractContextManager[Iterator[os.DirEntry[str]]]:
        # scandir(fd) gives entries named, not pathed: as the path form's, by name.
        return os.scandir(self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd)

    def replace(self, source: str, target: str) -> None:
        os.replace(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def move_in(self, source: str, name: str) -> None:
        os.rename(source, name, dst_dir_fd=self.fd)

    def set_times(self, fd: int, name: str, ns: tuple[int, int]) -> None:
        os.utime(fd, ns=ns)

    def fsync(self) -> None:
        with contextlib.suppress(OSError):  # some file systems refuse to fsync a directory
            os.fsync(self.fd)

    def dup(self) -> _FdDirectory:
        return _FdDirectory(os.dup(self.fd), self.path)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _FdDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _PathDirectory:
    """The path form: a directory is its path; each name is ``lstat``-checked before use."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def _unlinked(self, name: str, *, missing_ok: bool) -> str:
        """The path of ``name`` here after checking it is no link (or is missing)."""
        target = os.path.join(self.path, name)
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            if missing_ok:
                return target
            raise
        if is_link(info):
            raise link_refused(target)
        return target

    def open(self, name: str, flags: int, mode: int = 0o666) -> int:
        target = self._unlinked(name, missing_ok=bool(flags & os.O_CREAT))
        if stat.S_ISDIR(_lstat_mode(target)):
            raise IsADirectoryError(errno.EISDIR, "is a directory", target)
        return os.open(target, flags | _CLOEXEC, mode)

    def child(self, name: str, *, create: bool = False, mode: int = 0o755) -> _PathDirectory:
        target = os.path.join(self.path, name)
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(target, mode)
            info = os.lstat(target)
        if is_link(info):
            raise link_refused(target)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "is not a directory", target)
        return _PathDirectory(target)

    def open_beneath(self, path: str, flags: int, mode: int = 0o666) -> int:
        parts = _parts(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        parent = self._beneath(parts[:-1], path)
        target = os.path.join(parent, parts[-1])
        try:
            info: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
            info = None
        except OSError as error:
            raise OSError(error.errno, error.strerror, path) from None
        if info is not None and is_link(info):
            raise refused(path)
        try:
            return os.open(target, flags | _CLOEXEC, mode)
        except OSError as error:
            raise OSError(error.errno, error.strerror, path) from None

    def descend(self, path: str) -> _PathDirectory:
        parts = _parts(path)
        return _PathDirectory(self._beneath(parts, path))

    def _beneath(self, parts: list[str], path: str) -> str:
        """The path of the directory ``parts`` below this one, each component checked to
        be a directory and no link (:class:`LinkOnPathError` naming ``path``)."""
        current = self.path
        for part in parts:
            current = os.path.join(current, part)
            try:
                info = os.lstat(current)
            except OSError as error:
                raise OSError(error.errno, error.strerror, path) from None
            if is_link(info):
                raise refused(path)
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "is not a directory", path)
        return current

    def parent(self) -> _PathDirectory:
        return _PathDirectory(os.path.dirname(self.path))

    def identity(self) -> tuple[int, int]:
        info = os.lstat(self.path)
        return (info.st_dev, info.st_ino)

    def lstat(self, name: str) -> os.stat_result:
        return os.lstat(os.path.join(self.path, name))

    def scandir(self) -> contextlib.AbstractContextManager[Iterator[os.DirEntry[str]]]:
        return os.scandir(self.path)

    def unlink(self, name: str) -> None:
        """Remove ``name``; a link (a junction too) goes itself, never what it points to."""
        target = os.path.join(self.path, name)
        info = os.lstat(target)
        if is_link(info) and stat.S_ISDIR(info.st_mode):
            os.rmdir(target)  # a junction: rmdir removes the link, not its target's files
        else:
            os.unlink(target)

    def rmdir(self, name: str) -> None:
        os.rmdir(self._unlinked(name, missing_ok=False))

    def replace(self, source: str, target: str) -> None:
        # A link at ``target`` is replaced, never followed: a rename takes names as they are.
        os.replace(self._unlinked(source, missing_ok=False), os.path.join(self.path, target))

    def move_in(self, source: str, name: str) -> None:
        os.rename(source, os.path.join(self.path, name))

    def set_times(self, fd: int, name: str, ns: tuple[int, int]) -> None:
        if os.utime in os.supports_fd:
            os.utime(fd, ns=ns)
        else:
            os.utime(self._unlinked(name, missing_ok=False), ns=ns)

    def fsync(self) -> None:
        """Nothing: a directory cannot be opened, let alone synced, on Windows."""

    def dup(self) -> _PathDirectory:
        return _PathDirectory(self.path)

    def close(self) -> None:
        """Nothing to close: the path form holds no descriptor."""

    def __enter__(self) -> _PathDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parts(path: str) -> list[str]:
    """The components of a relative ``/``-separated path; ``..`` is refused."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refused(path)
    return parts


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def open_directory(path: str | os.PathLike[str], *, follow: bool = True) -> Directory:
    """The directory at ``path``. With ``follow=False`` a link (or junction) there is
    refused with ``ELOOP``; earlier components are followed as the system resolves them
    (the caller named them). ``NotADirectoryError`` for anything but a directory."""
    name = os.fspath(path)
    if USE_DIR_FD:
        flags = os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if follow else _NOFOLLOW)
        return _FdDirectory(os.open(name, flags), name)
    info = os.stat(name) if follow else os.lstat(name)
    if not follow and is_link(info):
        raise link_refused(name)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "is not a directory", name)
    return _PathDirectory(name)

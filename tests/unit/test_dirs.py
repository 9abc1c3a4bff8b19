"""The two forms of :mod:`runicorn._sys.dirs` side by side on this machine: the same
answers, the same refusals of a link, whichever form the process uses."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from runicorn._sys import dirs
from runicorn._sys.beneath import LinkOnPathError

# Both forms run here: the descriptor one is what this machine picks, the path one is
# built directly (it needs nothing Windows has and Linux lacks).
FORMS: dict[str, Callable[[Path], dirs.Directory]] = {
    "dir_fd": lambda path: dirs._FdDirectory(
        os.open(path, os.O_RDONLY | os.O_DIRECTORY), str(path)
    ),
    "path": lambda path: dirs._PathDirectory(str(path)),
}


@pytest.fixture(params=sorted(FORMS))
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Path], dirs.Directory]:
    return FORMS[request.param]


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_bytes(b"outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "a" / "file-link").symlink_to(outside / "f.txt")
    return root


def test_files_and_directories_below_are_reached(opened, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with opened(root) as top, top.child("a") as a, a.child("b") as b:
        fd = b.open("f.txt", os.O_RDONLY)
        try:
            assert os.read(fd, 100) == b"inside"
        finally:
            os.close(fd)
        assert sorted(entry.name for entry in b.scandir()) == ["f.txt"]
        assert b.identity() == (os.stat(root / "a" / "b").st_dev, os.stat(root / "a" / "b").st_ino)
        with b.parent() as up:
            assert up.identity() == a.identity()
        fd = top.open_beneath("a/b/f.txt", os.O_RDONLY)
        os.close(fd)
        with top.descend("a/b") as again:
            assert again.identity() == b.identity()


def test_a_link_is_refused_at_every_step(opened, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with opened(root) as top:
        with pytest.raises(OSError) as caught:
            top.child("link")
        assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
        with top.child("a") as a, pytest.raises(OSError) as caught:
            a.open("file-link", os.O_RDONLY)
        assert caught.value.errno == errno.ELOOP
        with pytest.raises(LinkOnPathError):
            top.open_beneath("link/f.txt", os.O_RDONLY)
        with pytest.raises(LinkOnPathError):
            top.descend("link")
        with pytest.raises(LinkOnPathError):
            top.open_beneath("a/../link/f.txt", os.O_RDONLY)


def test_create_replace_unlink_and_rmdir(opened, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with opened(root) as top:
        with top.child("new", create=True) as new:
            fd = new.open("t.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x")
            new.set_times(fd, "t.part", (10**9, 10**9))
            os.close(fd)
            new.replace("t.part", "t")
            assert new.lstat("t").st_mtime_ns == 10**9
            new.unlink("t")
        top.rmdir("new")
        top.unlink("link")  # the link goes, never what it points to
    assert not (root / "new").exists() and (tmp_path / "outside" / "f.txt").is_file()


def test_open_directory_refuses_a_link_only_when_asked(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with dirs.open_directory(root / "link") as followed:
        assert followed.identity()[1] == os.stat(tmp_path / "outside").st_ino
    with pytest.raises(OSError) as caught:
        dirs.open_directory(root / "link", follow=False)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_a_windows_junction_counts_as_a_link() -> None:
    junction = SimpleNamespace(
        st_mode=stat.S_IFDIR | 0o755, st_file_attributes=stat.FILE_ATTRIBUTE_REPARSE_POINT
    )
    plain = SimpleNamespace(st_mode=stat.S_IFDIR | 0o755, st_file_attributes=0)
    assert dirs.is_link(junction)  # type: ignore[arg-type]
    assert not dirs.is_link(plain)  # type: ignore[arg-type]
    assert dirs.is_link(os.lstat("/proc/self/exe"))


def test_a_link_at_the_target_name_is_replaced_never_followed(opened, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with opened(root) as top, top.child("a") as a:
        fd = a.open("new.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"real")
        os.close(fd)
        a.replace("new.part", "file-link")
    assert (root / "a" / "file-link").read_bytes() == b"real"
    assert not (root / "a" / "file-link").is_symlink()
    assert (tmp_path / "outside" / "f.txt").read_bytes() == b"outside"

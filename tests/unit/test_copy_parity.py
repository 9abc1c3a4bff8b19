"""The compiled ``copy_files``/``install_files`` and the pure specification give the same
results and leave the same target tree, on random source trees with links, directories and
FIFOs in the way, vanished files, files shorter than asked, and cache trees with links and
files where directories should be; and a permission-heavy case as an unprivileged user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.core import copy as spec
from runicorn.core.backend import Backend

pytestmark = pytest.mark.skipif(
    os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0"),
    reason="parity needs the compiled core",
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PREFIX = ".runicorn-tmp-test-"


NAMES = ["a.json", "b.txt", "c", "meta.json"]
DIRS = ["", "r", "r/media", "r/media/deep", "s", "s/t", "link", "link/in"]
# what a source or target name is: missing, a file, a directory, a link (in or out), a FIFO
SOURCE_KINDS = ["file", "file", "file", "missing", "dir", "link-in", "link-out", "fifo"]
TARGET_KINDS = ["missing", "missing", "file", "dir", "link-in"]


@st.composite
def cases(draw: st.DrawFn) -> dict:
    paths = draw(
        st.lists(
            st.tuples(st.sampled_from(DIRS), st.sampled_from(NAMES)),
            min_size=1,
            max_size=10,
            unique=True,  # a plan names each path once; two jobs on one path race by design
        )
    )
    jobs = []
    source: dict[str, tuple[str, bytes]] = {}
    target: dict[str, str] = {}
    for directory, name in paths:
        path = f"{directory}/{name}" if directory else name
        content = draw(st.binary(max_size=64))
        source.setdefault(path, (draw(st.sampled_from(SOURCE_KINDS)), content))
        target.setdefault(path, draw(st.sampled_from(TARGET_KINDS)))
        length = max(0, len(content) + draw(st.integers(-3, 3)))
        mtime_ns = draw(st.sampled_from([0, 1, -1_500_000_000, 1_735_689_600_123_456_789]))
        jobs.append((path, length, mtime_ns, draw(st.booleans())))
    # directories of the target: made, missing, a link to elsewhere, a file in the way
    kinds = st.sampled_from(["dir", "dir", "dir", "missing", "link", "file"])
    made = {d: draw(kinds) for d in DIRS}
    keep = draw(st.lists(st.booleans(), min_size=len(jobs), max_size=len(jobs)))
    return {
        "jobs": jobs,
        "source": source,
        "target": target,
        "made": made,
        "keep": keep,
        "make_dirs": draw(st.booleans()),
    }


def _build_source(root: Path, outside: Path, source: dict[str, tuple[str, bytes]]) -> None:
    root.mkdir(parents=True)
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x").write_bytes(b"inside")
    os.symlink(outside, root / "link")  # a directory link on the way out of the root
    for path, (kind, content) in source.items():
        full = root / path
        if path.startswith("link/"):
            continue  # beyond the link: the copy must refuse it whatever is there
        full.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            full.write_bytes(content)
        elif kind == "dir":
            full.mkdir(exist_ok=True)
        elif kind == "link-in":
            os.symlink(root / "elsewhere" / "x", full)
        elif kind == "link-out":
            os.symlink(outside / "secret", full)
        elif kind == "fifo":
            os.mkfifo(full)


def _build_target(root: Path, outside: Path, made: dict[str, str], target: dict[str, str]) -> None:
    root.mkdir(parents=True)
    for directory in sorted(d for d in made if d):
        kind = made[directory]
        full = root / directory
        if not full.parent.is_dir() or full.parent.is_symlink():
            continue
        if kind == "dir":
            full.mkdir()
        elif kind == "link":
            os.symlink(outside, full)
        elif kind == "file":
            full.write_bytes(b"in the way")
    for path, kind in target.items():
        full = root / path
        parent = full.parent
        if not parent.is_dir() or parent.is_symlink() or full.exists() or full.is_symlink():
            continue
        if kind == "file":
            full.write_bytes(b"old")
        elif kind == "dir":
            full.mkdir()
        elif kind == "link-in":
            os.symlink(".", full)  # relative: the same text in both targets
    for directory, _dirs, files in os.walk(root):
        for name in files:  # a fixed mtime, so only what the copy wrote differs
            if not Path(directory, name).is_symlink():
                os.utime(Path(directory, name), ns=(5, 5))


def _snapshot(root: Path) -> list[tuple]:
    """Every entry below ``root``: kind, bytes and mtime of files, link targets."""
    entries = []
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            full = Path(directory, name)
            relative = str(full.relative_to(root))
            info = full.lstat()
            if full.is_symlink():
                entries.append((relative, "link", os.readlink(full)))
            elif full.is_dir():
                entries.append((relative, "dir"))
            else:
                entries.append((relative, "file", full.read_bytes(), info.st_mtime_ns))
    return sorted(entries)


def _run(backend: Backend, source: Path, target: Path, case: dict) -> tuple:
    source_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        results = backend.copy_files(
            source_fd, target_fd, case["jobs"], PREFIX, 3, make_dirs=case["make_dirs"]
        )
        held = [
            (case["jobs"][i][0], result[3], case["keep"][i])
            for i, result in enumerate(results)
            if result[0] == spec.HELD
        ]
        installed = backend.install_files(target_fd, held, 2)
    finally:
        os.close(source_fd)
        os.close(target_fd)
    return results, installed


@SETTINGS
@given(case=cases())
def test_copies_of_random_trees_match(both, tmp_path_factory, case):
    base = tmp_path_factory.mktemp("copy")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    source = base / "source"
    _build_source(source, outside, case["source"])
    outcomes = []
    for backend in both:
        target = base / f"target-{backend.name}"
        _build_target(target, outside, case["made"], case["target"])
        outcomes.append((_run(backend, source, target, case), _snapshot(target)))
    assert outcomes[0] == outcomes[1]
    assert sorted(os.listdir(outside)) == ["secret"]  # nothing written outside the target
    results = outcomes[0][0][0]
    for (path, _length, _mtime, _hold), result in zip(case["jobs"], results, strict=True):
        if path.startswith("link/"):
            assert result[:2] == (spec.SOURCE_FAILED, 40), path  # ELOOP: never followed
    shutil.rmtree(base)


def test_results_do_not_depend_on_threads(both, tmp_path):
    """Jobs in runs of one directory (taken by one thread each), in directories that change
    from job to job, and at the top: the same results and files with 1 and 4 threads."""
    source = tmp_path / "source"
    jobs = []
    for number in range(300):
        if number < 150:
            directory = f"d{number // 20}/"
        else:
            directory = f"e{number % 5}/" if number < 280 else ""
        (source / directory).mkdir(parents=True, exist_ok=True)
        (source / f"{directory}f{number}.json").write_bytes(b"{}" * number)
        jobs.append((f"{directory}f{number}.json", 2 * number, number, number % 3 == 0))
    native, _python = both
    seen = []
    for threads in (1, 4):
        target = tmp_path / f"target{threads}"
        target.mkdir()
        source_fd = os.open(source, os.O_RDONLY)
        target_fd = os.open(target, os.O_RDONLY)
        try:
            seen.append(
                native.copy_files(source_fd, target_fd, jobs, PREFIX, threads, make_dirs=True)
            )
        finally:
            os.close(source_fd)
            os.close(target_fd)
        held = [
            f"{jobs[n][0].rpartition('/')[0]}/{PREFIX}{n:x}.part".lstrip("/")
            for n in range(0, 300, 3)
        ]
        copied = [jobs[n][0] for n in range(300) if n % 3]
        landed = [
            str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()
        ]
        assert sorted(landed) == sorted(copied + held)
    assert seen[0] == seen[1]


@pytest.mark.parametrize("threads", [0, -1])
def test_thread_count_errors_match(both, tmp_path, threads):
    messages = []
    for backend in both:
        with pytest.raises(ValueError) as raised:
            backend.copy_files(0, 0, [], PREFIX, threads)
        messages.append(str(raised.value))
        with pytest.raises(ValueError):
            backend.install_files(0, [], threads)
    assert messages[0] == messages[1]


_UNPRIVILEGED = """
import json, os, sys
from runicorn.core.backend import load_backend
native, python = load_backend("native"), load_backend("python")
root = sys.argv[1]
os.setgid(65534)
os.setuid(65534)
out = {}
for backend in (native, python):
    target = os.path.join(root, "target-" + backend.name)
    source_fd = os.open(os.path.join(root, "source"), os.O_RDONLY)
    target_fd = os.open(target, os.O_RDONLY)
    jobs = [
        ("open.txt", 4, 0, False),
        ("locked.txt", 4, 0, False),
        ("closed/x.txt", 1, 0, False),
        ("ro/open.txt", 4, 0, False),
        ("ro/held.json", 2, 0, True),
    ]
    results = backend.copy_files(source_fd, target_fd, jobs, "tmp-", 2)
    out[backend.name] = [list(r[:3]) for r in results]
    os.close(source_fd)
    os.close(target_fd)
print(json.dumps(out))
"""


@pytest.fixture
def open_dir():
    """A directory the user nobody can reach (pytest's own sit in a private one)."""
    made = Path(tempfile.mkdtemp(prefix="runicorn-copy-parity-"))
    yield made
    for directory, dirs, _files in os.walk(made):
        for name in dirs:
            os.chmod(Path(directory, name), 0o755)
    shutil.rmtree(made, ignore_errors=True)


def test_permission_errors_match_for_an_unprivileged_user(both, open_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the user nobody")
    tmp_path = open_dir
    os.chmod(tmp_path, 0o755)
    source = tmp_path / "source"
    (source / "closed").mkdir(parents=True)
    (source / "ro").mkdir()
    for name in ("open.txt", "locked.txt", "ro/open.txt"):
        (source / name).write_bytes(b"data")
    (source / "ro" / "held.json").write_bytes(b"{}")
    (source / "closed" / "x.txt").write_bytes(b"x")
    os.chmod(source / "locked.txt", 0)
    os.chmod(source / "closed", 0)
    for backend in both:
        target = tmp_path / f"target-{backend.name}"
        (target / "ro").mkdir(parents=True)
        (target / "closed").mkdir()
        os.chmod(target / "ro", 0o555)
        os.chown(target, 65534, 65534)
    completed = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report = json.loads(completed.stdout)
    assert report["native"] == report["python"]
    assert report["python"] == [
        [spec.COPIED, 0, 4],
        [spec.SOURCE_FAILED, 13, 0],  # EACCES reading the source
        [spec.SOURCE_FAILED, 13, 0],  # EACCES on the way to it
        [spec.TARGET_FAILED, 13, 0],  # EACCES creating the temp file
        [spec.TARGET_FAILED, 13, 0],
    ]


def test_make_dirs_makes_what_is_missing_and_follows_no_link(both, tmp_path):
    source = tmp_path / "source"
    (source / "p" / "n" / "runs" / "r1").mkdir(parents=True)
    (source / "p" / "n" / "runs" / "r1" / "a.txt").write_bytes(b"abc")
    (source / "q" / "b.txt").parent.mkdir()
    (source / "q" / "b.txt").write_bytes(b"q")
    outside = tmp_path / "outside"
    outside.mkdir()
    jobs = [("p/n/runs/r1/a.txt", 3, 7, False), ("q/b.txt", 1, 7, False)]
    for backend in both:
        target = tmp_path / f"target-{backend.name}"
        target.mkdir()
        os.symlink(outside, target / "q")  # a link where a directory should be made
        source_fd = os.open(source, os.O_RDONLY)
        target_fd = os.open(target, os.O_RDONLY)
        try:
            without = backend.copy_files(source_fd, target_fd, jobs[:1], PREFIX)
            results = backend.copy_files(source_fd, target_fd, jobs, PREFIX, 2, make_dirs=True)
        finally:
            os.close(source_fd)
            os.close(target_fd)
        assert without == [(spec.TARGET_FAILED, 2, 0, None, None)]  # ENOENT: nothing made
        assert results == [(spec.COPIED, 0, 3, None, None), (spec.TARGET_FAILED, 40, 0, None, None)]
        made = target / "p" / "n" / "runs" / "r1"
        assert (made / "a.txt").read_bytes() == b"abc"
        assert (made.stat().st_mode & 0o777) == spec.DIR_MODE & ~_umask()
        assert os.listdir(outside) == []


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current

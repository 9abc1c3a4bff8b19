"""Differential property tests: the compiled core and the pure-Python specification return
identical results -- and raise identical exceptions -- for random trees, manifest pairs and
tail-hash requests.

Scope notes. Permission errors need an unprivileged user: the tests run as root in CI, where
``chmod 000`` blocks nothing, so the random trees still get unreadable modes (harmless under
root) and one dedicated test repeats a permission-heavy tree in a subprocess that drops to
``nobody`` after importing both backends. A file vanishing *during* a scan cannot be staged
deterministically from outside; the vanished-file paths of the tail hash are covered by
requests for missing files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.core.backend import Backend

pytestmark = pytest.mark.skipif(
    os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0"),
    reason="parity needs the compiled core",
)

SETTINGS = settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def outcome(call: Callable[[], Any]) -> tuple:
    """A comparable record of what a call did: its result, or its exception in full."""
    try:
        return ("returned", call())
    except Exception as error:
        return ("raised", type(error), str(error), getattr(error, "filename", None))


def assert_same(both: tuple[Backend, Backend], function: str, *args: Any) -> tuple:
    native, python = both
    expected = outcome(lambda: getattr(python, function)(*args))
    assert outcome(lambda: getattr(native, function)(*args)) == expected
    return expected


# --------------------------------------------------------------------------------------
# random trees

ODD_NAMES = [
    "a",
    "b",
    "Z",
    "run 1",
    "a-b",
    "a.b",
    "new\nline",
    "tab\tname",
    ".hidden",
    "..dots",
    "runs",
    "media",
    "émoji ✓",
    "日本語",
    "\u00ff",
    "\U0001f600",
    os.fsdecode(b"bad\xff\xfe"),  # undecodable bytes: surrogate escapes
    os.fsdecode(b"\xe9t\xe9"),
    os.fsdecode(b"\xc3"),
]

names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.text(
        alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=6,
    ).filter(lambda name: name not in (".", "..")),
)
file_nodes = st.tuples(st.just("file"), st.binary(max_size=40))
symlink_nodes = st.tuples(
    st.just("symlink"), st.sampled_from([".", "..", "/tmp", "/nonexistent", "meta.json"])
)
fifo_nodes = st.just(("fifo", None))


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """``one_of`` with weights (``one_of`` treats a repeated strategy as one branch)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda index: pool[index])


leaves = weighted((2, file_nodes), (1, symlink_nodes), (1, fifo_nodes), (1, st.just(("dir", {}))))


def dirs(children: st.SearchStrategy, min_size: int = 0, max_size: int = 4) -> st.SearchStrategy:
    """A directory node; some empty ones are made unreadable (mode 000, binds non-root)."""
    return st.tuples(
        st.just("dir"),
        st.dictionaries(names, children, min_size=min_size, max_size=max_size),
        st.integers(0, 5),
    ).map(lambda node: ("locked", {}) if not node[2] and not node[1] else ("dir", node[1]))


run_contents = st.recursive(leaves, lambda children: dirs(children), max_leaves=10)
run_nodes = weighted((4, dirs(run_contents)), (1, file_nodes), (1, symlink_nodes))
runs_nodes = weighted((4, dirs(run_nodes, min_size=1)), (1, file_nodes), (1, symlink_nodes))


@st.composite
def experiment_nodes(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["dir"] * 6 + ["file", "symlink"]))
    if kind == "file":
        return draw(file_nodes)
    if kind == "symlink":
        return draw(symlink_nodes)
    children = draw(st.dictionaries(names, leaves, max_size=2))
    if draw(st.integers(0, 6)):
        children["runs"] = draw(runs_nodes)
    return ("dir", children)


project_nodes = weighted(
    (3, dirs(experiment_nodes(), min_size=1, max_size=3)),
    (1, dirs(experiment_nodes(), max_size=3)),
    (1, leaves),
)
marker_nodes = weighted((4, file_nodes), (1, st.just(("dir", {}))), (1, symlink_nodes))


@st.composite
def run_path_nodes(draw: st.DrawFn, depth: int = 0) -> tuple:
    """A directory below ``runs/`` (runs-path layout): runs (a directory holding meta.json
    or status.json, of any type), deeper path components, and stray leaves."""
    kinds = ["run", "run", "path", "leaf"] if depth < 3 else ["run", "leaf"]
    children: dict[str, tuple] = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(names)
        kind = draw(st.sampled_from(kinds))
        if kind == "run":
            node = draw(dirs(run_contents))
            if node[0] == "dir" and draw(st.integers(0, 4)):
                node[1][draw(st.sampled_from(["meta.json", "status.json"]))] = draw(marker_nodes)
        elif kind == "path":
            node = draw(run_path_nodes(depth + 1))
        else:
            node = draw(leaves)
        children[name] = node
    return ("dir", children)


def _with_runs_tree(pair: tuple[dict, tuple | None]) -> dict:
    tree, runs = pair
    if runs is not None:
        tree = {**tree, "runs": runs}
    return tree


trees = st.tuples(
    st.dictionaries(names, project_nodes, max_size=4),
    st.one_of(st.none(), run_path_nodes(), st.just(("symlink", "/tmp"))),
).map(_with_runs_tree)

TIMES_NS = [
    0,
    1,
    1_700_000_000_123_456_789,
    -1_000_000_000,
    4_102_444_800_000_000_001,
    9_300_000_000_000_000_007,
]


def materialise(path: str, children: dict) -> None:
    for name, (kind, payload) in children.items():
        target = os.path.join(path, name)
        if kind == "file":
            with open(target, "wb") as handle:
                handle.write(payload)
            stamp = TIMES_NS[len(payload) % len(TIMES_NS)]
            with contextlib.suppress(OSError):  # a time the file system cannot store
                os.utime(target, ns=(stamp, stamp))
        elif kind == "symlink":
            os.symlink(payload, target)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "dir":
            os.mkdir(target)
            materialise(target, payload)
        elif kind == "locked":
            os.mkdir(target, 0o000)


def unlock(root: str) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)


@pytest.fixture
def scratch():
    """A fresh directory per hypothesis example."""
    made: list[str] = []

    def make() -> str:
        made.append(tempfile.mkdtemp(prefix="runicorn-parity-"))
        return made[-1]

    yield make
    for path in made:
        unlock(path)
        shutil.rmtree(path, ignore_errors=True)


read_names = st.lists(st.sampled_from([*ODD_NAMES, "meta.json", "a/b", "\ud800", ""]), max_size=4)


@SETTINGS
@given(tree=trees, threads=st.sampled_from([1, 1, 2, 3]), read=read_names)
def test_scan_of_random_trees_matches(both, scratch, tree, threads, read):
    root = scratch()
    materialise(root, tree)
    assert_same(both, "scan_experiments", root, threads, read)


@SETTINGS
@given(tree=trees)
def test_scan_result_does_not_depend_on_threads(both, scratch, tree):
    native, _ = both
    root = scratch()
    materialise(root, tree)
    assert outcome(lambda: native.scan_experiments(root, 4)) == outcome(
        lambda: native.scan_experiments(root, 1)
    )


@pytest.mark.parametrize("threads", [0, -1, "2", None, 2.0])
def test_scan_argument_errors_match(both, tmp_path, threads):
    assert_same(both, "scan_experiments", str(tmp_path), threads)


@pytest.mark.parametrize("read", ["meta.json", [b"meta.json"], [1], None, 7, iter(["x"])], ids=repr)
def test_scan_read_argument_errors_match(both, tmp_path, read):
    assert_same(both, "scan_experiments", str(tmp_path), 1, read)


@pytest.mark.parametrize(
    "root",
    ["missing", "a-file", "bad\0root", b"bytes-root", 42, None, "link-to-lab", Path("lab")],
    ids=repr,
)
def test_scan_root_errors_and_types_match(both, tmp_path, monkeypatch, root):
    monkeypatch.chdir(tmp_path)
    os.makedirs("lab/p/e/runs/r")
    Path("lab/p/e/runs/r/meta.json").write_text("{}")
    Path("a-file").write_text("x")
    os.symlink("lab", "link-to-lab")
    os.makedirs("bytes-root")
    assert_same(both, "scan_experiments", root)


_UNPRIVILEGED_SCAN = r"""
import json, os, sys
from runicorn.core.backend import load_backend
native, python = load_backend("native"), load_backend("python")
os.setgroups([]); os.setgid(65534); os.setuid(65534)
def outcome(call):
    try:
        result = call()
        if hasattr(result, "contents"):  # a dict: equal in any order, but repr is not
            result = result._replace(contents=sorted(result.contents.items()))
        return ["returned", repr(result)]
    except Exception as error:
        return ["raised", type(error).__name__, str(error)]
root = sys.argv[1]
requests = [(p, 3, c) for p in ("p/e/runs/r/locked.txt", "p/e/runs/r/meta.json") for c in (0, 1)]
print(json.dumps({
    "scan": [outcome(lambda: b.scan_experiments(root)) for b in (native, python)],
    "scan_threads": [outcome(lambda: b.scan_experiments(root, 2)) for b in (native, python)],
    "scan_read": [
        outcome(lambda: b.scan_experiments(root, 1, ["meta.json", "locked.txt"]))
        for b in (native, python)
    ],
    "unlistable_root": [
        outcome(lambda: b.scan_experiments(root + "/p0")) for b in (native, python)
    ],
    "tails": [outcome(lambda: b.hash_tails(root, requests)) for b in (native, python)],
}))
"""


def test_permission_errors_match_for_an_unprivileged_user(both, scratch):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the user nobody")
    root = scratch()
    os.chmod(root, 0o755)
    layout = {
        "p/e/runs/r/meta.json": "{}\n",
        "p/e/runs/r/locked.txt": "secret\n",
        "p/e/runs/r/media/a.png": "x",
        "p/e/runs/r-locked/meta.json": "{}",
        "p/e/runs/r2/locked-sub/x": "y",
        "p/e-locked-runs/runs/r/meta.json": "{}",
        "p/e-no-search/runs/r/meta.json": "{}",
        "p0/e/runs/r/meta.json": "{}",
        "q/e/runs/r/meta.json": "{}",
        "runs/p/r/meta.json": "{}",
        "runs/p/r-locked/meta.json": "{}",
        "runs/p-locked/r/meta.json": "{}",
        "runs/p-no-search/r/status.json": "{}",
        "runs/r/sub-locked/x": "y",
        "runs/r/meta.json": "{}",
    }
    for rel, text in layout.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Path(root, rel).write_text(text)
    for rel, mode in [
        ("p/e/runs/r/locked.txt", 0o000),
        ("p/e/runs/r-locked", 0o000),
        ("p/e/runs/r2/locked-sub", 0o000),
        ("p/e-locked-runs/runs", 0o000),
        ("p/e-no-search", 0o644),
        ("p0", 0o000),
        ("runs/p/r-locked", 0o000),
        ("runs/p-locked", 0o000),
        ("runs/p-no-search", 0o644),
        ("runs/r/sub-locked", 0o000),
    ]:
        os.chmod(os.path.join(root, rel), mode)
    completed = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED_SCAN, root],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report = json.loads(completed.stdout)
    for name, (native_outcome, python_outcome) in report.items():
        assert native_outcome == python_outcome, name
    assert "Permission denied" in report["scan"][1][1]
    assert report["unlistable_root"][1][0] == "raised"


# --------------------------------------------------------------------------------------
# random manifest pairs

PATHS = ["a", "a/b", "a-b", "b", "B", "é", "z\nz", "media/1.png", "m", "meta.json", "\U0001f600"]
sizes = st.integers(0, 4)
mtimes = st.sampled_from([0.0, 1.0, 1.5, 2, float("nan"), 1])
hashes = st.sampled_from([None, None, "h1", "h2"])
remote_entries = st.tuples(st.sampled_from(PATHS), sizes, mtimes, st.booleans(), hashes)
local_entries = st.tuples(st.sampled_from(PATHS), sizes, mtimes, hashes)


def arrange(entries: list[tuple], mode: str, odd: int) -> list | tuple:
    """Order the entries as ``mode`` says; make entry ``odd`` (if any) a list, or give it
    an ``int`` flag, so the compiled merge must leave its fast path half way."""
    if mode != "raw":  # raw: often unsorted, sometimes duplicated
        unique = {entry[0]: entry for entry in entries}
        entries = [unique[path] for path in sorted(unique)]
    if 0 <= odd < len(entries):
        entry = entries[odd]
        if odd % 2 and len(entry) == 5:
            entries[odd] = (*entry[:3], int(entry[3]), entry[4])
        else:
            entries[odd] = list(entry)
    return tuple(entries) if mode == "sorted-tuple" else entries


modes = st.sampled_from(["sorted", "sorted", "sorted", "sorted-tuple", "raw"])


@SETTINGS
@given(
    remote=st.lists(remote_entries, max_size=12),
    local=st.lists(local_entries, max_size=12),
    remote_mode=modes,
    local_mode=modes,
    odd=st.integers(-12, 11),
)
def test_diff_of_random_manifest_pairs_matches(both, remote, local, remote_mode, local_mode, odd):
    assert_same(
        both,
        "diff_entries",
        arrange(remote, remote_mode, odd),
        arrange(local, local_mode, odd - 3),
    )


@pytest.mark.parametrize(
    ("remote", "local"),
    [
        ([("a", 1, 1.0, True, None, "extra")], [("a", 1, 1.0, None)]),
        ([("a", 1, 1.0, True, None)], [("a", 1)]),
        ([("a",)], [["a", 1, 1.0, None]]),
        ([()], []),
        ([(1, 1, 1.0, True, None)], [("a", 1, 1.0, None)]),
        ([("a", 1, 1.0, True, None), (None, 1, 1.0, True, None)], []),
        (iter([("a", 1, 1.0, True, None)]), []),
        (None, []),
        ([("a", "1", 1.0, True, None)], [("a", 2, 1.0, None)]),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_diff_of_malformed_input_matches(both, remote, local):
    assert_same(both, "diff_entries", remote, local)


# --------------------------------------------------------------------------------------
# random tail requests

contents = st.binary(max_size=60).map(lambda data: data.replace(b"c", b"\n"))
tail_files = st.dictionaries(st.sampled_from(["f", "g h", "é", "x\ny", ".h", "n"]), contents)
request_paths = st.sampled_from(
    ["f", "g h", "é", "x\ny", ".h", "n", "missing", "dir", "link", "sub/../f", "bad\0path"]
)
request_sizes = st.one_of(st.integers(0, 70), st.sampled_from([-1, 1 << 40, 2.0]))
requests = st.lists(st.tuples(request_paths, request_sizes, st.booleans()), max_size=8)
windows = st.one_of(st.integers(1, 9), st.sampled_from([16, 64, 4096]))


algorithms = st.sampled_from(["blake3-128", "blake3-128", "md5"])


@SETTINGS
@given(files=tail_files, requests=requests, window=windows, algorithm=algorithms)
def test_tail_hashes_of_random_requests_match(both, scratch, files, requests, window, algorithm):
    root = scratch()
    for name, data in files.items():
        Path(root, name).write_bytes(data)
    os.mkdir(os.path.join(root, "dir"))
    os.mkdir(os.path.join(root, "sub"))
    os.symlink("f", os.path.join(root, "link"))
    assert_same(both, "hash_tails", root, requests, window, algorithm)


@pytest.mark.parametrize("algorithm", ["sha1", "", None, "BLAKE3-128", 5])
def test_tail_hash_algorithm_errors_match(both, tmp_path, algorithm):
    (tmp_path / "f").write_bytes(b"line\nhalf")
    assert_same(both, "hash_tails", str(tmp_path), [("f", 9, True)], 4096, algorithm)


@pytest.mark.parametrize("window", [0, -5, 1.5, "4", 1 << 70])
def test_tail_hash_window_errors_match(both, tmp_path, window):
    (tmp_path / "f").write_bytes(b"line\nhalf")
    assert_same(both, "hash_tails", str(tmp_path), [("f", 9, True)], window)


@pytest.mark.parametrize(
    "request_",
    [("f",), ("f", 1, True, 0), (1, 2, True), ("f", "9", True), ("f", 9, [1]), ("f", 9, None)],
    ids=repr,
)
def test_tail_hash_malformed_requests_match(both, tmp_path, request_):
    (tmp_path / "f").write_bytes(b"line\nhalf")
    assert_same(both, "hash_tails", str(tmp_path), [("f", 4, False), request_])


@pytest.mark.parametrize("root_type", [str, Path, os.fsencode], ids=["str", "Path", "bytes"])
@pytest.mark.parametrize("rel", ["f", "", "/etc/hostname", "f/", b"f"], ids=repr)
def test_tail_hash_root_and_path_types_match(both, tmp_path, root_type, rel):
    (tmp_path / "f").write_bytes(b"line\nhalf")
    root = root_type(str(tmp_path))
    assert_same(both, "hash_tails", root, [(rel, 0, False), (rel, 4, True)])


# --------------------------------------------------------------------------------------
# file entries and their JSON

RUN_FILE_NAMES = [
    "meta.json",
    "status.json",
    "summary.json",
    "logs.txt",
    "events.jsonl",
    "media/step_1.png",
    "media/logs.txt",
    "x.lock",
    ".deleted",
    "new\nline.txt",
    'quote".txt',
    "émoji ✓",
]
stat_ints = st.integers(0, 2_000_000_000_000_000_000)
records = st.dictionaries(
    st.one_of(st.sampled_from(RUN_FILE_NAMES), names),
    st.tuples(st.integers(0, 10**7), stat_ints, stat_ints, st.integers(0, 2**40)),
    max_size=8,
).map(lambda found: [(name, *stat) for name, stat in sorted(found.items())])
scan_runs = st.lists(
    st.tuples(st.sampled_from(["p", "proj ✓"]), st.sampled_from(["e", "x"]), names, records),
    max_size=5,
)
watched_names = st.lists(st.sampled_from(RUN_FILE_NAMES), max_size=3).map(tuple)


@st.composite
def runs_with_memos(draw: st.DrawFn) -> tuple[list, dict, int]:
    """Scan runs, memos for some of their append-only files (matching or not), and a reuse
    boundary that falls among their mtimes."""
    from runicorn.format.layout import run_prefix
    from runicorn.generate.state import FileMemo

    runs = draw(scan_runs)
    memos = {}
    mtimes = [0]
    for project, name, run_id, run_records in runs:
        for path_in_run, size, mtime, ctime, inode in run_records:
            mtimes.append(mtime)
            if draw(st.booleans()):
                key = (
                    (size, mtime, ctime, inode)
                    if draw(st.booleans())
                    else (size + 1, mtime, ctime, inode)
                )
                memos[run_prefix(project, name, run_id) + path_in_run] = FileMemo(
                    key,
                    draw(st.integers(0, size + 1)),
                    draw(st.sampled_from(["ab" * 16, "cd" * 16])),
                )
    return runs, memos, draw(st.sampled_from(mtimes)) + draw(st.integers(-1, 1))


@SETTINGS
@given(case=runs_with_memos(), watched=watched_names)
def test_file_entries_of_random_scans_match(both, case, watched):
    runs, memos, reuse_before = case
    assert_same(both, "build_file_entries", runs, memos, reuse_before, watched)


@pytest.mark.parametrize(
    "runs",
    [
        (("p", "e", "r", [("logs.txt", 1, 2, 3, 4)]),),
        [("p", "e", "r", (("logs.txt", 1, 2, 3, 4),))],
        [("p", "e", "r", [("logs.txt", 1.5, 2, 3, 4)])],
        [("p", "e", "r", [("logs.txt", 1, 2, 3)])],
        [("p", "e", "r", [["logs.txt", 1, 2, 3, 4]])],
        [("p", "e", "r", [(b"logs.txt", 1, 2, 3, 4)])],
        [("p", "e", [("logs.txt", 1, 2, 3, 4)])],
        [("p", "e", "r", [("meta.json", 1, 2, 3, 4), ("logs.txt", 1, "2", 3, 4)])],
        [None],
    ],
    ids=repr,
)
def test_file_entries_of_malformed_scans_match(both, runs):
    assert_same(both, "build_file_entries", runs, {}, 10, ("meta.json",))


@pytest.mark.parametrize(
    ("memos", "reuse_before", "watched"),
    [
        ({}, 10.5, ()),
        ({}, 10, ["meta.json"]),
        ({}, 10, (1,)),
        ({"p/e/runs/r/logs.txt": None}, 10, ()),
        ({"p/e/runs/r/logs.txt": "not a memo"}, 10, ()),
    ],
    ids=repr,
)
def test_file_entries_argument_errors_match(both, memos, reuse_before, watched):
    runs = [("p", "e", "r", [("logs.txt", 1, 2, 3, 4), ("meta.json", 1, 2, 3, 4)])]
    assert_same(both, "build_file_entries", runs, memos, reuse_before, watched)


def test_compiled_entries_are_ordinary_file_entries(both):
    """The compiled builder stores the slots of ``FileEntry`` itself (no ``__init__`` call):
    that must stay on for this class, and give objects like the constructor's."""
    import gc
    import sys

    from runicorn.core import _native_entries
    from runicorn.format.models import FileEntry

    assert _native_entries._direct_entries
    native, _ = both
    built = native.build_file_entries([("p", "e", "r", [("meta.json", 5, 10**9, 0, 1)])], {}, 0)
    entry = built.runs[0].files[0]
    assert type(entry) is FileEntry and gc.is_tracked(entry)
    assert entry == FileEntry("p/e/runs/r/meta.json", 5, 1.0, 1, False)
    assert sys.getrefcount(entry) == sys.getrefcount(FileEntry("x", 0, 0.0)) + 1


def test_file_entries_reuse_a_memo_whose_key_is_a_list_like_the_specification(both):
    from runicorn.generate.state import FileMemo

    runs = [("p", "e", "r", [("logs.txt", 1, 2, 3, 4)])]
    for key in ([1, 2, 3, 4], (1, 2, 3), (1.0, 2, 3, 4)):
        memos = {"p/e/runs/r/logs.txt": FileMemo(key, 1, "ab" * 16)}
        assert_same(both, "build_file_entries", runs, memos, 10, ())


json_text = st.one_of(
    names,
    st.sampled_from(['a"b', "back\\slash", "ctl\x01\x1f", "\x7f", "\u2028", "é", "\ud800"]),
)
json_numbers = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([2**64, -(2**63) - 1, True]),
)
json_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 2**62).map(lambda ns: ns / 1e9),
    st.sampled_from([0.0, -0.0, 1e16, 1e-5, 5e-324, 1.7976931348623157e308, 7]),
)


@st.composite
def experiment_lists(draw: st.DrawFn) -> list:
    from runicorn.format.models import ExperimentEntry, FileEntry

    class OddEntry(FileEntry):
        __slots__ = ()

    def file_entry() -> FileEntry:
        kind = draw(st.sampled_from([FileEntry, FileEntry, FileEntry, OddEntry]))
        return kind(
            draw(json_text),
            draw(json_numbers),
            draw(json_floats),
            draw(st.one_of(st.integers(1, 4), json_numbers)),
            draw(st.one_of(st.booleans(), st.sampled_from([0, 1, None]))),
            draw(st.one_of(st.none(), st.just("ab" * 16), json_text)),
        )

    experiments = []
    for _ in range(draw(st.integers(0, 4))):
        files = [file_entry() for _ in range(draw(st.integers(0, 4)))]
        experiments.append(
            ExperimentEntry(
                draw(json_text),
                draw(json_text),
                draw(json_text),
                draw(st.sampled_from(["running", "finished", "unknown"])),
                draw(json_floats),
                draw(json_floats),
                files if draw(st.integers(0, 5)) else tuple(files),
                draw(st.one_of(st.none(), st.just([]), st.lists(json_text, max_size=2))),
                draw(st.one_of(st.none(), st.just(""), json_text)),
            )
        )
    return experiments if draw(st.booleans()) else tuple(experiments)


@SETTINGS
@given(experiments=experiment_lists())
def test_experiment_json_matches_orjson_byte_for_byte(both, experiments):
    assert_same(both, "encode_experiments", experiments)


def test_experiment_json_of_a_generator_matches(both):
    from runicorn.format.models import ExperimentEntry

    def experiments():
        yield ExperimentEntry("r", "p", "e", "running", 1.5, 2.5)

    native, python = both
    assert native.encode_experiments(experiments()) == python.encode_experiments(experiments())


@pytest.mark.parametrize("unset", ["path", "size", "mtime", "tail_hash"])
def test_experiment_json_of_an_entry_with_an_unset_field_raises_alike(both, unset):
    """The compiled encoder reads the fields from their slots; an empty slot must still
    raise Python's own AttributeError."""
    from runicorn.format.models import ExperimentEntry, FileEntry

    entry = FileEntry("p/e/runs/r/logs.txt", 4, 1.5, 3, True, "ab")
    delattr(entry, unset)
    experiments = [ExperimentEntry("r", "p", "e", "running", 1.5, 2.5, [entry])]
    _, error_type, message, _ = assert_same(both, "encode_experiments", experiments)
    assert error_type is AttributeError and unset in message


def test_tail_hashes_of_a_batch_shared_by_threads_match(both, tmp_path):
    """Enough requests for the compiled core to spread a batch over helper threads."""
    requests = []
    for index in range(400):
        data = (b"line %d\n" % index) * (index % 7) + b"half" * (index % 3)
        if index % 11:
            (tmp_path / f"f{index}").write_bytes(data)
        requests.append((f"f{index}", max(0, len(data) - index % 2), bool(index % 5)))
    expected = assert_same(both, "hash_tails", str(tmp_path), requests, 16)
    assert expected[0] == "returned"
    assert sum(result is None for result in expected[1]) >= 400 // 11
    assert assert_same(both, "hash_tails", str(tmp_path), requests, 16, "md5")[0] == "returned"

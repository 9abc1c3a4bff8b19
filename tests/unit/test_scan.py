"""Behaviour of ``scan_experiments`` (runs on both backends through the ``backend`` fixture)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runicorn.core.scan import (
    MAX_READ_BYTES,
    REASON_NOT_A_DIRECTORY,
    REASON_NOT_REGULAR,
    REASON_SYMLINK,
    ScanResult,
)
from runicorn.format import names


def make(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(data)
    return root


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A small lab: two projects, three runs, a media subdirectory."""
    return make(
        tmp_path,
        {
            "vision/resnet/runs/20250101_000000_aaaaaa/meta.json": "{}",
            "vision/resnet/runs/20250101_000000_aaaaaa/events.jsonl": '{"step": 1}\n',
            "vision/resnet/runs/20250101_000000_aaaaaa/media/step_1.png": b"\x89PNG",
            "vision/resnet/runs/20250102_000000_bbbbbb/meta.json": "{}",
            "nlp/bert/runs/20250103_000000_cccccc/status.json": '{"status": "running"}',
        },
    )


def run_keys(result: ScanResult) -> list[tuple[str, str, str]]:
    return [(project, name, run_id) for project, name, run_id, _ in result.runs]


def paths(result: ScanResult, index: int = 0) -> list[str]:
    return [record[0] for record in result.runs[index][3]]


def test_finds_every_run_under_project_name_runs(backend, lab):
    assert run_keys(backend.scan_experiments(str(lab))) == [
        ("nlp", "bert", "20250103_000000_cccccc"),
        ("vision", "resnet", "20250101_000000_aaaaaa"),
        ("vision", "resnet", "20250102_000000_bbbbbb"),
    ]


def test_clean_lab_has_no_problems(backend, lab):
    assert backend.scan_experiments(str(lab)).problems == []


def test_file_records_carry_lstat_size_times_and_inode(backend, lab):
    result = backend.scan_experiments(str(lab))
    run_dir = lab / "nlp/bert/runs/20250103_000000_cccccc"
    st = os.lstat(run_dir / "status.json")
    assert result.runs[0][3] == [
        ("status.json", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_newest_mtime_is_the_latest_of_any_file_in_any_project(backend, tmp_path, threads):
    make(tmp_path, {"a/e/runs/r/f": "", "a/e/runs/r/media/g": "", "b/e/runs/s/h": ""})
    stamps = {"a/e/runs/r/f": 1_000, "a/e/runs/r/media/g": 3_000_000_007, "b/e/runs/s/h": -5}
    for rel, ns in stamps.items():
        os.utime(tmp_path / rel, ns=(0, ns))
    result = backend.scan_experiments(str(tmp_path), threads)
    assert result.newest_mtime_ns == 3_000_000_007
    assert result.newest_mtime_ns == max(r[2] for run in result.runs for r in run[3])


def test_a_lab_of_empty_runs_has_no_newest_mtime(backend, tmp_path):
    (tmp_path / "p/e/runs/r").mkdir(parents=True)
    assert backend.scan_experiments(str(tmp_path)).newest_mtime_ns is None


def test_files_in_subdirectories_have_posix_paths_relative_to_the_run(backend, lab):
    result = backend.scan_experiments(str(lab))
    assert paths(result, 1) == ["events.jsonl", "media/step_1.png", "meta.json"]


def test_files_are_sorted_by_full_path_in_run(backend, tmp_path):
    make(tmp_path, {"p/e/runs/r/a/x": "", "p/e/runs/r/a-b": "", "p/e/runs/r/a.c": ""})
    assert paths(backend.scan_experiments(str(tmp_path))) == ["a-b", "a.c", "a/x"]


def test_names_are_sorted_by_code_point(backend, tmp_path):
    make(tmp_path, {f"p/e/runs/{run}/f": "" for run in ("c", "B", "é", "a")})
    assert [key[2] for key in run_keys(backend.scan_experiments(str(tmp_path)))] == [
        "B",
        "a",
        "c",
        "é",
    ]


def test_hidden_names_above_the_run_level_are_skipped(backend, tmp_path):
    make(
        tmp_path,
        {
            ".runicorn/x/runs/r/f": "",
            "p/.tmp/runs/r/f": "",
            "p/e/runs/.half-created/f": "",
            "p/e/runs/r/f": "",
        },
    )
    result = backend.scan_experiments(str(tmp_path))
    assert (run_keys(result), result.problems) == ([("p", "e", "r")], [])


def test_hidden_files_inside_a_run_are_listed(backend, tmp_path):
    make(tmp_path, {"p/e/runs/r/.deleted": "", "p/e/runs/r/events.jsonl.lock": ""})
    assert paths(backend.scan_experiments(str(tmp_path))) == [".deleted", "events.jsonl.lock"]


def test_experiment_without_runs_directory_is_skipped_silently(backend, tmp_path):
    (tmp_path / "p/new-experiment").mkdir(parents=True)
    assert backend.scan_experiments(str(tmp_path)) == ScanResult([], [], {}, None)


def test_empty_run_directory_is_a_run_without_files(backend, tmp_path):
    (tmp_path / "p/e/runs/r").mkdir(parents=True)
    assert backend.scan_experiments(str(tmp_path)).runs == [("p", "e", "r", [])]


def test_regular_files_at_the_root_project_and_experiment_levels_are_ignored(backend, tmp_path):
    make(tmp_path, {"runicorn.db": "", "p/notes.txt": "", "p/e/README": "", "p/e/runs/r/f": ""})
    result = backend.scan_experiments(str(tmp_path))
    assert (run_keys(result), result.problems) == ([("p", "e", "r")], [])


def test_file_where_runs_directory_should_be_is_reported(backend, tmp_path):
    make(tmp_path, {"p/e/runs": ""})
    assert backend.scan_experiments(str(tmp_path)).problems == [
        ("p/e/runs", REASON_NOT_A_DIRECTORY)
    ]


def test_file_where_run_directory_should_be_is_reported(backend, tmp_path):
    make(tmp_path, {"p/e/runs/stray.txt": ""})
    assert backend.scan_experiments(str(tmp_path)).problems == [
        ("p/e/runs/stray.txt", REASON_NOT_A_DIRECTORY)
    ]


@pytest.mark.parametrize(
    "link", ["project", "p/experiment", "p/e2/runs", "p/e/runs/run", "p/e/runs/r/file"]
)
def test_symbolic_links_are_reported_and_never_followed(backend, tmp_path, link):
    make(tmp_path, {"p/e/runs/r/f": "", "p/e2/notes": "", ".elsewhere/e/runs/r/secret": ""})
    os.symlink(tmp_path / ".elsewhere", tmp_path / link)
    result = backend.scan_experiments(str(tmp_path))
    assert (link, REASON_SYMLINK) in result.problems
    assert all("secret" not in path for run in result.runs for path, *_ in run[3])


def test_special_files_in_a_run_are_reported_as_not_regular(backend, tmp_path):
    make(tmp_path, {"p/e/runs/r/f": ""})
    os.mkfifo(tmp_path / "p/e/runs/r/pipe")
    result = backend.scan_experiments(str(tmp_path))
    assert (paths(result), result.problems) == (["f"], [("p/e/runs/r/pipe", REASON_NOT_REGULAR)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 directories anyway")
def test_unreadable_run_is_listed_empty_and_reported(backend, tmp_path):
    make(tmp_path, {"p/e/runs/r/f": ""})
    (tmp_path / "p/e/runs/r").chmod(0)
    try:
        result = backend.scan_experiments(str(tmp_path))
    finally:
        (tmp_path / "p/e/runs/r").chmod(0o755)
    assert result.runs == [("p", "e", "r", [])]
    assert result.problems == [("p/e/runs/r", f"unreadable: {os.strerror(13)}")]


def test_odd_names_survive_unchanged(backend, tmp_path):
    run = "run with spaces, ✓ and café"
    make(tmp_path, {f"p/e/runs/{run}/日本語 file": ""})
    result = backend.scan_experiments(str(tmp_path))
    assert (run_keys(result), paths(result)) == ([("p", "e", run)], ["日本語 file"])


def test_names_the_rule_refuses_are_reported_and_skipped(backend, tmp_path):
    make(
        tmp_path,
        {
            "p/e/runs/run\nforged/f": "",
            "p/e/runs/r/ok": "",
            "p/e/runs/r/esc\x1b[2J": "",
            "p/e/runs/r/back\\slash": "",
            "p/e/runs/r/.runicorn-tmp-x": "",
        },
    )
    result = backend.scan_experiments(str(tmp_path))
    assert (run_keys(result), paths(result)) == ([("p", "e", "r")], ["ok"])
    assert result.problems == [
        ("p/e/runs/r/.runicorn-tmp-x", names.REASON_RESERVED),
        ("p/e/runs/r/back\\slash", names.REASON_BACKSLASH),
        ("p/e/runs/r/esc\x1b[2J", names.REASON_CONTROL),
        ("p/e/runs/run\nforged", names.REASON_CONTROL),
    ]


def test_undecodable_names_are_reported_with_their_surrogate_escaped_path(backend, tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/p/e/runs/r\xff/f\xfe"
    os.makedirs(os.path.dirname(raw))
    open(raw, "wb").close()
    open(os.path.dirname(raw) + b"/ok", "wb").close()
    os.makedirs(os.fsencode(str(tmp_path)) + b"/p/e/runs/r2")
    open(os.fsencode(str(tmp_path)) + b"/p/e/runs/r2/f\xfe", "wb").close()
    result = backend.scan_experiments(str(tmp_path))
    assert (run_keys(result), paths(result)) == ([("p", "e", "r2")], [])
    assert result.problems == [
        ("p/e/runs/r2/f\udcfe", names.REASON_NOT_UTF8),
        ("p/e/runs/r\udcff", names.REASON_NOT_UTF8),
    ]


def test_undecodable_file_names_are_skipped_and_the_rest_keep_str_order(backend, tmp_path):
    """The compiled scan makes a run's records in the order of their names' bytes; the
    undecodable ones (whose surrogates would sort otherwise) are refused by the name rule,
    and the rest come sorted as ``str``. The contents read beside them stay with their own
    names."""
    run = os.fsencode(str(tmp_path)) + b"/p/e/runs/r/"
    os.makedirs(run)
    for name in (b"\xc3x", "é".encode(), b"meta.json", b"\xc3", b"\xff", b"a"):
        with open(run + name, "wb") as handle:
            handle.write(name)
    result = backend.scan_experiments(str(tmp_path), 2, ("meta.json",))
    assert paths(result) == ["a", "meta.json", "é"]
    assert sorted(path for path, _ in result.problems) == sorted(
        "p/e/runs/r/" + os.fsdecode(n) for n in (b"\xc3x", b"\xc3", b"\xff")
    )
    assert result.contents == {"p/e/runs/r/meta.json": b"meta.json"}


def test_paths_too_deep_or_too_long_are_reported_and_not_walked(backend, tmp_path):
    deep = "/".join(["d"] * (names.MAX_DEPTH + 10))
    long_dir = "/".join(["é" * 120] * 5)  # 240 bytes a component: 1,215 bytes in all
    make(
        tmp_path,
        {
            f"p/e/runs/r/{deep}/f": "",
            f"p/e/runs/r/{long_dir}/f": "",
            f"p/e/runs/r/{'n' * names.MAX_NAME_BYTES}": "",
        },
    )
    result = backend.scan_experiments(str(tmp_path))
    assert paths(result) == ["n" * names.MAX_NAME_BYTES]  # and no file of the long one
    too_deep = "p/e/runs/r/" + "/".join(["d"] * (names.MAX_DEPTH - 3))
    assert result.problems == [
        (too_deep, names.REASON_TOO_DEEP),
        ("p/e/runs/r/" + long_dir, names.REASON_PATH_TOO_LONG),
    ]


def test_case_and_normalisation_twins_keep_the_first_and_report_the_later(backend, tmp_path):
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    make(
        tmp_path,
        {
            "Vision/e/runs/r/f": "",
            "vision/e/runs/r/f": "",
            "vision/e/runs/r2/f": "",
            f"p/e/runs/r/{nfc}": "",
            f"p/e/runs/r/{nfd}": "",
            "p/e/runs/r/Log.txt": "",
            "p/e/runs/r/log.txt": "",
        },
    )
    result = backend.scan_experiments(str(tmp_path))
    assert run_keys(result) == [("Vision", "e", "r"), ("p", "e", "r"), ("vision", "e", "r2")]
    assert [paths(result, index) for index in range(3)] == [["f"], ["Log.txt", nfd], ["f"]]
    assert result.problems == [
        (f"p/e/runs/r/{nfc}", names.REASON_COLLISION.format(other=f"p/e/runs/r/{nfd}")),
        ("p/e/runs/r/log.txt", names.REASON_COLLISION.format(other="p/e/runs/r/Log.txt")),
        ("vision/e/runs/r", names.REASON_COLLISION.format(other="Vision/e/runs/r")),
    ]


def test_problems_are_sorted_by_path(backend, tmp_path):
    make(tmp_path, {"p/e/runs/z": "", "p/e/runs/a": "", "b/e/runs": ""})
    assert backend.scan_experiments(str(tmp_path)).problems == [
        ("b/e/runs", REASON_NOT_A_DIRECTORY),
        ("p/e/runs/a", REASON_NOT_A_DIRECTORY),
        ("p/e/runs/z", REASON_NOT_A_DIRECTORY),
    ]


def test_scanning_on_several_threads_gives_the_same_result(backend, lab):
    assert backend.scan_experiments(str(lab), threads=4) == backend.scan_experiments(str(lab))


def test_fewer_than_one_thread_is_rejected(backend, lab):
    with pytest.raises(ValueError, match="threads must be at least 1"):
        backend.scan_experiments(str(lab), threads=0)


def test_missing_root_raises_instead_of_returning_an_empty_lab(backend, tmp_path):
    with pytest.raises(FileNotFoundError):
        backend.scan_experiments(str(tmp_path / "missing"))


def test_root_that_is_a_file_raises_not_a_directory(backend, tmp_path):
    make(tmp_path, {"file": ""})
    with pytest.raises(NotADirectoryError):
        backend.scan_experiments(str(tmp_path / "file"))


def test_root_may_be_a_path_object(backend, lab):
    assert backend.scan_experiments(lab) == backend.scan_experiments(str(lab))


# --- reading small run-level files during the scan --------------------------------------


def test_read_returns_the_named_run_level_files_by_root_relative_path(backend, lab):
    result = backend.scan_experiments(str(lab), 1, ("meta.json", "status.json"))
    assert result.contents == {
        "vision/resnet/runs/20250101_000000_aaaaaa/meta.json": b"{}",
        "vision/resnet/runs/20250102_000000_bbbbbb/meta.json": b"{}",
        "nlp/bert/runs/20250103_000000_cccccc/status.json": b'{"status": "running"}',
    }
    assert result.runs == backend.scan_experiments(str(lab)).runs
    assert backend.scan_experiments(str(lab)).contents == {}


def test_read_skips_subdirectories_large_files_and_links(backend, tmp_path):
    limit = MAX_READ_BYTES
    make(
        tmp_path,
        {
            "p/e/runs/r/media/meta.json": "nested",
            "p/e/runs/r/meta.json": b"x" * limit,
            "p/e/runs/r/status.json": b"y" * (limit + 1),
            "p/e/runs/r/summary.json": "",
        },
    )
    os.symlink("meta.json", tmp_path / "p/e/runs/r/logs.txt")
    result = backend.scan_experiments(
        str(tmp_path), 2, ["meta.json", "status.json", "summary.json", "logs.txt"]
    )
    assert result.contents == {
        "p/e/runs/r/meta.json": b"x" * limit,
        "p/e/runs/r/summary.json": b"",
    }


def test_read_with_threads_gives_the_same_contents(backend, lab):
    names = {"meta.json", "status.json"}
    assert backend.scan_experiments(str(lab), 4, names) == backend.scan_experiments(
        str(lab), 1, names
    )


def test_read_names_that_cannot_name_a_file_match_nothing(backend, lab):
    odd = ["resnet/meta.json", "meta.json\0", "", "\udcff", "\ud800"]
    assert backend.scan_experiments(str(lab), 1, odd).contents == {}


@pytest.mark.parametrize("odd", ["", "\udcff", "a/b"], ids=repr)
def test_a_name_that_matches_nothing_does_not_hide_the_names_beside_it(backend, lab, odd):
    """Found by the parity test: the compiled scan stopped at an empty name in its list."""
    contents = backend.scan_experiments(str(lab), 1, [odd, "meta.json"]).contents
    assert contents == backend.scan_experiments(str(lab), 1, ["meta.json"]).contents != {}


@pytest.mark.parametrize("read", ["meta.json", [b"meta.json"], [None]], ids=repr)
def test_read_must_be_a_collection_of_names(backend, lab, read):
    with pytest.raises(TypeError, match="read must be a collection of file names"):
        backend.scan_experiments(str(lab), 1, read)


# --- the runs-path layout: runs/<path...>/<run_id>/ ----------------------------------------


@pytest.fixture
def runs_path_lab(tmp_path: Path) -> Path:
    """An SDK 0.6+ root: runs at several depths, the empty path, the viewer's recycle bin,
    the root index files, archive blobs, lock files and a run directory still being made."""
    return make(
        tmp_path,
        {
            "runs/cv/yolo/20250101_000000_aaaaaa/meta.json": '{"path": "cv/yolo"}',
            "runs/cv/yolo/20250101_000000_aaaaaa/events.jsonl": '{"step": 1}\n',
            "runs/cv/yolo/20250101_000000_aaaaaa/events.jsonl.lock": "",
            "runs/cv/yolo/20250101_000000_aaaaaa/media/a.png": b"\x89PNG",
            "runs/cv/20250102_000000_bbbbbb/status.json": '{"status": "running"}',
            "runs/20250103_000000_cccccc/meta.json": '{"path": ""}',
            "runs/a/b/c/d/20250104_000000_dddddd/meta.json": "{}",
            "runs/.recycle/20250105_000000_eeeeee/meta.json": "{}",
            "runs/.recycle/20250105_000000_eeeeee/.deleted": "{}",
            "runs/cv/notes.txt": "a file among path components",
            "runs/cv/being_made/media/.keep": "",
            "runicorn.db": b"SQLite format 3\0",
            "runicorn.db-wal": b"",
            "runicorn.db-shm": b"",
            "archive/blobs/ab12": b"blob",
        },
    )


def test_runs_path_runs_are_found_at_any_depth_with_their_path_as_name(backend, runs_path_lab):
    result = backend.scan_experiments(str(runs_path_lab))
    assert run_keys(result) == [
        ("runs", "", "20250103_000000_cccccc"),
        ("runs", "a/b/c/d", "20250104_000000_dddddd"),
        ("runs", "cv", "20250102_000000_bbbbbb"),
        ("runs", "cv/yolo", "20250101_000000_aaaaaa"),
    ]
    assert result.problems == []


def test_a_runs_path_run_holds_every_file_below_it(backend, runs_path_lab):
    result = backend.scan_experiments(str(runs_path_lab))
    assert paths(result, 3) == ["events.jsonl", "events.jsonl.lock", "media/a.png", "meta.json"]


def test_a_directory_without_meta_or_status_is_a_path_component(backend, tmp_path):
    """The upstream viewer's rule: the directory the SDK has made but not yet written
    meta.json into is walked as a path, and its media directory holds no run."""
    make(tmp_path, {"runs/p/20250101_000000_aaaaaa/media/x.png": b"x"})
    assert backend.scan_experiments(str(tmp_path)).runs == []
    make(tmp_path, {"runs/p/20250101_000000_aaaaaa/status.json": "{}"})
    assert run_keys(backend.scan_experiments(str(tmp_path))) == [
        ("runs", "p", "20250101_000000_aaaaaa")
    ]


def test_a_marker_of_any_type_makes_a_run(backend, tmp_path):
    (tmp_path / "runs" / "r1" / "meta.json").mkdir(parents=True)
    result = backend.scan_experiments(str(tmp_path))
    assert run_keys(result) == [("runs", "", "r1")]
    assert result.runs[0][3] == []


def test_runs_below_a_run_are_its_files(backend, tmp_path):
    make(tmp_path, {"runs/r1/meta.json": "{}", "runs/r1/sub/r2/meta.json": "{}"})
    result = backend.scan_experiments(str(tmp_path))
    assert run_keys(result) == [("runs", "", "r1")]
    assert paths(result) == ["meta.json", "sub/r2/meta.json"]


def test_top_level_runs_is_never_a_project(backend, tmp_path):
    """A 0.5 project literally named runs is read as the runs-path layout, as both upstream
    viewers read it: its run is at path <name>/runs."""
    make(tmp_path, {"runs/exp/runs/20250101_000000_aaaaaa/meta.json": "{}"})
    assert run_keys(backend.scan_experiments(str(tmp_path))) == [
        ("runs", "exp/runs", "20250101_000000_aaaaaa")
    ]


def test_both_layouts_on_one_root_sort_by_project_name_run_id(backend, lab, runs_path_lab):
    result = backend.scan_experiments(str(lab))
    projects = [key[0] for key in run_keys(result)]
    assert projects == ["nlp"] + ["runs"] * 4 + ["vision"] * 2


def test_runs_path_recycle_hidden_names_index_and_archive_are_not_runs(backend, tmp_path):
    make(
        tmp_path,
        {
            "runs/.recycle/r1/meta.json": "{}",
            "runs/.hidden/r2/meta.json": "{}",
            "runs/p/.r3/meta.json": "{}",
            "runicorn.db": b"",
            "archive/blobs/ab": b"",
        },
    )
    result = backend.scan_experiments(str(tmp_path))
    assert result.runs == [] and result.problems == []


def test_runs_path_symbolic_links_are_reported_not_followed(backend, tmp_path):
    make(tmp_path, {"elsewhere/r1/meta.json": "{}"})
    (tmp_path / "runs" / "p").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "runs" / "p" / "link")
    os.symlink(tmp_path / "elsewhere" / "r1", tmp_path / "runs" / "r1")
    result = backend.scan_experiments(str(tmp_path))
    assert result.runs == []
    assert result.problems == [
        ("runs/p/link", REASON_SYMLINK),
        ("runs/r1", REASON_SYMLINK),
    ]


def test_runs_as_a_symbolic_link_is_reported(backend, tmp_path):
    make(tmp_path, {"elsewhere/r1/meta.json": "{}"})
    os.symlink(tmp_path / "elsewhere", tmp_path / "runs")
    result = backend.scan_experiments(str(tmp_path))
    assert result.runs == [] and result.problems == [("runs", REASON_SYMLINK)]


def test_runs_path_contents_are_keyed_by_the_path_from_the_root(backend, runs_path_lab):
    result = backend.scan_experiments(str(runs_path_lab), 2, ("meta.json", "status.json"))
    assert result.contents == {
        "runs/20250103_000000_cccccc/meta.json": b'{"path": ""}',
        "runs/a/b/c/d/20250104_000000_dddddd/meta.json": b"{}",
        "runs/cv/20250102_000000_bbbbbb/status.json": b'{"status": "running"}',
        "runs/cv/yolo/20250101_000000_aaaaaa/meta.json": b'{"path": "cv/yolo"}',
    }


def test_runs_path_scan_does_not_depend_on_threads(backend, lab, runs_path_lab):
    assert backend.scan_experiments(str(lab), 3) == backend.scan_experiments(str(lab), 1)

"""The run layout rules: what a run's files mean and what a run says about itself."""

from __future__ import annotations

import pytest

from runicorn.format import layout


@pytest.mark.parametrize(
    ("path_in_run", "priority"),
    [
        ("meta.json", 1),
        ("status.json", 1),
        ("summary.json", 2),
        ("environment.json", 2),
        ("artifacts_created.json", 2),
        ("artifacts_used.json", 2),
        ("events.jsonl", 3),
        ("logs.txt", 3),
        ("media/step_1.png", 4),
        ("media/meta.json", 4),
        ("media/events.jsonl", 4),
        ("checkpoint.pt", 4),
        ("notes.txt", 4),
    ],
)
def test_priority_follows_the_spec(path_in_run, priority):
    assert layout.priority_for(path_in_run) == priority


@pytest.mark.parametrize("path_in_run", ["events.jsonl", "logs.txt"])
def test_top_level_logs_are_append_only(path_in_run):
    assert layout.is_append_only(path_in_run)


@pytest.mark.parametrize(
    "path_in_run", ["summary.json", "status.json", "media/events.jsonl", "media/logs.txt", "x.txt"]
)
def test_other_files_are_not_append_only(path_in_run):
    assert not layout.is_append_only(path_in_run)


@pytest.mark.parametrize(
    "path_in_run", ["events.jsonl.lock", "logs.txt.lock", "media/x.png.lock", ".lock", ".deleted"]
)
def test_lock_files_and_the_deleted_marker_are_never_synced(path_in_run):
    assert not layout.is_synced_file(path_in_run)


@pytest.mark.parametrize(
    "path_in_run", ["meta.json", "media/.deleted", "media/step.png", "lock", "locks/a.png", ".env"]
)
def test_other_files_are_synced(path_in_run):
    assert layout.is_synced_file(path_in_run)


def test_hidden_names_start_with_a_dot():
    assert layout.is_hidden(".runicorn")
    assert not layout.is_hidden("runs")


def test_run_prefix_is_the_directory_path_with_a_trailing_slash():
    assert (
        layout.run_prefix("p", "n", "20240101_000000_abcdef") == "p/n/runs/20240101_000000_abcdef/"
    )


# --- parsing metadata written in place ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [None, b"", b'{"status": "runn', b"[1, 2]", b'"finished"', b"\xff\xfe", b"null"],
)
def test_missing_truncated_or_non_object_json_parses_to_none(data):
    assert layout.parse_json_object(data) is None


def test_json_object_parses():
    assert layout.parse_json_object(b'{"status": "failed"}') == {"status": "failed"}


@pytest.mark.parametrize("status", ["running", "finished", "failed", "interrupted", "custom"])
def test_status_comes_from_status_json(status):
    assert layout.derive_status({"status": status}) == status


@pytest.mark.parametrize("doc", [None, {}, {"status": ""}, {"status": 3}, {"status": None}])
def test_unreadable_or_missing_status_is_unknown(doc):
    assert layout.derive_status(doc) == "unknown"


def test_created_at_prefers_meta_json():
    meta, status = {"created_at": 100.5}, {"started_at": 200}
    assert layout.derive_created_at(meta, status, fallback=0.0) == 100.5


def test_created_at_falls_back_to_status_started_at():
    assert layout.derive_created_at({}, {"started_at": 200}, fallback=0.0) == 200.0


@pytest.mark.parametrize("value", ["2024-01-01", None, True, float("nan"), float("inf"), [1]])
def test_created_at_ignores_values_that_are_not_finite_numbers(value):
    assert layout.derive_created_at({"created_at": value}, None, fallback=7.0) == 7.0


def test_created_at_uses_the_fallback_when_nothing_is_readable():
    assert layout.derive_created_at(None, None, fallback=42.0) == 42.0


# --- tags ------------------------------------------------------------------------------------


def test_tags_are_read_from_objects_with_a_tags_list():
    assert layout.tags_by_run({"r1": {"tags": ["b", "a"], "note": "x"}}) == {"r1": ["a", "b"]}


def test_tags_are_read_from_bare_lists():
    assert layout.tags_by_run({"r1": ["x"]}) == {"r1": ["x"]}


def test_tags_are_sorted_and_deduplicated():
    assert layout.tags_by_run({"r1": ["b", "a", "b"]}) == {"r1": ["a", "b"]}


def test_non_string_tags_are_dropped():
    assert layout.tags_by_run({"r1": ["a", 1, None, ["b"]]}) == {"r1": ["a"]}


@pytest.mark.parametrize(
    "value", ["tag", 3, None, {"tags": "a"}, {"labels": ["a"]}, [], {"tags": [1]}]
)
def test_runs_without_usable_tags_are_left_out(value):
    assert layout.tags_by_run({"r1": value}) == {}


@pytest.mark.parametrize("doc", [None, {}])
def test_no_metadata_gives_no_tags(doc):
    assert layout.tags_by_run(doc) == {}


def test_tags_from_truncated_metadata_file_are_empty():
    assert layout.tags_by_run(layout.parse_json_object(b'{"r1": {"tags": ["a"')) == {}


# --- the runs-path layout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("", "runs/20240101_000000_abcdef/"),
        ("cv", "runs/cv/20240101_000000_abcdef/"),
        ("cv/yolo/ablation", "runs/cv/yolo/ablation/20240101_000000_abcdef/"),
    ],
)
def test_project_runs_is_the_runs_path_layout_with_the_path_as_name(name, prefix):
    assert layout.run_prefix("runs", name, "20240101_000000_abcdef") == prefix
    assert layout.run_path_of("runs", name) == name


def test_other_projects_have_no_runs_path():
    assert layout.run_path_of("vision", "resnet") is None


@pytest.mark.parametrize(
    ("names", "is_run"),
    [
        ({"meta.json"}, True),
        ({"status.json", "media"}, True),
        ({"events.jsonl", "media", "logs.txt"}, False),
        (set(), False),
    ],
)
def test_a_directory_below_runs_is_a_run_when_it_holds_meta_or_status(names, is_run):
    assert layout.is_run_dir_listing(names) is is_run


@pytest.mark.parametrize(
    ("counts", "name"),
    [((0, 0), "none"), ((3, 0), "project-name"), ((0, 2), "runs-path"), ((1, 1), "mixed")],
)
def test_layout_names(counts, name):
    assert layout.layout_name(*counts) == name

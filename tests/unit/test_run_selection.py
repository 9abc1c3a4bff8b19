"""RunSelection: the rules (durations, globs, keys, both layouts) and, with hypothesis, that a
selected sync's cache is the full sync's cache restricted to the selection (local remote;
tests/sshd/test_partial_sync.py checks the same over a real sshd)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.lab import cache_files
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.format import layout
from runicorn.format.models import ExperimentEntry
from runicorn.manifest import ManifestGenerator
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.selection import RunSelection, parse_duration, run_key
from runicorn.transport.local_remote import LocalRemote

NOW = 1_700_000_000.0


def _exp(project: str, name: str, run_id: str, created: float = 0.0, updated: float = 0.0):
    return ExperimentEntry(
        run_id=run_id,
        project=project,
        name=name,
        status="finished",
        created_at=created,
        updated_at=updated,
        files=[],
        path=layout.run_path_of(project, name),
    )


# ------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("90", 90.0),
        ("2.5", 2.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("1h30m", 5400.0),
        ("1H 30M", 5400.0),
    ],
)
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-5", "3x", "1h-2m", "nan", "inf", "m30", "1hh"])
def test_bad_durations_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="90s, 30m, 12h, 7d"):
        parse_duration(text)


# ----------------------------------------------------------------------------- keys and globs


def test_keys_are_the_run_directory_less_the_runs_level() -> None:
    assert run_key("vision", "resnet", "r1") == "vision/resnet/r1"
    assert run_key("runs", "vision/resnet", "r1") == "runs/vision/resnet/r1"
    assert run_key("runs", "", "r1") == "runs/r1"


@pytest.mark.parametrize(
    ("glob", "project", "name", "run_id", "expected"),
    [
        ("vision", "vision", "resnet", "r1", True),
        ("vision/*", "vision", "resnet", "r1", True),
        ("vision/*/r1", "vision", "resnet", "r1", True),
        ("vision/*/r2", "vision", "resnet", "r1", False),
        ("vis*", "vision", "resnet", "r1", True),
        ("*/resnet", "vision", "resnet", "r1", True),
        ("*/r1", "vision", "resnet", "r1", False),
        ("**/r1", "vision", "resnet", "r1", True),
        ("vision/res?et/r[12]", "vision", "resnet", "r1", True),
        ("vision/resnet/r[!1]", "vision", "resnet", "r1", False),
        ("nlp", "vision", "resnet", "r1", False),
        ("vision/resnet/r", "vision", "resnet", "r1", False),
        ("runs/vision", "runs", "vision/resnet", "r1", True),
        ("runs/*/resnet", "runs", "vision/resnet", "r1", True),
        ("runs/**/r1", "runs", "vision/resnet", "r1", True),
        ("runs/*/r1", "runs", "vision/resnet", "r1", False),
        ("runs/r1", "runs", "", "r1", True),
    ],
)
def test_include_globs(glob: str, project: str, name: str, run_id: str, expected: bool) -> None:
    assert RunSelection(include=(glob,)).selects_key(project, name, run_id) is expected
    assert RunSelection(exclude=(glob,)).selects_key(project, name, run_id) is not expected


@pytest.mark.parametrize("glob", ["", "/vision", "vision/[ab"])
def test_bad_globs_are_refused(glob: str) -> None:
    with pytest.raises(ValueError, match="glob"):
        RunSelection(include=(glob,))


def test_projects_match_project_name_runs_and_the_first_path_component() -> None:
    selection = RunSelection(projects=("vision",))
    assert selection.selects_key("vision", "resnet", "r1")
    assert not selection.selects_key("nlp", "bert", "r1")
    assert selection.selects_key("runs", "vision/resnet", "r1")
    assert selection.selects_key("runs", "vision", "r1")
    assert not selection.selects_key("runs", "visionary/x", "r1")
    assert not selection.selects_key("runs", "", "r1")
    assert RunSelection(projects=("runs",)).selects_key("runs", "", "r1")
    with pytest.raises(ValueError, match="one visible name"):
        RunSelection(projects=("a/b",))


def test_exclude_wins_over_include_and_projects() -> None:
    selection = RunSelection(projects=("vision",), include=("vision",), exclude=("*/gan",))
    assert selection.selects_key("vision", "resnet", "r1")
    assert not selection.selects_key("vision", "gan", "r1")


def test_since_keeps_runs_created_or_updated_within_the_window() -> None:
    selection = RunSelection(since=3600.0)
    assert selection.selects("p", "n", "a", NOW - 7200, NOW - 60, NOW)  # active lately
    assert selection.selects("p", "n", "b", NOW - 60, NOW - 60, NOW)  # created lately
    assert not selection.selects("p", "n", "c", NOW - 9000, NOW - 7200, NOW)


def test_max_runs_keeps_the_most_recently_updated() -> None:
    runs = [_exp("p", "n", f"r{i}", updated=NOW - i) for i in range(5)]
    kept = RunSelection(max_runs=2).select_runs(runs, NOW)
    assert [exp.run_id for exp in kept] == ["r0", "r1"]


def test_the_fingerprint_ignores_order_and_is_empty_for_everything() -> None:
    assert RunSelection().fingerprint == ""
    assert RunSelection().is_everything
    one = RunSelection(projects=("a", "b"), include=("x",))
    two = RunSelection(projects=("b", "a"), include=("x",))
    assert one.fingerprint == two.fingerprint != ""
    assert RunSelection(since=60).fingerprint != RunSelection(since=61).fingerprint


def test_of_takes_strings_or_lists_and_a_duration() -> None:
    selection = RunSelection.of("vision", ["vision/*"], None, "2h")
    assert selection.projects == ("vision",)
    assert selection.include == ("vision/*",)
    assert selection.since == 7200.0


# ---------------------------------------------------------------- a selected sync, end to end


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, LabInfo]]:
    """Two labs (one per layout), built once for the module; manifests are made per test."""
    top = Path(tempfile.mkdtemp(prefix="runicorn-selection-"))
    labs = {
        run_layout: build_sample_lab(
            top / run_layout, runs=12, seed=5, scale=0.03, projects=4, now=NOW, layout=run_layout
        )
        for run_layout in (layout.LAYOUT_PROJECT_NAME, layout.LAYOUT_RUNS_PATH)
    }
    for info in labs.values():
        ManifestGenerator(info.root, clock=lambda: NOW).generate()
    yield labs
    shutil.rmtree(top, ignore_errors=True)


def _sync(root: Path, cache: Path, backend: Backend, **options: object) -> dict:
    client = ManifestSyncClient(
        None, str(root), cache, 0.0, remote=LocalRemote(str(root)), backend=backend, **options
    )
    try:
        return dict(client.sync())
    finally:
        client.close()


def _restricted(
    files: dict[str, bytes], info: LabInfo, selection: RunSelection, now: float
) -> dict:
    """The full cache's files of the runs the selection keeps (judged on the lab's own
    record of each run, not on the manifest)."""
    kept = [
        run.rel + "/"
        for run in info.listed_runs
        if selection.selects(run.project, run.name, run.run_id, run.created_at, run.updated_at, now)
    ]
    return {path: data for path, data in files.items() if any(path.startswith(k) for k in kept)}


def _since(info: LabInfo, window: float | None, now: float) -> float | None:
    """A ``since`` whose cut falls halfway between two runs' newest times (the fraction
    ``window`` picks which two), so a second's drift between here and the sync never moves a
    run across it; ``None``: no window."""
    if window is None:
        return None
    times = sorted({max(run.created_at, run.updated_at) for run in info.listed_runs})
    gaps = [(a + b) / 2 for a, b in itertools.pairwise(times) if b - a > 2]
    if not gaps:
        return None
    cut = gaps[min(int(window * len(gaps)), len(gaps) - 1)]
    return now - cut


_GLOB_PARTS = st.sampled_from(["*", "**", "vision", "nlp", "rl", "runs", "r*", "*n*", "?*"])


@given(
    run_layout=st.sampled_from([layout.LAYOUT_PROJECT_NAME, layout.LAYOUT_RUNS_PATH]),
    projects=st.lists(st.sampled_from(["vision", "nlp", "rl", "audio", "runs"]), max_size=2),
    include=st.lists(st.lists(_GLOB_PARTS, min_size=1, max_size=3).map("/".join), max_size=2),
    exclude=st.lists(st.lists(_GLOB_PARTS, min_size=1, max_size=3).map("/".join), max_size=1),
    window=st.none() | st.floats(min_value=0.0, max_value=1.0),
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_a_selected_sync_is_the_full_sync_restricted_to_the_selection(
    served: dict[str, LabInfo],
    backend: Backend,
    run_layout: str,
    projects: list[str],
    include: list[str],
    exclude: list[str],
    window: float | None,
) -> None:
    info = served[run_layout]
    now = time.time()
    selection = RunSelection(
        tuple(projects), tuple(include), tuple(exclude), _since(info, window, now)
    )
    with tempfile.TemporaryDirectory() as work:
        full_cache, part_cache = Path(work) / "full", Path(work) / "part"
        _sync(info.root, full_cache, backend)
        stats = _sync(info.root, part_cache, backend, selection=selection)
        expected = _restricted(cache_files(full_cache), info, selection, now)
        assert cache_files(part_cache) == expected
        runs = [
            _exp(r.project, r.name, r.run_id, r.created_at, r.updated_at) for r in info.listed_runs
        ]
        kept = len(selection.select_runs(runs, now))
        if not selection.is_everything:
            assert stats["runs_filtered_out"] == len(info.listed_runs) - kept
        assert stats["files_synced"] == len(expected)

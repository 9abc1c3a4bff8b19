"""A sync with nothing cached plans every file without a diff: the same transfers, in the
same order, as the diff against an empty cache gives, and the same refusal of a manifest
whose paths are not strictly ascending (runs on both backends)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence

import pytest

from runicorn.manifest import FileEntry
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import _check_order
from runicorn.sync.transfer import Transfer, WholeFiles, plan


def _entries(count: int) -> list[FileEntry]:
    return [
        FileEntry(
            f"p/e/r{index // 7}/f{index % 7}.txt", index, 1.5, 1 + index % 4, index % 2 == 0
        )
        for index in range(count)
    ]


def _shape(transfers: Sequence[Transfer]) -> list[tuple]:
    return [(t.entry, t.append, t.local_size, t.overlap, t.offset, t.length) for t in transfers]


def test_a_cold_plan_is_the_plan_of_a_diff_against_nothing(backend, tmp_path) -> None:
    entries = sorted(_entries(50), key=lambda entry: entry.path)
    cache = LocalCacheManager(tmp_path / "cache")
    diff = backend.diff_entries(
        [(e.path, e.size, e.mtime, e.is_append_only, e.tail_hash) for e in entries], []
    )
    cold = plan(entries, None, {}, cache)
    assert isinstance(cold, WholeFiles)
    assert _shape(cold) == _shape(plan(entries, diff, {}, cache))
    order = [(t.entry.priority, t.entry.path) for t in cold]
    assert order == sorted(order)
    assert cold.total_bytes == sum(t.length for t in cold) == sum(range(50))
    assert _shape(cold[3:9]) == _shape(cold)[3:9]
    assert _shape([cold[-1]]) == _shape(cold)[-1:]


def test_a_planned_transfer_is_idle_until_its_first_byte(tmp_path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    first, second = plan(_entries(2), None, {}, cache)
    assert (first.fd, first.temp_name, first.error, first.received, first.whole) == (
        -1,
        None,
        None,
        0,
        None,
    )
    first.received = 5  # one transfer's state is its own, never shared
    assert (first.received, second.received) == (5, 0)
    second.discard()  # nothing created, nothing to remove
    assert second.fd == -1


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["a", "b", "b"], "entry 2 'b' follows 'b'"),
        (["b", "a"], "entry 1 'a' follows 'b'"),
    ],
)
def test_a_cold_sync_refuses_paths_out_of_order_as_the_diff_does(
    backend, paths: list[str], message: str
) -> None:
    entries = [FileEntry(path, 1, 1.0) for path in paths]
    with pytest.raises(ValueError, match=message) as ours:
        _check_order(entries)
    with pytest.raises(ValueError) as diffs:
        backend.diff_entries([(e.path, 1, 1.0, False, None) for e in entries], [])
    assert str(ours.value) == str(diffs.value)


def test_ascending_paths_pass_the_order_check() -> None:
    _check_order(_entries(30))
    _check_order([])


def test_a_cold_plan_holds_no_object_per_file(tmp_path) -> None:
    """The plan of 20,000 new files is their entries in order, not 20,000 transfers: what
    it allocates is a list of references (a ``Transfer`` each would be some 1.6 MB)."""
    entries = sorted(_entries(20_000), key=lambda entry: entry.path)
    cache = LocalCacheManager(tmp_path / "cache")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        planned = plan(entries, None, {}, cache)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(planned) == 20_000
    assert held < 20_000 * 8 + 64 * 1024


def _reference_tally(
    experiments: list, planned: list[tuple[str, int]], failed: dict[str, str]
) -> dict[str, tuple[int, int, int, bool]]:
    """What each run got, file by file: the nearest enclosing listed run directory."""
    listed = {exp.prefix for exp in experiments}
    moved: dict[str, list] = {}
    for path, length in planned:
        cuts = [i for i, c in enumerate(path) if c == "/"]
        prefix = next((path[: i + 1] for i in reversed(cuts) if path[: i + 1] in listed), None)
        if prefix is None:
            continue
        tally = moved.setdefault(prefix, [0, 0, 0, False])
        if path in failed:
            tally[2] += 1
            continue
        tally[0] += 1
        tally[1] += length
        tally[3] = tally[3] or path == prefix + "events.jsonl"
    return {prefix: tuple(tally) for prefix, tally in moved.items()}


def test_what_lands_in_each_run_is_tallied_by_the_nearest_enclosing_run(tmp_path) -> None:
    """Runs nested in runs (the runs-path layout allows it), files outside every run, and
    failed files: the compact tally of a cold plan and of a plan of transfers agree with a
    file-by-file count."""
    from runicorn.manifest import ExperimentEntry
    from runicorn.sync.client import _Landed

    def run(project: str, name: str, run_id: str, names: list[str]) -> ExperimentEntry:
        exp = ExperimentEntry(run_id, project, name, "finished", 1.0, 2.0)
        exp.files = [FileEntry(exp.prefix + name, 10 + len(name), 1.5) for name in names]
        return exp

    experiments = [
        run("p", "e", "r1", ["events.jsonl", "logs.txt", "media/a.png"]),
        run("p", "e", "r2", ["status.json"]),
        run("runs", "a", "outer", ["events.jsonl", "inner/x.txt"]),
        run("runs", "a/outer", "inner", ["events.jsonl", "y.txt"]),
        run("p", "e", "r3", []),
    ]
    entries = sorted(
        (entry for exp in experiments for entry in exp.files), key=lambda entry: entry.path
    )
    failed = {
        "p/e/runs/r1/events.jsonl": "gone",
        "runs/a/outer/inner/y.txt": "gone",
        "p/e/runs/r2/status.json": "gone",
    }
    cache = LocalCacheManager(tmp_path / "cache")
    for transfers in (plan(entries, None, {}, cache), list(plan(entries, None, {}, cache))):
        landed = _Landed(experiments, transfers)
        landed.settle(failed, transfers)
        planned = [(t.entry.path, t.length) for t in transfers]
        expected = _reference_tally(experiments, planned, failed)
        got = {
            exp.prefix: (
                landed.files[i],
                landed.bytes[i],
                landed.failed[i],
                bool(landed.events[i]),
            )
            for i, exp in enumerate(experiments)
            if landed.files[i] or landed.failed[i]
        }
        assert got == expected
        # the outer run's file inside the inner run's directory counts toward the inner run
        assert expected["runs/a/outer/"][0] == 1
        assert expected["runs/a/outer/inner/"][0::2] == (2, 1)
        assert expected["p/e/runs/r2/"] == (0, 0, 1, False)

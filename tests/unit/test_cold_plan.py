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

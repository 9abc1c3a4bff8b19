"""Behaviour of ``diff_entries`` (runs on both backends through the ``backend`` fixture).

Remote entries are ``(path, size, mtime, is_append_only, tail_hash)``, local entries
``(path, size, mtime, tail_hash)``; both sides sorted by path."""

from __future__ import annotations

import pytest

from runicorn.core.diff import DiffResult


def remote(path="f", size=10, mtime=1.0, append_only=False, tail_hash=None):
    return (path, size, mtime, append_only, tail_hash)


def local(path="f", size=10, mtime=1.0, tail_hash=None):
    return (path, size, mtime, tail_hash)


def test_nothing_against_nothing_is_an_empty_diff(backend):
    assert backend.diff_entries([], []) == DiffResult([], [], [], 0, [])


def test_remote_entry_without_local_copy_is_new(backend):
    assert backend.diff_entries([remote("a"), remote("b")], [local("b")]).new == [0]


def test_local_entry_missing_from_the_manifest_has_vanished(backend):
    assert backend.diff_entries([remote("b")], [local("a"), local("b"), local("c")]).vanished == [
        0,
        2,
    ]


def test_same_size_and_mtime_is_unchanged(backend):
    assert backend.diff_entries([remote()], [local()]) == DiffResult([], [], [], 1, [])


def test_changed_mtime_with_same_size_is_replaced(backend):
    assert backend.diff_entries([remote(mtime=2.0)], [local(mtime=1.0)]).replaced == [0]


def test_changed_size_of_an_ordinary_file_is_replaced(backend):
    assert backend.diff_entries([remote(size=20)], [local(size=10)]).replaced == [0]


def test_append_only_file_that_grew_is_extended(backend):
    assert backend.diff_entries([remote(size=20, append_only=True)], [local(size=10)]).grown == [0]


def test_append_only_file_that_shrank_is_replaced(backend):
    result = backend.diff_entries([remote(size=5, append_only=True)], [local(size=10)])
    assert result.replaced == [0]


def test_append_only_file_with_moved_mtime_and_matching_tail_hash_is_unchanged(backend):
    result = backend.diff_entries(
        [remote(mtime=2.0, append_only=True, tail_hash="h")], [local(mtime=1.0, tail_hash="h")]
    )
    assert result.unchanged == 1


def test_append_only_file_with_moved_mtime_and_other_tail_hash_is_replaced(backend):
    result = backend.diff_entries(
        [remote(mtime=2.0, append_only=True, tail_hash="h")], [local(mtime=1.0, tail_hash="x")]
    )
    assert result.replaced == [0]


def test_missing_remote_tail_hash_never_vouches_for_a_file(backend):
    result = backend.diff_entries([remote(mtime=2.0, append_only=True)], [local(mtime=1.0)])
    assert result.replaced == [0]


def test_indices_point_into_each_side(backend):
    result = backend.diff_entries(
        [remote("a"), remote("c", size=11), remote("d", size=20, append_only=True)],
        [local("b"), local("c"), local("d")],
    )
    assert result == DiffResult(new=[0], grown=[2], replaced=[1], unchanged=0, vanished=[0])


def test_tuples_are_accepted_as_well_as_lists(backend):
    assert backend.diff_entries((remote(),), (local(),)).unchanged == 1


def test_unsorted_remote_side_is_rejected_with_the_offending_entry(backend):
    with pytest.raises(ValueError, match=r"remote entries must be sorted.*entry 1 'a' follows 'b'"):
        backend.diff_entries([remote("b"), remote("a")], [])


def test_duplicate_local_path_is_rejected(backend):
    with pytest.raises(ValueError, match=r"local entries .* without duplicates: entry 1 'a'"):
        backend.diff_entries([], [local("a"), local("a")])


def test_paths_compare_by_code_point(backend):
    result = backend.diff_entries([remote("Z"), remote("a"), remote("é")], [local("a")])
    assert (result.new, result.unchanged) == ([0, 2], 1)


def test_a_large_identical_manifest_is_all_unchanged(backend):
    paths = sorted(f"p/e/runs/r{i:05d}/meta.json" for i in range(20_000))
    result = backend.diff_entries([remote(p) for p in paths], [local(p) for p in paths])
    assert result == DiffResult([], [], [], 20_000, [])

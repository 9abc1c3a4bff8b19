"""Diff a manifest's file entries against the local cache state, by a sorted merge.

This pure-Python module is the specification of the diff; ``csrc/_native_diff.pyx`` is its
compiled twin. Both sides must be sorted by path, strictly (no duplicates): the merge is
then a single linear pass, which is what makes a million-entry manifest cheap to compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

RemoteEntry = tuple[str, int, float, bool, "str | None"]
"""``(path, size, mtime, is_append_only, tail_hash)`` as listed in the manifest."""

LocalEntry = tuple[str, int, float, "str | None"]
"""``(path, size, mtime, tail_hash)`` of the copy in the cache, as last synced."""


class DiffResult(NamedTuple):
    new: list[int]
    """Indices of remote entries with no local copy."""
    grown: list[int]
    """Indices of append-only remote entries longer than their local copy: fetch the tail."""
    replaced: list[int]
    """Indices of remote entries whose local copy is stale: fetch the whole file."""
    unchanged: int
    """How many entries need nothing."""
    vanished: list[int]
    """Indices of local entries that the manifest no longer lists."""


def _check_sorted(previous: str | None, path: str, side: str, index: int) -> None:
    if previous is not None and not previous < path:
        raise ValueError(
            f"{side} entries must be sorted by path without duplicates: "
            f"entry {index} {path!r} follows {previous!r}"
        )


def classify(remote: RemoteEntry, local: LocalEntry) -> int:
    """0 unchanged, 1 grown, 2 replaced: the rule for one path present on both sides.

    Same size and mtime is unchanged (rsync's quick check). An append-only file whose size
    did not move and whose tail hash still matches is unchanged too: its mtime moved because
    a partial line was appended, which the manifest does not carry yet. An append-only file
    that grew is extended; anything else is fetched again.
    """
    _, r_size, r_mtime, r_append_only, r_hash = remote
    _, l_size, l_mtime, l_hash = local
    if r_size == l_size:
        if r_mtime == l_mtime:
            return 0
        if r_append_only and r_hash is not None and r_hash == l_hash:
            return 0
        return 2
    if r_append_only and r_size > l_size:
        return 1
    return 2


def diff_entries(remote: Sequence[RemoteEntry], local: Sequence[LocalEntry]) -> DiffResult:
    """Merge two path-sorted entry lists into what to fetch, extend and forget.

    Raises ``ValueError`` when either side is not strictly sorted by path.
    """
    new: list[int] = []
    grown: list[int] = []
    replaced: list[int] = []
    vanished: list[int] = []
    unchanged = 0
    n_remote = len(remote)
    n_local = len(local)
    i = j = 0
    last_remote: str | None = None
    last_local: str | None = None
    while i < n_remote or j < n_local:
        if i < n_remote:
            r_path = remote[i][0]
            _check_sorted(last_remote, r_path, "remote", i)
        if j < n_local:
            l_path = local[j][0]
            _check_sorted(last_local, l_path, "local", j)
        if j >= n_local or (i < n_remote and r_path < l_path):
            new.append(i)
            last_remote = r_path
            i += 1
        elif i >= n_remote or l_path < r_path:
            vanished.append(j)
            last_local = l_path
            j += 1
        else:
            kind = classify(remote[i], local[j])
            if kind == 0:
                unchanged += 1
            elif kind == 1:
                grown.append(i)
            else:
                replaced.append(i)
            last_remote = r_path
            last_local = l_path
            i += 1
            j += 1
    return DiffResult(new, grown, replaced, unchanged, vanished)

"""The server and root a cache mirrors: which remote ids are the same server, and a claim
that records the first and refuses another (the sync paths: tests/sshd/test_multi_remote.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runicorn.sync.cache import CacheOwnerError, LocalCacheManager, RunRecord
from runicorn.sync.cache.manager import same_server


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("sftp://alice@10.0.0.5:22/data/exp", "sftp://bob@10.0.0.5:2222/data/exp", True),
        ("sftp://alice@10.0.0.5:22/data/exp", "sftp://alice@10.0.0.5:22/data/exp/", True),
        ("sftp://alice@10.0.0.5:22/data/exp", "sftp://alice@10.0.0.6:22/data/exp", False),
        ("sftp://alice@10.0.0.5:22/data/exp", "sftp://alice@10.0.0.5:22/data/other", False),
        ("sftp://a@[fe80::1]:22/x", "sftp://b@[fe80::1]:23/x", True),
        ("file:///mnt/lab", "file:///mnt/lab", True),
        ("file:///mnt/lab", "sftp://a@h:22/mnt/lab", False),
    ],
)
def test_the_same_server_is_host_and_root(one: str, other: str, same: bool) -> None:
    assert same_server(one, other) is same
    assert same_server(other, one) is same


def test_the_first_claim_is_recorded_and_another_server_refused(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    assert cache.mirrored_remote() is None
    cache.claim("sftp://a@h1:22/data")
    assert cache.mirrored_remote() == "sftp://a@h1:22/data"
    cache.claim("sftp://b@h1:2200/data")  # another account or a tunnel: the same files
    with pytest.raises(CacheOwnerError, match=r"mirrors sftp://a@h1:22/data, not sftp://a@h2"):
        cache.claim("sftp://a@h2:22/data")
    assert cache.mirrored_remote() == "sftp://a@h1:22/data"


def test_an_older_cache_adopts_the_one_remote_it_holds(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    record = RunRecord("p", "n", "r1", "finished", 1.0, 2.0, None, 3.0)
    cache.save_runs("sftp://a@h1:22/data", [record])
    with pytest.raises(CacheOwnerError, match="mirrors sftp://a@h1:22/data"):
        cache.claim("sftp://a@h2:22/data")
    assert cache.mirrored_remote() is None  # nothing recorded by a refusal
    cache.claim("sftp://a@h1:22/data")
    assert cache.mirrored_remote() == "sftp://a@h1:22/data"


def test_an_unreadable_identity_file_says_what_to_do(tmp_path: Path) -> None:
    cache = LocalCacheManager(tmp_path / "cache")
    cache.ensure_state_dir()
    cache.identity_path.write_text("{not json")
    with pytest.raises(CacheOwnerError, match="restore it, or delete it"):
        cache.claim("file:///x")

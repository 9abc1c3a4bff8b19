"""How many files a transfer keeps in flight under the open-file limit."""

from __future__ import annotations

import os
import resource

import pytest

from runicorn._sys import fd_budget


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch):
    """``limit(soft, open_now)`` fakes the soft limit and the descriptors open now."""

    def set_limit(soft: int | None, open_now: int) -> None:
        monkeypatch.setattr(fd_budget, "soft_limit", lambda: soft)
        monkeypatch.setattr(fd_budget, "open_descriptors", lambda: open_now)

    return set_limit


def test_an_unlimited_process_keeps_the_full_depth(limit):
    limit(None, 500)
    assert fd_budget.files_in_flight_per_channel(8, 128) == 128


def test_a_default_limit_shares_what_is_left_between_the_channels(limit):
    limit(1024, 20)
    # 1024 - 20 open - 128 for directory handles - 8 reserved = 868, over 8 channels
    assert fd_budget.files_in_flight_per_channel(8, 128) == 108
    assert fd_budget.files_in_flight_per_channel(3, 128) == 128


def test_a_limit_with_no_room_left_still_moves_one_file_per_channel(limit):
    limit(32, 40)
    assert fd_budget.files_in_flight_per_channel(4, 128) == 1


def test_the_real_limit_and_descriptor_count_are_read():
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fd_budget.soft_limit() == (None if soft == resource.RLIM_INFINITY else soft)
    before = fd_budget.open_descriptors()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert fd_budget.open_descriptors() == before + 1
    finally:
        os.close(fd)

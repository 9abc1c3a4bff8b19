"""The portable cache lock: held by another process, free, never created (probing creates
nothing). Its Windows path (``msvcrt.locking``) runs in tests/unit/test_portable.py, in a
Python without ``fcntl``."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from runicorn._sys import locking
from runicorn._sys.atomic import exclusive_lock


def _hold_and_report(
    lock_path: str,
    held: multiprocessing.synchronize.Event,
    release: multiprocessing.synchronize.Event,
) -> None:
    with exclusive_lock(Path(lock_path)):
        held.set()
        release.wait(60)


def test_a_lock_another_process_holds_is_seen_and_not_taken(tmp_path: Path) -> None:
    lock = tmp_path / "sync.lock"
    assert locking.is_locked(lock) is None and not lock.exists()  # probing creates nothing
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    child = context.Process(target=_hold_and_report, args=(str(lock), held, release))
    child.start()
    try:
        assert held.wait(60)
        assert locking.is_locked(lock) is True
    finally:
        release.set()
        child.join(60)
    assert locking.is_locked(lock) is False
    with exclusive_lock(lock):
        assert locking.is_locked(lock) is True  # a second open file: another holder
    assert locking.is_locked(lock) is False

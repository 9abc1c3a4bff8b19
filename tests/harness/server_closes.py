"""Which SSH channels the server has closed: for tests that order events around a CLOSE."""

from __future__ import annotations

import threading

import paramiko
import pytest


class ServerCloses:
    """Records each channel whose CLOSE from the server paramiko has taken (through its
    private ``Transport._unlink_channel``), so that a test can wait, with no sleep, until
    the server has freed a channel."""

    def __init__(self, transport: paramiko.Transport, monkeypatch: pytest.MonkeyPatch) -> None:
        self._closed: set[int] = set()
        self._changed = threading.Condition()
        original = transport._unlink_channel  # type: ignore[attr-defined]

        def unlink_channel(chanid: int) -> None:
            original(chanid)
            with self._changed:
                self._closed.add(chanid)
                self._changed.notify_all()

        monkeypatch.setattr(transport, "_unlink_channel", unlink_channel)

    def wait(self, channel: paramiko.Channel, timeout: float = 20.0) -> bool:
        """Whether the server closed ``channel`` within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: channel.chanid in self._closed, timeout)

"""Sending on an SSH channel whose every wait is a short poll, for the engines that one
thread drives (the SFTP engine, the file stream).

A stop asked from another thread only marks the engine; the driving thread sees the mark
within :data:`POLL_SECONDS` and closes the channel itself, after its last send. paramiko
checks that a channel is open under its lock and sends after releasing it, so a send racing
a close from elsewhere can reach OpenSSH after our CLOSE, and OpenSSH then drops the whole
connection ("data packet referred to nonexistent channel").
"""

from __future__ import annotations

import time
from collections.abc import Callable

import paramiko

__all__ = ["POLL_SECONDS", "poll_seconds", "send_all"]

POLL_SECONDS = 0.05
"""How long one wait on the channel lasts before the driving thread looks again whether it
was asked to stop: waits for answers and for send window are made of such polls."""


def poll_seconds(timeout: float | None) -> float:
    """The channel timeout to set: one poll, or the whole ``timeout`` when that is shorter."""
    return POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout)


def send_all(
    channel: paramiko.Channel,
    data: bytes,
    *,
    stop_if_asked: Callable[[], None],
    waited: Callable[[float, str], None],
    ended: Callable[[], BaseException],
    explain_closed: bool = False,
) -> None:
    """Send all of ``data`` with ``send`` in a loop (``sendall`` loses its place when a
    timeout interrupts it). ``stop_if_asked`` raises when a stop was asked; ``waited(since,
    what)`` is told of each poll that found no send window, and raises once the engine's
    timeout has passed; ``ended()`` is the error for a channel that took nothing more. With
    ``explain_closed``, a send that fails on a channel the server closed raises ``ended()``
    too, so that the reason the other end gave replaces paramiko's "Socket is closed"."""
    since = time.monotonic()
    while data:
        stop_if_asked()
        try:
            sent = channel.send(data)
        except TimeoutError:  # no send window: the server reads no requests
            waited(since, "took no request")
            continue
        except OSError:
            if explain_closed and channel.closed:
                raise ended() from None
            raise
        if sent == 0:
            raise ended()
        data = data[sent:]
        since = time.monotonic()

"""A push channel: a small command on the server that says when watched files change.

A watching client that only polls pays for freshness in requests: reading a manifest's header
is three SFTP requests, so a budget of two requests a second allows one probe every 1.5 s or
so, and a change waits half of that on average before anyone looks. Instead, the client runs
one command on the server over an exec channel of the connection it already has: a Python
one-liner that stats the watched files every :data:`CHECK_SECONDS` (a few system calls, on
the server's own disk) and writes a line when one of them was replaced or rewritten. The
client's pass then starts one one-way delay after the publication, and an idle watch sends
no SFTP request at all.

The protocol on the channel's stdout is line-based: ``ready`` once the first stat is taken,
then ``changed I`` whenever the I-th path's (inode, mtime, size) differs from the last one
seen. The command ends when its stdin closes (the client closed the channel, or the
connection died and sshd closed the session). It needs ``python3`` on the server's ``PATH``;
without one (exit 127), or where the server refuses exec channels, :meth:`ChangeFeed.start`
still returns and the feed ends at once with the reason, and the caller keeps polling.
"""

from __future__ import annotations

import base64
import logging
import shlex
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko

__all__ = ["CHECK_SECONDS", "PYTHON", "ChangeFeed", "feed_command"]

logger = logging.getLogger(__name__)

PYTHON = "python3"
"""The interpreter the command asks the server's shell for."""
CHECK_SECONDS = 0.05
"""How often the server-side command stats the watched files: a publication is noticed
25 ms later on average, for about 80 ``stat`` calls a second with four paths."""

_SCRIPT = """\
import os, select, sys
paths = sys.argv[1:]
def mark(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)
last = [mark(path) for path in paths]
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    readable = select.select([0], [], [], %(seconds)r)[0]
    if readable and not os.read(0, 4096):
        break
    now = [mark(path) for path in paths]
    if now != last:
        for index in range(len(paths)):
            if now[index] != last[index]:
                sys.stdout.write("changed %%d\\n" %% index)
        sys.stdout.flush()
        last = now
"""


def feed_command(paths: Sequence[str], *, python: str | None = None) -> str:
    """The shell command that watches ``paths`` on the server (see the module).

    The script travels base64-encoded in one shell word, so the user's login shell (sh, bash,
    zsh, tcsh) sees no newline and no quote of it; each path is one quoted word."""
    script = _SCRIPT % {"seconds": CHECK_SECONDS}
    encoded = base64.b64encode(script.encode()).decode("ascii")
    program = f"import base64; exec(base64.b64decode('{encoded}'))"
    words = [python or PYTHON, "-c", program, *paths]
    return " ".join(shlex.quote(word) for word in words)


class ChangeFeed:
    """Runs :func:`feed_command` on an exec channel of ``transport`` and reports its lines.

    ``on_change(index)`` is called for each ``changed`` line (the index into ``paths``),
    ``on_ready()`` once the command has taken its first look, ``on_end(reason)`` once when
    the channel ends for any reason; all on the feed's reader thread. :meth:`close` ends it
    from any thread.
    """

    def __init__(
        self,
        transport: paramiko.Transport,
        paths: Sequence[str],
        *,
        on_change: Callable[[int], None],
        on_ready: Callable[[], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.transport = transport
        self.paths = list(paths)
        self.on_change = on_change
        self.on_ready = on_ready
        self.on_end = on_end
        self.timeout = timeout
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.reason = ""
        self._channel: paramiko.Channel | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        """Open the channel and start the command; a refusal ends the feed, never raises."""
        try:
            channel = self.transport.open_session(timeout=self.timeout)
            channel.exec_command(feed_command(self.paths))
        except Exception as error:
            self._end(f"the server refused the command channel ({error})")
            return
        self._channel = channel
        self._thread = threading.Thread(
            target=self._read, args=(channel,), name="runicorn-change-feed", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Close the channel (the command ends on its closed stdin) and wait for the reader."""
        self._closing = True
        channel = self._channel
        if channel is not None:
            try:
                channel.close()
            except Exception as error:  # a dead transport: nothing left to close
                logger.debug("closing the change feed: %s", error)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout)

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    def _read(self, channel: paramiko.Channel) -> None:
        pending = b""
        reason = "the command ended"
        try:
            while True:
                data = channel.recv(4096)
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line.decode("ascii", "replace").strip())
        except Exception as error:
            reason = f"reading it failed ({error})"
        if not self._closing:
            reason = self._why_ended(channel, reason)
        self._end(reason)

    def _line(self, line: str) -> None:
        if line == "ready":
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()
        elif line.startswith("changed "):
            index = line.split()[1]
            if index.isdigit() and int(index) < len(self.paths):
                self.on_change(int(index))
        elif line:
            logger.debug("change feed: unexpected line %r", line)

    @staticmethod
    def _why_ended(channel: paramiko.Channel, fallback: str) -> str:
        """The command's exit status and the end of its stderr, when it said anything."""
        # The status follows the output's EOF closely; a dead connection never sends it.
        status = channel.exit_status if channel.status_event.wait(2.0) else None
        stderr = b""
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(4096)
        if status == 127:
            return f"{PYTHON} was not found on the server"
        detail = f"exit status {status}" if status is not None else fallback
        text = stderr.decode("utf-8", "replace").strip()
        if text:
            detail += f": {text.splitlines()[-1]}"
        return detail

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.reason = reason if not self._closing else "closed"
        self.ended.set()
        if self.on_end is not None:
            self.on_end(self.reason)

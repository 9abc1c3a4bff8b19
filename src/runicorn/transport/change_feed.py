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
seen. For the paths named *inline* (the active manifest's ``.gz``), the command sends the
new content itself instead, ``data I N`` and N bytes, so the client's pass reads no manifest
over SFTP: on a 50 ms link that is the header probe and the body's reads, four round trips
or more, saved on every publication. Content is sent only up to :data:`INLINE_MAX_BYTES`
(else a ``changed`` line) and only on credit: one ``data`` at a time until the client writes
a newline to the command's stdin (it does when its pass takes the content), so a slow link
carries at most one copy the client has not used yet, never a queue of stale ones; a
publication while no credit is left is sent, read afresh, when the credit comes. The content
is read from an open descriptor and its (inode, mtime, size) taken from that descriptor, so
what is sent is one whole published file (publications replace it atomically).

A file may have a *delta* (``deltas``: the active manifest's ``.gz`` and the publisher's
``active_manifest.delta.json.gz``, :mod:`runicorn.format.delta`): a change of the file is
then held for up to :data:`DELTA_GRACE_SECONDS`, and dropped when its delta changes
meanwhile (the publisher writes the delta right after the file), so a publication sends
the delta, a few kilobytes, not the whole file. A file replaced without a delta following
(another generator, or a publisher that writes none) is sent or announced when the grace
is over, and at once while no delta exists at all.

The command ends when its stdin closes (the client closed the channel, or the connection
died and sshd closed the session). It needs ``python3`` on the server's ``PATH``; without
one (exit 127), or where the server refuses exec channels, :meth:`ChangeFeed.start` still
returns and the feed ends at once with the reason, and the caller keeps polling.
"""

from __future__ import annotations

import base64
import logging
import shlex
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "CHECK_SECONDS",
    "DELTA_GRACE_SECONDS",
    "INLINE_MAX_BYTES",
    "PYTHON",
    "ChangeFeed",
    "feed_command",
]

logger = logging.getLogger(__name__)

PYTHON = "python3"
"""The interpreter the command asks the server's shell for."""
CHECK_SECONDS = 0.05
"""How often the server-side command stats the watched files: a publication is noticed
25 ms later on average, for about 80 ``stat`` calls a second with four paths."""

DELTA_GRACE_SECONDS = 0.3
"""How long the command holds a change of a file that has a delta (see the module) for the
delta that follows it; past that, the file itself is announced or sent."""
INLINE_MAX_BYTES = 8 * 1024 * 1024
"""The largest file the command sends inline: an active manifest of thousands of running runs
is well under it; a larger one is announced by a ``changed`` line and read over SFTP."""

_SCRIPT = """\
import os, select, stat, sys, time
inline = set(int(i) for i in sys.argv[1].split(",") if i)
cap = int(sys.argv[2])
pairs = dict(tuple(int(i) for i in p.split(":")) for p in sys.argv[3].split(",") if p)
paths = sys.argv[4:]
out = sys.stdout.buffer
def mark(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)
def content(path):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, None
    try:
        info = os.fstat(fd)
        seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            return None, seen
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            return None, seen
        return b"".join(chunks), seen
    finally:
        os.close(fd)
def send(index):
    data, seen = content(paths[index])
    if data is None:
        out.write(b"changed %%d\\n" %% index)
    else:
        out.write(b"data %%d %%d\\n" %% (index, len(data)) + data)
    return seen
last = [mark(path) for path in paths]
credit = 1
owed = set()
held = {}
whole_of = dict((delta, whole) for whole, delta in pairs.items())
out.write(b"ready\\n")
out.flush()
while True:
    readable = select.select([0], [], [], %(seconds)r)[0]
    if readable:
        got = os.read(0, 4096)
        if not got:
            break
        credit += got.count(b"\\n")
    now = [mark(path) for path in paths]
    wrote = False
    clock = time.monotonic()
    for index in range(len(paths)):
        if now[index] != last[index]:
            if index in pairs and now[pairs[index]] is not None:
                held[index] = clock + %(grace)r
            elif index in inline:
                owed.add(index)
            else:
                out.write(b"changed %%d\\n" %% index)
                wrote = True
            if index in whole_of:
                held.pop(whole_of[index], None)
                owed.discard(whole_of[index])
            last[index] = now[index]
    for index, until in list(held.items()):
        if clock >= until:
            del held[index]
            if index in inline:
                owed.add(index)
            else:
                out.write(b"changed %%d\\n" %% index)
                wrote = True
    for index in sorted(owed):
        if credit <= 0:
            break
        owed.discard(index)
        credit -= 1
        last[index] = send(index)
        wrote = True
    if wrote:
        out.flush()
"""


def feed_command(
    paths: Sequence[str],
    *,
    python: str | None = None,
    inline: Collection[int] = (),
    inline_max: int = INLINE_MAX_BYTES,
    deltas: Mapping[int, int] | None = None,
) -> str:
    """The shell command that watches ``paths`` on the server (see the module); the content
    of the paths whose indexes are in ``inline`` is sent whole, up to ``inline_max`` bytes.
    ``deltas`` maps a path's index to the index of its delta (see the module).

    The script travels base64-encoded in one shell word, so the user's login shell (sh, bash,
    zsh, tcsh) sees no newline and no quote of it; each path is one quoted word."""
    deltas = deltas or {}
    script = _SCRIPT % {"seconds": CHECK_SECONDS, "grace": DELTA_GRACE_SECONDS}
    encoded = base64.b64encode(script.encode()).decode("ascii")
    program = f"import base64; exec(base64.b64decode('{encoded}'))"
    spec = ",".join(str(index) for index in sorted(set(inline)))
    paired = ",".join(f"{whole}:{delta}" for whole, delta in sorted(deltas.items()))
    words = [python or PYTHON, "-c", program, spec, str(inline_max), paired, *paths]
    return " ".join(shlex.quote(word) for word in words)


class ChangeFeed:
    """Runs :func:`feed_command` on an exec channel of ``transport`` and reports its lines.

    ``on_change(index)`` is called for each ``changed`` line (the index into ``paths``),
    ``on_content(index, data)`` for each file of ``inline`` sent whole, ``on_ready()`` once
    the command has taken its first look, ``on_end(reason)`` once when the channel ends for
    any reason; all on the feed's reader thread. After each ``on_content`` the command sends
    no more content until :meth:`grant` (a ``changed`` line still comes for other paths).
    :meth:`close` ends it from any thread.
    """

    def __init__(
        self,
        transport: paramiko.Transport,
        paths: Sequence[str],
        *,
        on_change: Callable[[int], None],
        on_ready: Callable[[], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        on_content: Callable[[int, bytes], None] | None = None,
        inline: Collection[int] = (),
        inline_max: int = INLINE_MAX_BYTES,
        deltas: Mapping[int, int] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if inline and on_content is None:
            raise ValueError("inline content needs an on_content callback")
        self.transport = transport
        self.paths = list(paths)
        self.inline = sorted(set(inline))
        self.inline_max = inline_max
        self.deltas = dict(deltas or {})
        self.on_change = on_change
        self.on_content = on_content
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
            channel.exec_command(
                feed_command(
                    self.paths, inline=self.inline, inline_max=self.inline_max, deltas=self.deltas
                )
            )
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

    def grant(self) -> None:
        """Let the command send the next content (see the module); never raises."""
        channel = self._channel
        if channel is None or self.ended.is_set():
            return
        try:
            channel.sendall(b"\n")
        except Exception as error:  # the channel is going; the reader reports why
            logger.debug("granting the change feed more content: %s", error)

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    def _read(self, channel: paramiko.Channel) -> None:
        pending = bytearray()
        reason = "the command ended"
        try:
            while True:
                data = channel.recv(65536)
                if not data:
                    break
                pending += data
                self._consume(pending)
        except Exception as error:
            reason = f"reading it failed ({error})"
        if not self._closing:
            reason = self._why_ended(channel, reason)
        self._end(reason)

    def _consume(self, pending: bytearray) -> None:
        """Handle every whole line and ``data`` frame at the start of ``pending``, in place."""
        while True:
            end = pending.find(b"\n")
            if end < 0:
                if len(pending) > 4096:
                    raise ValueError("a line longer than 4096 bytes")
                return
            words = bytes(pending[:end]).split()
            if len(words) == 3 and words[0] == b"data":
                index, size = _number(words[1]), _number(words[2])
                if index is None or size is None or index not in self.inline:
                    raise ValueError(f"a malformed content frame {bytes(pending[:end])!r}")
                if size > self.inline_max:
                    raise ValueError(f"content of {size} bytes, over {self.inline_max}")
                if len(pending) < end + 1 + size:
                    return  # the rest of the content is on its way
                content = bytes(pending[end + 1 : end + 1 + size])
                del pending[: end + 1 + size]
                assert self.on_content is not None  # (inline needs it)
                self.on_content(index, content)
                continue
            line = bytes(pending[:end]).decode("ascii", "replace").strip()
            del pending[: end + 1]
            self._line(line)

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


def _number(word: bytes) -> int | None:
    return int(word) if word.isdigit() else None

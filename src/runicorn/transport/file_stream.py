"""A compressed file stream: many files' byte ranges over one exec channel, zstd or zlib in C.

SSH compression is done by ``sshd`` at zlib level 6 and undone by paramiko one SSH packet at a
time in Python, so on a slow link a cold sync is bound by CPU on both ends long before the wire
is full. This stream runs a small standard-library ``python3`` program on the server (as the
push channel of :mod:`.change_feed` does) that reads the files the client asks for and writes
them back framed, compressed at a low level with one shared context, so the SSH channel carries
a fraction of the bytes in a fraction of the packets and SSH compression can stay off.

The codec is zstd where both ends have it (Python 3.14's ``compression.zstd``, else the
``zstandard`` module: a runicorn dependency, so the server's interpreter has it when it is the
one of a runicorn environment, ``stream_python``), zlib otherwise. The client offers zstd only
when it can decode it; the server picks zstd when it can import it and was offered it, and names
its choice in its hello. On JSON lines zstd leaves about half of zlib's bytes at less server CPU
(``docs/performance.md``).

Wire format (all integers big-endian):

* client to server, one per requested range: ``!IQQI`` (index, offset, length, path length) and
  the path (UTF-8, relative to the root). Paths are opened beneath the root one component at a
  time with ``O_NOFOLLOW`` (``openat``), so a symbolic link anywhere on the way is refused, as
  the SFTP path's LSTAT check refuses it and without its window between check and open.
* server to client: blocks ``!BI`` (kind, length): ``Z`` blocks feed one decompressor of the
  codec the hello named (each ends in a flush: a zlib sync flush, a zstd block flush of one
  endless frame), ``R`` blocks are plain; both add to one byte stream of records
  ``!BIQI`` (kind, index, value, length) + payload: ``H`` (hello, value = protocol version,
  payload = the codec: ``zstd``, ``zlib`` or ``none``; always first, alone in an ``R`` block),
  ``D`` (data at file offset ``value``), ``E`` (end, value = bytes sent), ``S`` (short: the
  file ends at ``value``), ``X`` (error, value = errno, payload = message). Answers come in
  request order. A file whose first 4 KiB do not shrink under zlib level 1 (PNG, JPEG, NPZ:
  a probe that costs a quarter of one of 16 KiB and sorted a lab's files the same) goes in
  ``R`` blocks.

The client treats the stream as hostile: a block is at most :data:`MAX_BLOCK` bytes on the
wire and after decompression, a record answers the request that is next and stays within the
range asked for, and anything else ends the stream with :class:`StreamProtocolError`. The zstd
window is capped at :data:`ZSTD_WINDOW_LOG` (the decoder's memory), and a block that would
decompress past :data:`MAX_BLOCK` is refused before more than that is produced (a bomb).

Only the thread in :meth:`FileStream.serve` sends on the channel; a :meth:`~FileStream.close`
from another thread (a cancelled or interrupted fetch) marks the stream, and ``serve`` closes
the channel itself after its last send, within a poll (`POLL_SECONDS`). OpenSSH drops the whole
connection when data arrives for a channel it has freed, and paramiko sends a message after
releasing the lock under which it checked that the channel is open, so a close from another
thread could overtake a batch of requests on its way out.
"""

from __future__ import annotations

import base64
import collections
import errno
import importlib
import logging
import shlex
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from runicorn.transport import openssh_shortcuts
from runicorn.transport.polled_send import poll_seconds, send_all
from runicorn.transport.remote import ShrunkError, relative_path

if TYPE_CHECKING:
    from collections.abc import Callable

    import paramiko

    from runicorn.transport.fetch import FetchRun

__all__ = [
    "DEFAULT_LEVEL",
    "MAX_BLOCK",
    "PYTHON",
    "WINDOW_SIZE",
    "ZSTD_LEVEL",
    "ZSTD_WINDOW_LOG",
    "FileStream",
    "StreamBroken",
    "StreamProtocolError",
    "StreamUnavailable",
    "Unfinished",
    "stream_command",
    "zstd_available",
]

logger = logging.getLogger(__name__)

PYTHON = "python3"
"""The interpreter the command asks the server's shell for."""
VERSION = 2
DEFAULT_LEVEL = 1
"""zlib level of the server's compressor: level 1 keeps most of level 6's ratio on JSON lines
and logs for a fraction of its CPU (``docs/performance.md``)."""
ZSTD_LEVEL = 2
"""zstd level of the server's compressor, where both ends have zstd: on a lab's JSON lines,
with the window below, level 2 leaves fewer bytes than level 3 for less CPU, and half of zlib
level 1's bytes for a third of its CPU (``benchmarks/stream_codecs.py``)."""
ZSTD_WINDOW_LOG = 23
"""The zstd window (8 MiB): it reaches back across files (runs repeat their keys and values),
7 % fewer bytes than level 2's own window; long-distance matching gains little more for
twice the CPU. The client refuses frames that need a larger window."""
CHUNK = 128 * 1024
"""Bytes of file data in one record (the server never sends more)."""
WINDOW_SIZE = 8 * 1024 * 1024
"""The stream channel's SSH window: more than a 100 Mbit/s link at 50 ms holds (625 KB), so
the server is never held back by it, and what this client buffers at most."""
MAX_BLOCK = 1024 * 1024
"""The most bytes one block may carry, on the wire and once decompressed."""
MAX_OUTSTANDING = 1024
"""Requests sent and not yet answered: enough to keep a long link busy with small files."""
MAX_OUTSTANDING_BYTES = 256 * 1024
"""Request bytes sent and not yet answered: far below the server channel's window, so the
client's writes never wait on a server that is itself waiting for the client to read."""
REFILL_AT = MAX_OUTSTANDING // 2
"""Requests still unanswered when the client sends the next batch: one batch of hundreds of
requests is one SSH packet and one wake-up of the server program, where a request sent as
each answer completes is a packet (encrypted, sent, decrypted, piped) per file. Half the
queue is still tens of megabytes of small files in flight, far more than a link holds."""
REFILL_AT_BYTES = MAX_OUTSTANDING_BYTES // 2

_REQUEST = struct.Struct("!IQQI")
_BLOCK = struct.Struct("!BI")
_RECORD = struct.Struct("!BIQI")
_Z, _R = ord("Z"), ord("R")
_HELLO, _DATA, _END, _SHORT, _ERROR = (ord(c) for c in "HDESX")

_SCRIPT = """\
import collections, os, select, stat, struct, sys, zlib
REQ = struct.Struct("!IQQI")
REC = struct.Struct("!BIQI")
BLK = struct.Struct("!BI")
CHUNK = %(chunk)d
PLAIN = 128 * 1024
PROBE = 4096
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
FILE = os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
DIR = os.O_RDONLY | NOFOLLOW | os.O_DIRECTORY
WINDOW_LOG = %(window_log)d
def site_paths():
    import site
    here = os.path.dirname(os.path.abspath(sys.executable))
    prefixes = [d for d in (here, os.path.dirname(here))
                if os.path.isfile(os.path.join(d, "pyvenv.cfg"))][:1]
    for path in site.getsitepackages(prefixes or None):
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
def zstd_packer(zlevel):
    try:
        from compression import zstd
    except ImportError:
        zstd = None
    if zstd is not None:
        param = zstd.CompressionParameter
        c = zstd.ZstdCompressor(options={param.compression_level: zlevel,
                                         param.window_log: WINDOW_LOG})
        mode = zstd.ZstdCompressor.FLUSH_BLOCK
        return lambda body: c.compress(body, mode)
    site_paths()
    import zstandard
    params = zstandard.ZstdCompressionParameters.from_level(zlevel, window_log=WINDOW_LOG)
    o = zstandard.ZstdCompressor(compression_params=params).compressobj()
    mode = zstandard.COMPRESSOBJ_FLUSH_BLOCK
    return lambda body: o.compress(body) + o.flush(mode)
def zlib_packer(level):
    z = zlib.compressobj(level)
    return lambda body: z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH)
def shebang(path):
    with open(path, "rb") as script:
        head = script.read(512).split(b"\\n")
    if not head[0].startswith(b"#!"):
        return None
    words = head[0][2:].split()
    if words == [b"/bin/sh"] and len(head) > 1 and head[1].startswith(b"'''exec' "):
        import shlex
        words = [os.fsencode(w) for w in shlex.split(os.fsdecode(head[1][9:]))]
    if not words or not words[0].startswith(b"/") or os.path.basename(words[0]) == b"env":
        return None
    return os.fsdecode(words[0])
def runicorn_python():
    places = os.environ.get("PATH", "").split(os.pathsep)
    places.append(os.path.join(os.path.expanduser("~"), ".local", "bin"))
    for place in places:
        command = os.path.join(place, "runicorn")
        if not place or not os.path.isfile(command) or not os.access(command, os.X_OK):
            continue
        python = shebang(command)
        if python is None or not os.access(python, os.X_OK):
            return None
        import glob
        prefix = glob.escape(os.path.dirname(os.path.dirname(python)))
        lib = os.path.join(prefix, "lib*", "python3*", "site-packages", "zstandard")
        return python if glob.glob(os.path.join(lib, "__init__.py")) else None
    return None
def reexec(zlevel):
    try:
        python = runicorn_python()
        if python is None:
            return
        program = "import base64; S=%%r; exec(base64.b64decode(S))" %% (S,)
        os.execv(python, [python, "-I", "-S", "-c", program, sys.argv[1], sys.argv[2],
                          str(zlevel), "0"])
    except (OSError, ValueError, NameError):
        return
level = int(sys.argv[2])
zlevel = int(sys.argv[3]) if len(sys.argv) > 3 else 0
find = len(sys.argv) > 4 and sys.argv[4] == "1"
comp, codec = None, b"none"
if level > 0 and zlevel > 0:
    try:
        comp, codec = zstd_packer(zlevel), b"zstd"
    except Exception:
        comp = None
    if comp is None and find:
        reexec(zlevel)
if level > 0 and comp is None:
    comp, codec = zlib_packer(level), b"zlib"
pend = []
size = [0]
def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
def flush():
    if not size[0]:
        return
    body = b"".join(pend)
    del pend[:]
    size[0] = 0
    if comp is None:
        write(BLK.pack(82, len(body)) + body)
    else:
        body = comp(body)
        write(BLK.pack(90, len(body)) + body)
def plain(data):
    if size[0] and size[0] + len(data) > PLAIN:
        flush()
    pend.append(data)
    size[0] += len(data)
def raw(data):
    flush()
    write(BLK.pack(82, len(data)) + data)
def record(kind, index, value, payload=b""):
    plain(REC.pack(kind, index, value, len(payload)) + payload)
def serve(root, index, offset, length, path):
    parts = path.split(b"/")
    if not path or [p for p in parts if p in (b"", b".", b"..")]:
        record(88, index, 22, b"not a plain relative path")
        return
    opened = []
    fd = -1
    try:
        try:
            parent = root
            for part in parts[:-1]:
                parent = os.open(part, DIR, dir_fd=parent)
                opened.append(parent)
            fd = os.open(parts[-1], FILE, dir_fd=parent)
        finally:
            for d in opened:
                os.close(d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            record(88, index, 22, b"not a regular file")
            return
        pos, end, packed = offset, offset + length, None
        while pos < end:
            data = os.pread(fd, min(CHUNK, end - pos), pos)
            if not data:
                break
            if packed is None:
                packed = comp is not None and (len(data) < PROBE or
                    len(zlib.compress(data[:PROBE], 1)) < 0.9 * PROBE)
            head = REC.pack(68, index, pos, len(data))
            if comp is None or packed:
                plain(head + data)
            else:
                raw(head + data)
            pos += len(data)
        if pos < end:
            record(83, index, pos)
        else:
            record(69, index, length)
    except OSError as error:
        message = (error.strerror or str(error)).encode("utf-8", "replace")
        record(88, index, error.errno or 5, message)
    finally:
        if fd >= 0:
            os.close(fd)
def main():
    root = os.open(os.fsencode(sys.argv[1]), os.O_RDONLY | os.O_DIRECTORY)
    raw(REC.pack(72, 0, %(version)d, len(codec)) + codec)
    buf = b""
    queue = collections.deque()
    eof = False
    while True:
        if not eof:
            wait = None if not queue else 0
            if not queue:
                flush()
            if select.select([0], [], [], wait)[0]:
                data = os.read(0, 1 << 16)
                if not data:
                    eof = True
                buf += data
                at = 0
                while len(buf) - at >= REQ.size:
                    index, offset, length, plen = REQ.unpack_from(buf, at)
                    if len(buf) - at - REQ.size < plen:
                        break
                    start = at + REQ.size
                    queue.append((index, offset, length, buf[start:start + plen]))
                    at = start + plen
                buf = buf[at:]
        if not queue:
            if eof:
                break
            continue
        serve(root, *queue.popleft())
    flush()
try:
    main()
except (BrokenPipeError, KeyboardInterrupt):
    pass
"""


def stream_command(
    root: str,
    level: int,
    *,
    python: str | None = None,
    zstd_level: int = 0,
    find_runicorn: bool = False,
) -> str:
    """The shell command that serves files under ``root`` (see the module), compressing at
    zlib ``level`` (0: not at all), or with zstd at ``zstd_level`` when that is not 0 and the
    server's interpreter can import zstd. The script travels base64-encoded in one shell word,
    so the user's login shell (sh, bash, zsh, tcsh) sees no newline and no quote of it.

    The interpreter runs isolated (``-I -S``: no environment variables, no ``.pth`` code); for
    ``zstandard`` the script adds the site-packages of that interpreter (its virtual
    environment's, when it is one) at the end of its path, and nothing else.

    With ``find_runicorn``, an interpreter that cannot import zstd looks for the account's own
    ``runicorn`` command (the first on its ``PATH``, else ``~/.local/bin/runicorn``, where pip
    and pipx put it), and when that command's ``#!`` interpreter has ``zstandard`` installed
    beside it, replaces itself with that interpreter (``exec``, before it says anything).
    Only the login's own environment is consulted, never a path the server publishes; any
    doubt (no such command, an ``env`` line, no ``zstandard``) keeps the first interpreter."""
    script = _SCRIPT % {"chunk": CHUNK, "version": VERSION, "window_log": ZSTD_WINDOW_LOG}
    encoded = base64.b64encode(script.encode()).decode("ascii")
    # The script reads its own text from ``S`` to hand it to the interpreter it may exec.
    program = f"import base64; S='{encoded}'; exec(base64.b64decode(S))"
    words = ["-I", "-S", "-c", program, root, str(level), str(zstd_level), str(int(find_runicorn))]
    return " ".join([_interpreter(python or PYTHON), *(shlex.quote(word) for word in words)])


def _interpreter(python: str) -> str:
    """``python`` quoted for the server's shell, but a leading ``~/`` left unquoted for that
    shell to expand to the account's home (as it does for rsync's ``--rsync-path``)."""
    if python.startswith("~/"):
        return "~/" + shlex.quote(python[2:])
    return shlex.quote(python)


class _Inflater(Protocol):
    """One decompression context for the whole stream, fed one ``Z`` block at a time."""

    def inflate(self, body: bytes | memoryview) -> bytes:
        """The block's bytes; StreamProtocolError past :data:`MAX_BLOCK` or on bad data."""
        ...


class _ZlibInflater:
    def __init__(self) -> None:
        self._inflater = zlib.decompressobj()

    def inflate(self, body: bytes | memoryview) -> bytes:
        try:
            out = self._inflater.decompress(body, MAX_BLOCK)
        except zlib.error as error:
            raise StreamProtocolError(f"a compressed block does not decompress ({error})") from None
        if self._inflater.unconsumed_tail:
            raise StreamProtocolError(
                f"a compressed block inflates past {MAX_BLOCK} bytes (a zlib bomb?)"
            )
        return out


class _Overflow(Exception):
    pass


class _BoundedSink:
    """Where ``zstandard``'s stream writer puts a block's output: it refuses to hold more
    than :data:`MAX_BLOCK` bytes, which stops the decoder in the middle of a bomb."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > MAX_BLOCK:
            raise _Overflow
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts, self.size = [], 0
        return out


class _ZstandardInflater:
    """zstd through the ``zstandard`` module. Its stream writer hands the decoder's output on
    in pieces of at most its output buffer, which is one byte larger than any block may
    inflate to: a block that fits is always emitted whole (the decoder only holds output back
    when the buffer is full), and one that does not is stopped at the first piece."""

    def __init__(self, module: Any) -> None:
        self._error: type[Exception] = module.ZstdError
        self._sink = _BoundedSink()
        decoder = module.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG)
        self._writer = decoder.stream_writer(
            self._sink, write_size=MAX_BLOCK + 1, write_return_read=True, closefd=False
        )

    def inflate(self, body: bytes | memoryview) -> bytes:
        try:
            self._writer.write(body)
        except _Overflow:
            raise StreamProtocolError(
                f"a compressed block inflates past {MAX_BLOCK} bytes (a zstd bomb?)"
            ) from None
        except self._error as error:
            raise StreamProtocolError(f"a compressed block does not decompress ({error})") from None
        return self._sink.take()


class _StdlibZstdInflater:
    """zstd through Python 3.14's ``compression.zstd``, whose decoder takes an output cap."""

    def __init__(self, module: Any) -> None:
        self._error: type[Exception] = module.ZstdError
        window = module.DecompressionParameter.window_log_max
        self._decoder = module.ZstdDecompressor(options={window: ZSTD_WINDOW_LOG})

    def inflate(self, body: bytes | memoryview) -> bytes:
        try:
            out: bytes = self._decoder.decompress(body, MAX_BLOCK + 1)
        except (self._error, EOFError) as error:
            raise StreamProtocolError(f"a compressed block does not decompress ({error})") from None
        if len(out) > MAX_BLOCK or not self._decoder.needs_input:
            raise StreamProtocolError(
                f"a compressed block inflates past {MAX_BLOCK} bytes (a zstd bomb?)"
            )
        return out


def _zstd_module() -> tuple[str, Any] | None:
    """The zstd this client can decode with (the standard library's first), or None."""
    for name in ("compression.zstd", "zstandard"):
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    return None


def zstd_available() -> bool:
    """Whether this client can decode a zstd stream (and so offers one to the server)."""
    return _zstd_module() is not None


def _zstd_inflater() -> _Inflater:
    found = _zstd_module()
    if found is None:
        raise StreamProtocolError("the server chose zstd, which this client did not offer")
    name, module = found
    if name == "zstandard":
        return _ZstandardInflater(module)
    return _StdlibZstdInflater(module)


class StreamBroken(ConnectionError):
    """The stream ended mid-way (the channel closed, the command died, a timeout).

    ``unfinished``: the jobs taken and not answered, for a fallback to finish."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.unfinished: list[Unfinished] = []


class StreamUnavailable(StreamBroken):
    """The stream could not start (no ``python3`` on the server, exec refused): use SFTP."""


class StreamProtocolError(StreamBroken):
    """The server broke the stream's protocol: what it sent is refused, not written."""


@dataclass(slots=True)
class Unfinished:
    """A job the stream took and did not finish: ``received`` bytes of it reached its sink
    (so a fallback resumes at ``job.offset + received``)."""

    index: int
    received: int


@dataclass(slots=True)
class _Pending:
    index: int
    path: str
    end: int
    position: int
    received: int = 0
    size: int = 0


def _os_error(code: int, message: str, path: str) -> OSError:
    text = f"{message} (on the server, through the file stream)"
    if code == errno.ENOENT:
        return FileNotFoundError(code, text, path)
    if code in (errno.EACCES, errno.EPERM):
        return PermissionError(code, text, path)
    if code in (errno.ELOOP, errno.ENOTDIR):
        return OSError(
            errno.ELOOP,
            "a symbolic link (or not a directory) on the way on the server; refusing to read "
            "through it",
            path,
        )
    return OSError(code, text, path)


class FileStream:
    """One running stream command on an exec channel of ``transport``.

    :meth:`serve` answers fetch jobs (a :class:`~.fetch.FetchRun`) until none is left; the
    stream stays open for the next call. One thread drives it at a time. ``level`` is the
    server's zlib level (0: plain blocks, for a link where compressing does not pay);
    ``zstd_level`` the zstd level offered instead when this client can decode zstd (0: zlib
    only). :attr:`codec` is what the server chose, once it said hello.

    ``decide_level``, when given, is asked for the zlib level by :meth:`start` once the
    channel is open, just before the command goes out: the connection's compression choice
    may still be settling (its keepalive check of the link), and it settles while the
    channel's open crosses the link.
    """

    def __init__(
        self,
        transport: paramiko.Transport,
        root: str,
        *,
        level: int = DEFAULT_LEVEL,
        zstd_level: int = ZSTD_LEVEL,
        python: str | None = None,
        timeout: float | None = 30.0,
        window_size: int | None = WINDOW_SIZE,
        decide_level: Callable[[], int] | None = None,
    ) -> None:
        if not 0 <= zstd_level <= 19:
            raise ValueError(f"zstd level must be 0 to 19, got {zstd_level}")
        self.root = root
        self._zstd_wanted = zstd_level
        self._decide_level = decide_level
        self.level = 0
        self.zstd_level = 0
        """The zstd level offered (0: this client asks for zlib, or for no compression)."""
        self._set_level(level)
        self.codec: str | None = None
        """``zstd``, ``zlib`` or ``none``: what the server's hello said it compresses with."""
        self.python = python or PYTHON
        self.find_runicorn = python is None
        """Whether the server may swap the default ``python3`` for the interpreter of the
        account's own ``runicorn`` (see :func:`stream_command`): not when one was named."""
        self.timeout = timeout
        self.wire_bytes = 0
        """Bytes of blocks received (what crossed the link, before SSH framing)."""
        self.plain_bytes = 0
        """Bytes of records those blocks held once decompressed."""
        self._transport = transport
        self._window_size = window_size
        self._channel: paramiko.Channel | None = None
        self._inflater: _Inflater | None = None
        self._inbox = bytearray()
        self._records = bytearray()
        self._said_hello = False
        self._closed = False
        # close() from another thread while serve() drives the channel: serve closes it (see
        # the module docstring). Guarded by _lock together with _closed.
        self._serving = False
        self._lock = threading.Lock()

    def _set_level(self, level: int) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level must be 0 to 9, got {level}")
        self.level = level
        self.zstd_level = self._zstd_wanted if level > 0 and zstd_available() else 0

    # -- the channel -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the exec channel and start the command; StreamUnavailable if refused.

        Does not wait for the server: the first :meth:`serve` reads its hello (and learns
        then whether ``python3`` ran)."""
        channel = None
        try:
            if self._window_size is not None:  # a first sync's, opened beside the SFTP one
                channel = openssh_shortcuts.take_session_ahead(
                    self._transport, self._window_size, self.timeout
                )
            if channel is None:
                channel = self._transport.open_session(
                    window_size=self._window_size, timeout=self.timeout
                )
            if self._decide_level is not None:
                self._set_level(self._decide_level())
            openssh_shortcuts.exec_early(
                channel,
                stream_command(
                    self.root,
                    self.level,
                    python=self.python,
                    zstd_level=self.zstd_level,
                    find_runicorn=self.find_runicorn,
                ),
            )
        except Exception as error:
            if channel is not None:
                channel.close()
            raise StreamUnavailable(
                f"the server refused the file stream's command channel ({error})"
            ) from None
        channel.settimeout(self.timeout)
        self._channel = channel

    @property
    def alive(self) -> bool:
        channel = self._channel
        return channel is not None and not self._closed and not channel.closed

    def failed_to_start(self) -> StreamBroken | None:
        """Why the command ended by itself before its hello (e.g. no such interpreter), once
        its channel has closed; None while it runs, after it served, or when closed here."""
        channel = self._channel
        if channel is None or self._closed or self._said_hello or not channel.closed:
            return None
        return self._ended(channel)

    def finish(self, wait: float = 2.0) -> None:
        """End the command cleanly: close its stdin, wait up to ``wait`` seconds (one round
        trip) for it to exit, then close the channel. A server whose connection closes
        first may leave the command to end unobserved, outside its session's accounting."""
        channel = self._channel
        if channel is not None and self.alive:
            try:
                channel.shutdown_write()
                channel.status_event.wait(wait)
            except Exception as error:  # a dead transport: nothing left to end
                logger.debug("ending the file stream: %s", error)
        self.close()

    def close(self) -> None:
        """Close the channel (the command ends on its closed stdin); any thread. A
        :meth:`serve` in another thread stops within a poll (`POLL_SECONDS`) and closes the
        channel itself, after its last send."""
        with self._lock:
            self._closed = True
            channel = self._channel
            if self._serving:
                return
        if channel is not None:
            self._close_channel(channel)

    @staticmethod
    def _close_channel(channel: paramiko.Channel) -> None:
        try:
            channel.close()
        except Exception as error:  # a dead transport: nothing left to close
            logger.debug("closing the file stream: %s", error)

    def _stop_if_closed(self) -> None:
        if self._closed:
            raise StreamBroken("the file stream was closed (the fetch was stopped)")

    def _waited(self, since: float, what: str) -> None:
        """A poll of the channel timed out: stop if the stream was closed, raise StreamBroken
        once ``timeout`` seconds passed ``since`` (without progress), else let the caller
        poll on."""
        self._stop_if_closed()
        if self.timeout is not None and time.monotonic() - since >= self.timeout:
            raise StreamBroken(
                f"the file stream {what} for {self.timeout} s; the link or the server stalled"
            )

    def _send(self, channel: paramiko.Channel, data: bytes) -> None:
        """Send all of ``data`` (the channel's timeout is a poll: see :meth:`_waited`); a
        command that ended (no python3?) says why, not "closed"."""
        send_all(
            channel,
            data,
            stop_if_asked=self._stop_if_closed,
            waited=self._waited,
            ended=lambda: self._ended(channel),
            explain_closed=True,
        )

    # -- serving jobs ------------------------------------------------------------------------

    def serve(self, run: FetchRun) -> list[Unfinished]:
        """Fetch ``run``'s jobs (taken in priority order) until none is left.

        Returns ``[]`` when every job taken was answered (its result posted to ``run``). When
        the stream breaks, the error is raised as :class:`StreamBroken` (or
        :class:`StreamUnavailable` before the server said hello) with ``unfinished`` set on
        it: the jobs taken and not answered, for a fallback to finish. A protocol violation
        fails the job it was about (its bytes so far are not installed) and is raised the same
        way.
        """
        channel = self._channel
        if channel is None:
            raise StreamUnavailable("the file stream was not started")
        with self._lock:
            self._serving = True
        pending: collections.deque[_Pending] = collections.deque()
        state = {"sent_bytes": 0, "exhausted": False}

        def top_up() -> None:
            out = bytearray()
            while (
                not state["exhausted"]
                and len(pending) < MAX_OUTSTANDING
                and state["sent_bytes"] < MAX_OUTSTANDING_BYTES
            ):
                index = run.take()
                if index is None:
                    state["exhausted"] = True
                    break
                job = run.jobs[index]
                try:
                    path = relative_path(job.path)
                    if not path:
                        raise ValueError(f"refusing remote path {job.path!r}: it is the root")
                except ValueError as error:
                    run.done(index, error, 0)
                    continue
                encoded = path.encode("utf-8", "surrogateescape")
                request = _REQUEST.pack(index, job.offset, job.length, len(encoded)) + encoded
                out += request
                pending.append(
                    _Pending(index, job.path, job.offset + job.length, job.offset, 0, len(request))
                )
                state["sent_bytes"] += len(request)
            if out:
                self._send(channel, bytes(out))

        try:
            channel.settimeout(self._poll_seconds())
            top_up()
            while pending or not self._said_hello:
                if not self._records_ready():
                    self._receive(channel)
                    continue
                kind, index, value, payload = self._next_record()
                if kind == _HELLO:
                    if self._said_hello or value != VERSION:
                        raise StreamProtocolError(
                            f"unexpected hello (protocol version {value}, expected {VERSION})"
                        )
                    self._hello(payload)
                    continue
                if not self._said_hello:
                    raise StreamProtocolError("the server did not start with a hello")
                if not pending:
                    raise StreamProtocolError(f"an answer for request {index}, none was asked for")
                head = pending[0]
                if index != head.index:
                    raise StreamProtocolError(
                        f"an answer for request {index} while request {head.index} "
                        f"({head.path!r}) was next"
                    )
                if kind == _DATA:
                    if value != head.position or len(payload) > head.end - head.position:
                        raise StreamProtocolError(
                            f"{len(payload)} bytes at offset {value} of {head.path!r}, outside "
                            f"what was asked (offset {head.position}, up to {head.end})"
                        )
                    if payload:
                        head.position += len(payload)
                        if not run.abandoned(index):
                            run.data(index, value, payload)
                        head.received += len(payload)
                    continue
                if payload and kind != _ERROR:
                    raise StreamProtocolError(f"a payload on a record of kind {kind}")
                if kind == _END:
                    if head.position != head.end or value != head.end - run.jobs[index].offset:
                        raise StreamProtocolError(
                            f"{head.path!r} ended at {head.position}, not at {head.end}"
                        )
                    run.done(index, None, head.received)
                elif kind == _SHORT:
                    if value != head.position or value >= head.end:
                        raise StreamProtocolError(
                            f"{head.path!r} said to end at {value}, having sent up to "
                            f"{head.position} of {head.end}"
                        )
                    run.done(index, ShrunkError(head.path, head.end, value), head.received)
                elif kind == _ERROR:
                    message = payload.decode("utf-8", "replace")[:512]
                    run.done(index, _os_error(int(value), message, head.path), head.received)
                else:
                    raise StreamProtocolError(f"a record of unknown kind {kind}")
                pending.popleft()
                state["sent_bytes"] -= head.size
                if (
                    not state["exhausted"]
                    and len(pending) <= REFILL_AT
                    and state["sent_bytes"] <= REFILL_AT_BYTES
                ):
                    top_up()
        except StreamProtocolError as error:
            self.close()
            error.unfinished = self._fail_head(run, pending, error)
            raise
        except StreamBroken as error:
            self.close()
            error.unfinished = [Unfinished(p.index, p.received) for p in pending]
            raise
        except Exception as error:
            self.close()
            broken: StreamBroken = (
                StreamBroken(f"the file stream broke: {error}")
                if self._said_hello
                else StreamUnavailable(f"the file stream did not start: {error}")
            )
            broken.unfinished = [Unfinished(p.index, p.received) for p in pending]
            raise broken from error
        finally:
            with self._lock:
                self._serving = False
                close_now = self._closed
            if close_now:  # asked from another thread while this one could send
                self._close_channel(channel)
        return []

    def _poll_seconds(self) -> float:
        return poll_seconds(self.timeout)

    def _hello(self, payload: bytes) -> None:
        """Take the server's codec: one this client offered, or a protocol error."""
        codec = payload.decode("ascii", "replace")
        offered = ["none"] if self.level == 0 else ["zlib"]
        if self.zstd_level:
            offered.append("zstd")
        if codec not in offered:
            raise StreamProtocolError(
                f"the server chose the codec {codec[:16]!r}; this client offered "
                + " or ".join(offered)
            )
        if codec == "zstd":
            self._inflater = _zstd_inflater()
        elif codec == "zlib":
            self._inflater = _ZlibInflater()
        self.codec = codec
        self._said_hello = True
        logger.debug("the file stream compresses with %s", codec)

    @staticmethod
    def _fail_head(
        run: FetchRun, pending: collections.deque[_Pending], error: StreamProtocolError
    ) -> list[Unfinished]:
        """A violation fails the job it was about (when one was under way); the rest are
        handed back untouched or resumable."""
        if pending and pending[0].received:
            head = pending.popleft()
            run.done(head.index, StreamProtocolError(str(error)), head.received)
        return [Unfinished(p.index, p.received) for p in pending]

    # -- reading blocks and records ----------------------------------------------------------

    def _receive(self, channel: paramiko.Channel) -> None:
        """Read one block from the channel into the record buffer."""
        while len(self._inbox) < _BLOCK.size:
            self._fill(channel)
        kind, length = _BLOCK.unpack_from(self._inbox)
        if kind not in (_Z, _R) or length > MAX_BLOCK:
            raise StreamProtocolError(
                f"a block of kind {kind} and {length} bytes (at most {MAX_BLOCK} are accepted)"
            )
        end = _BLOCK.size + length
        while len(self._inbox) < end:
            self._fill(channel)
        if kind == _Z and self._inflater is None:
            raise StreamProtocolError(
                "a compressed block before the hello, or after one that chose no codec"
            )
        # The block is read in place: a copy of it would be one more pass over every byte.
        with memoryview(self._inbox) as inbox, inbox[_BLOCK.size : end] as block:
            if self._inflater is not None and kind == _Z:
                body = self._inflater.inflate(block)
                self._records += body
                self.plain_bytes += len(body)
            else:
                self._records += block
                self.plain_bytes += length
        del self._inbox[:end]
        self.wire_bytes += end
        if len(self._records) > 2 * MAX_BLOCK:
            raise StreamProtocolError("a record larger than any the client asked for")

    def _fill(self, channel: paramiko.Channel) -> None:
        since = time.monotonic()
        while True:
            self._stop_if_closed()
            try:
                data = channel.recv(1 << 20)
                break
            except TimeoutError:
                self._waited(since, "sent nothing")
        if not data:
            raise self._ended(channel)
        self._inbox += data

    def _ended(self, channel: paramiko.Channel) -> StreamBroken:
        """Why the channel ended: the exit status and the end of stderr, when known."""
        status = channel.exit_status if channel.status_event.wait(2.0) else None
        stderr = b""
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(4096)
        text = stderr.decode("utf-8", "replace").strip()
        last = f": {text.splitlines()[-1]}" if text else ""
        if status == 127:
            return StreamUnavailable(f"{self.python} was not found on the server{last}")
        detail = f"exit status {status}" if status is not None else "the channel closed"
        if not self._said_hello:
            return StreamUnavailable(f"the file stream did not start ({detail}{last})")
        return StreamBroken(f"the file stream ended mid-way ({detail}{last})")

    def _records_ready(self) -> bool:
        if len(self._records) < _RECORD.size:
            return False
        length: int = _RECORD.unpack_from(self._records)[3]
        if length > CHUNK:
            raise StreamProtocolError(f"a record of {length} bytes (at most {CHUNK} are sent)")
        return len(self._records) >= _RECORD.size + length

    def _next_record(self) -> tuple[int, int, int, bytes]:
        kind, index, value, length = _RECORD.unpack_from(self._records)
        end = _RECORD.size + length
        with memoryview(self._records) as records, records[_RECORD.size : end] as piece:
            payload = bytes(piece)
        del self._records[:end]
        return kind, index, value, payload

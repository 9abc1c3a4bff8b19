"""The pipelined SFTP v3 client: framing, many requests in flight, errors per request.

Protocol-level behaviour that a real server does not show on demand (answers out of order, a
server that goes silent) is driven by a small in-memory server; everything else runs against
the real OpenSSH sftp-server through the ``sshd`` fixtures.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from runicorn.remote_storage import sftp_pipeline as sp
from runicorn.remote_storage.sftp_pipeline import (
    ListDirOp,
    ReadRangeOp,
    SftpPipeline,
    ShrunkError,
    status_error,
)

# -- an in-memory SFTP server ------------------------------------------------------------------


def _packet(ptype: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, ptype) + body


def _str(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class FakeSftpChannel:
    """Just enough of a paramiko Channel and an SFTP server to script awkward answers.

    Answers wait until the client reads, then leave in reverse order when ``reverse`` is set;
    ``silent`` answers nothing at all (``recv`` times out as paramiko's does).
    """

    def __init__(self, files: dict[str, bytes], *, reverse: bool = False, silent: bool = False):
        self.files = files
        self.reverse = reverse
        self.silent = silent
        self.closed = False
        self.timeout: float | None = None
        self._inbox = bytearray()
        self._answers: list[bytes] = []
        self._out = bytearray()
        self._handles: dict[bytes, str] = {}
        self.outstanding = 0
        self.max_outstanding = 0
        self.requests: list[int] = []

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def close(self) -> None:
        self.closed = True

    def sendall(self, data: bytes) -> None:
        self._inbox += data
        while len(self._inbox) >= 4:
            (size,) = struct.unpack_from(">I", self._inbox)
            if len(self._inbox) < 4 + size:
                break
            packet = bytes(self._inbox[4 : 4 + size])
            del self._inbox[: 4 + size]
            self._handle(packet[0], packet[1:])

    def _handle(self, ptype: int, body: bytes) -> None:
        if ptype == sp.FXP_INIT:
            self._out += _packet(sp.FXP_VERSION, struct.pack(">I", 3))
            return
        (rid,) = struct.unpack_from(">I", body)
        self.requests.append(ptype)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        head = struct.pack(">I", rid)
        rest = body[4:]
        (length,) = struct.unpack_from(">I", rest)
        name_or_handle = rest[4 : 4 + length]
        if ptype == sp.FXP_OPEN:
            path = name_or_handle.decode()
            if path not in self.files:
                answer = _packet(
                    sp.FXP_STATUS, head + struct.pack(">I", 2) + _str(b"no") + _str(b"")
                )
            else:
                handle = str(len(self._handles)).encode()
                self._handles[handle] = path
                answer = _packet(sp.FXP_HANDLE, head + _str(handle))
        elif ptype == sp.FXP_READ:
            offset, size = struct.unpack_from(">QI", rest, 4 + length)
            data = self.files[self._handles[name_or_handle]][offset : offset + size]
            if data:
                answer = _packet(sp.FXP_DATA, head + _str(data))
            else:
                answer = _packet(sp.FXP_STATUS, head + struct.pack(">I", 1) + _str(b"") + _str(b""))
        else:  # CLOSE and anything else: OK
            answer = _packet(sp.FXP_STATUS, head + struct.pack(">I", 0) + _str(b"") + _str(b""))
        self._answers.append(answer)

    def recv(self, nbytes: int) -> bytes:
        if not self._out and self._answers and not self.silent:
            answers = self._answers[::-1] if self.reverse else self._answers
            self._out += b"".join(answers)
            self.outstanding -= len(answers)
            self._answers = []
        if not self._out:
            if self.closed:
                return b""
            raise TimeoutError("timed out")  # what paramiko's recv raises after its timeout
        data = bytes(self._out[:nbytes])
        del self._out[:nbytes]
        return data


def _collect(op_path: str, offset: int, length: int, read_size: int, **options: object):
    pieces: list[tuple[int, bytes]] = []
    outcome: list[tuple[BaseException | None, int]] = []
    op = ReadRangeOp(
        op_path,
        offset,
        length,
        read_size,
        lambda off, data: pieces.append((off, data)),
        lambda error, received: outcome.append((error, received)),
        **options,  # type: ignore[arg-type]
    )
    return op, pieces, outcome


def test_answers_out_of_order_reach_the_sink_in_offset_order() -> None:
    data = os.urandom(10_000)
    channel = FakeSftpChannel({"/f": data}, reverse=True)
    pipe = SftpPipeline(channel, depth=16, read_size=1000)  # type: ignore[arg-type]
    op, pieces, outcome = _collect("/f", 500, 9000, 1000)
    pipe.run(ops=[op])
    assert [off for off, _ in pieces] == sorted(off for off, _ in pieces)
    assert b"".join(chunk for _, chunk in pieces) == data[500:9500]
    assert outcome == [(None, 9000)]


def test_never_more_requests_in_flight_than_depth() -> None:
    files = {f"/f{i}": os.urandom(5000) for i in range(20)}
    channel = FakeSftpChannel(files)
    pipe = SftpPipeline(channel, depth=3, read_size=1000)  # type: ignore[arg-type]
    ops = iter([_collect(name, 0, 5000, 1000)[0] for name in files])
    pipe.run(lambda: next(ops, None))
    assert channel.max_outstanding == 3


def test_a_silent_server_times_out_and_fails_every_open_operation() -> None:
    channel = FakeSftpChannel({"/a": b"x" * 10, "/b": b"y" * 10}, silent=True)
    pipe = SftpPipeline.__new__(SftpPipeline)  # skip the handshake the silent server ignores
    SftpPipeline.__init__(pipe, channel, depth=4, timeout=0.01, borrowed=True)  # type: ignore[arg-type]
    op_a, _, outcome_a = _collect("/a", 0, 10, 100)
    op_b, _, outcome_b = _collect("/b", 0, 10, 100)
    with pytest.raises(TimeoutError):
        pipe.run(ops=[op_a, op_b])
    assert isinstance(outcome_a[0][0], TimeoutError)
    assert isinstance(outcome_b[0][0], TimeoutError)
    assert not pipe.alive


def test_status_codes_become_the_matching_python_exceptions() -> None:
    assert isinstance(status_error(sp.FX_NO_SUCH_FILE, "", "p"), FileNotFoundError)
    assert isinstance(status_error(sp.FX_PERMISSION_DENIED, "", "p"), PermissionError)
    assert isinstance(status_error(sp.FX_EOF, "", "p"), EOFError)
    assert isinstance(status_error(sp.FX_CONNECTION_LOST, "", "p"), ConnectionError)
    failure = status_error(sp.FX_FAILURE, "boom", "p")
    assert type(failure) is OSError and failure.errno == errno.EIO and "boom" in str(failure)


# -- against OpenSSH ---------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    contents = {
        "big.bin": os.urandom(3 * 1024 * 1024 + 17),
        "small.txt": b"hello\n",
        "empty": b"",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub").mkdir()
    os.symlink("small.txt", tmp_path / "link")
    return contents


@pytest.fixture
def pipeline(ssh_client: paramiko.SSHClient) -> Iterator[SftpPipeline]:
    pipe = SftpPipeline.open(ssh_client.get_transport(), timeout=10)
    yield pipe
    pipe.close()


@pytest.mark.sshd
def test_the_server_speaks_version_3(pipeline: SftpPipeline) -> None:
    assert pipeline.server_version == 3


@pytest.mark.sshd
@pytest.mark.parametrize("read_size", [32 * 1024, 255 * 1024, 1024 * 1024])
def test_many_files_read_in_one_run_are_byte_exact(
    pipeline: SftpPipeline, tmp_path: Path, files: dict[str, bytes], read_size: int
) -> None:
    # 1 MiB asks for more than OpenSSH's 255 KiB: the short answers are re-requested.
    pipeline.read_size = read_size
    results: dict[str, bytearray] = {}
    outcomes: dict[str, BaseException | None] = {}
    ops = [
        ReadRangeOp(
            str(tmp_path / name),
            0,
            len(data),
            read_size,
            lambda off, chunk, n=name: results.setdefault(n, bytearray()).extend(chunk),
            lambda error, received, n=name: outcomes.__setitem__(n, error),
        )
        for name, data in files.items()
    ]
    pipeline.run(ops=ops)
    assert outcomes == dict.fromkeys(files)
    assert {name: bytes(results.get(name, b"")) for name in files} == files


@pytest.mark.sshd
def test_reading_past_the_end_is_a_shrunk_error(
    pipeline: SftpPipeline, tmp_path: Path, files
) -> None:
    op, pieces, outcome = _collect(str(tmp_path / "small.txt"), 2, 100, 255 * 1024)
    pipeline.run(ops=[op])
    error, received = outcome[0]
    assert isinstance(error, ShrunkError) and error.actual_end == 6 and error.expected_end == 102
    assert b"".join(chunk for _, chunk in pieces) == b"llo\n" and received == 4


@pytest.mark.sshd
def test_a_missing_file_fails_only_its_own_operation(
    pipeline: SftpPipeline, tmp_path: Path, files
) -> None:
    missing, _, missing_outcome = _collect(str(tmp_path / "nope"), 0, 1, 1024)
    present, pieces, outcome = _collect(str(tmp_path / "small.txt"), 0, 6, 1024)
    pipeline.run(ops=[missing, present])
    assert isinstance(missing_outcome[0][0], FileNotFoundError)
    assert outcome == [(None, 6)] and pieces == [(0, b"hello\n")]
    assert pipeline.alive


@pytest.mark.sshd
def test_an_empty_range_of_a_directory_is_refused(
    pipeline: SftpPipeline, tmp_path: Path, files
) -> None:
    op, _, outcome = _collect(str(tmp_path / "sub"), 0, 0, 1024)
    pipeline.run(ops=[op])
    assert isinstance(outcome[0][0], IsADirectoryError)


@pytest.mark.sshd
def test_listing_reports_links_without_following_them(
    pipeline: SftpPipeline, tmp_path: Path, files
) -> None:
    listed: list = []
    pipeline.run(
        ops=[ListDirOp(str(tmp_path), lambda entries, error: listed.append((entries, error)))]
    )
    entries, error = listed[0]
    assert error is None
    by_name = {entry.name: entry.attrs for entry in entries}
    assert sorted(by_name) == ["big.bin", "empty", "link", "small.txt", "sub"]
    assert by_name["link"].is_symlink and not by_name["link"].is_regular
    assert by_name["sub"].is_dir
    assert by_name["big.bin"].size == len(files["big.bin"])


@pytest.mark.sshd
def test_a_closed_transport_fails_pending_operations_with_connection_error(
    ssh_client: paramiko.SSHClient, tmp_path: Path, files
) -> None:
    pipe = SftpPipeline.open(ssh_client.get_transport(), timeout=10, depth=2, read_size=32 * 1024)
    seen: list[int] = []

    def sink(offset: int, data: bytes) -> None:
        seen.append(offset)
        if len(seen) == 1:
            ssh_client.get_transport().close()

    outcome: list = []
    op = ReadRangeOp(
        str(tmp_path / "big.bin"),
        0,
        len(files["big.bin"]),
        32 * 1024,
        sink,
        lambda error, received: outcome.append(error),
    )
    with pytest.raises(ConnectionError):
        pipe.run(ops=[op])
    assert isinstance(outcome[0], ConnectionError)
    assert not pipe.alive

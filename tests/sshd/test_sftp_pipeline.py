"""The pipelined SFTP v3 client: framing, many requests in flight, errors per request.

Protocol-level behaviour that a real server does not show on demand (answers out of order, a
server that goes silent) is driven by a small in-memory server; everything else runs against
the real OpenSSH sftp-server through the ``sshd`` fixtures.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from harness.sshd import SshServer
from runicorn.transport import sftp_pipeline as sp
from runicorn.transport import sftp_protocol as proto
from runicorn.transport.openssh_shortcuts import OPENSSH_FIRST_HANDLE, PrefetchingSFTPClient
from runicorn.transport.remote import ShrunkError
from runicorn.transport.sftp_ops import ListDirOp, ReadRangeOp
from runicorn.transport.sftp_pipeline import SftpPipeline
from runicorn.transport.sftp_protocol import status_error

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

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        reverse: bool = False,
        silent: bool = False,
        openssh_handles: bool = False,
    ):
        self.files = files
        self.reverse = reverse
        self.silent = silent
        # OpenSSH's sftp-server: a handle is the lowest free slot as four bytes; the default
        # here is another scheme (ASCII counters) that no guess matches.
        self.openssh_handles = openssh_handles
        self.flights = 0  # send calls: one per batch of requests the client sent
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

    def send(self, data: bytes) -> int:
        self.flights += 1
        self._take(data)
        return len(data)

    def _take(self, data: bytes) -> None:
        self._inbox += data
        while len(self._inbox) >= 4:
            (size,) = struct.unpack_from(">I", self._inbox)
            if len(self._inbox) < 4 + size:
                break
            packet = bytes(self._inbox[4 : 4 + size])
            del self._inbox[: 4 + size]
            self._handle(packet[0], packet[1:])

    def _handle(self, ptype: int, body: bytes) -> None:
        if ptype == proto.FXP_INIT:
            self._out += _packet(proto.FXP_VERSION, struct.pack(">I", 3))
            return
        (rid,) = struct.unpack_from(">I", body)
        self.requests.append(ptype)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        head = struct.pack(">I", rid)
        rest = body[4:]
        (length,) = struct.unpack_from(">I", rest)
        name_or_handle = rest[4 : 4 + length]
        if ptype == proto.FXP_OPEN:
            path = name_or_handle.decode()
            if path not in self.files:
                answer = _packet(
                    proto.FXP_STATUS, head + struct.pack(">I", 2) + _str(b"no") + _str(b"")
                )
            else:
                handle = self._new_handle()
                self._handles[handle] = path
                answer = _packet(proto.FXP_HANDLE, head + _str(handle))
        elif ptype in (proto.FXP_READ, proto.FXP_CLOSE) and name_or_handle not in self._handles:
            answer = _packet(
                proto.FXP_STATUS, head + struct.pack(">I", 4) + _str(b"bad") + _str(b"")
            )
        elif ptype == proto.FXP_READ:
            offset, size = struct.unpack_from(">QI", rest, 4 + length)
            data = self.files[self._handles[name_or_handle]][offset : offset + size]
            if data:
                answer = _packet(proto.FXP_DATA, head + _str(data))
            else:
                answer = _packet(
                    proto.FXP_STATUS, head + struct.pack(">I", 1) + _str(b"") + _str(b"")
                )
        else:  # CLOSE and anything else: OK
            if ptype == proto.FXP_CLOSE:
                del self._handles[name_or_handle]
            answer = _packet(proto.FXP_STATUS, head + struct.pack(">I", 0) + _str(b"") + _str(b""))
        self._answers.append(answer)

    def _new_handle(self) -> bytes:
        if self.openssh_handles:
            slot = next(
                i
                for i in range(len(self._handles) + 1)
                if struct.pack(">I", i) not in self._handles
            )
            return struct.pack(">I", slot)
        self._counter = getattr(self, "_counter", 0) + 1
        return str(self._counter).encode()

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


def test_a_close_from_another_thread_is_carried_out_by_the_running_thread() -> None:
    """``close`` while ``run`` waits for answers in another thread: the run stops with a
    connection error and closes the channel itself, so that nothing it sends can follow the
    channel's CLOSE (OpenSSH drops the connection on data for a channel it freed)."""
    waiting = threading.Event()
    closed_by: list[threading.Thread] = []

    class Channel(FakeSftpChannel):
        def recv(self, nbytes: int) -> bytes:
            waiting.set()
            return super().recv(nbytes)

        def close(self) -> None:
            closed_by.append(threading.current_thread())
            super().close()

    channel = Channel({"/a": b"x" * 10}, silent=True)
    pipe = SftpPipeline(channel, timeout=None)  # type: ignore[arg-type]
    waiting.clear()  # the handshake's own wait
    op, _, outcome = _collect("/a", 0, 10, 100)
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            pipe.run(ops=[op])
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=drive)
    thread.start()
    assert waiting.wait(10)
    pipe.close()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(errors[0], ConnectionError) and isinstance(outcome[0][0], ConnectionError)
    assert channel.closed and closed_by and all(t is thread for t in closed_by)
    assert not pipe.alive


def _guessing(path: str, length: int = 100):
    return _collect(
        path,
        0,
        length,
        length,
        exact=False,
        short_read_is_eof=True,
        predicted_handle=OPENSSH_FIRST_HANDLE,
    )


def test_a_right_handle_guess_reads_a_prefix_in_one_round_trip() -> None:
    channel = FakeSftpChannel({"/m": b"manifest bytes"}, openssh_handles=True)
    pipe = SftpPipeline(channel, pipelined_init=True)  # type: ignore[arg-type]
    op, pieces, outcome = _guessing("/m")
    pipe.run(ops=[op])
    assert b"".join(chunk for _, chunk in pieces) == b"manifest bytes"
    assert outcome == [(None, len(b"manifest bytes"))]
    assert channel.requests == [proto.FXP_OPEN, proto.FXP_READ, proto.FXP_CLOSE]
    assert channel.flights == 1  # INIT, OPEN, READ and CLOSE left together
    assert pipe.server_version == 3
    assert channel._handles == {}  # the guessed CLOSE closed the file


def test_a_wrong_handle_guess_is_dropped_and_the_file_read_with_its_real_handle() -> None:
    channel = FakeSftpChannel({"/m": b"manifest bytes"})  # handles are not OpenSSH's
    pipe = SftpPipeline(channel, pipelined_init=True)  # type: ignore[arg-type]
    op, pieces, outcome = _guessing("/m")
    pipe.run(ops=[op])
    assert b"".join(chunk for _, chunk in pieces) == b"manifest bytes"
    assert outcome == [(None, len(b"manifest bytes"))]
    guessed, real = (
        [proto.FXP_OPEN, proto.FXP_READ, proto.FXP_CLOSE],
        [proto.FXP_READ, proto.FXP_CLOSE],
    )
    assert channel.requests == guessed + real
    assert channel._handles == {}


def test_a_handle_guess_for_a_missing_file_reports_it_missing() -> None:
    channel = FakeSftpChannel({}, openssh_handles=True)
    pipe = SftpPipeline(channel, pipelined_init=True)  # type: ignore[arg-type]
    op, pieces, outcome = _guessing("/absent")
    pipe.run(ops=[op])
    assert pieces == []
    assert isinstance(outcome[0][0], FileNotFoundError)
    assert op.done


def test_a_handle_guess_never_reads_the_file_a_later_open_gets_that_handle_for() -> None:
    # The first path is missing, so the second OPEN is given handle 0: the guessed READ and
    # CLOSE went out before that OPEN, so they found no file, and the second file is intact.
    channel = FakeSftpChannel({"/active": b"active manifest"}, openssh_handles=True)
    pipe = SftpPipeline(channel, pipelined_init=True)  # type: ignore[arg-type]
    first, first_pieces, first_outcome = _guessing("/full")
    second, second_pieces, second_outcome = _collect("/active", 0, 100, 100, exact=False)
    pipe.run(ops=[first, second])
    assert first_pieces == [] and isinstance(first_outcome[0][0], FileNotFoundError)
    assert b"".join(chunk for _, chunk in second_pieces) == b"active manifest"
    assert second_outcome == [(None, len(b"active manifest"))]


def test_a_handle_guess_needs_a_prefix_that_fits_one_read() -> None:
    with pytest.raises(ValueError, match="one READ"):
        _collect(
            "/m",
            0,
            200,
            100,
            exact=False,
            short_read_is_eof=True,
            predicted_handle=OPENSSH_FIRST_HANDLE,
        )
    with pytest.raises(ValueError, match="one READ"):
        _collect("/m", 0, 100, 100, predicted_handle=OPENSSH_FIRST_HANDLE)  # exact


def test_status_codes_become_the_matching_python_exceptions() -> None:
    assert isinstance(status_error(proto.FX_NO_SUCH_FILE, "", "p"), FileNotFoundError)
    assert isinstance(status_error(proto.FX_PERMISSION_DENIED, "", "p"), PermissionError)
    assert isinstance(status_error(proto.FX_EOF, "", "p"), EOFError)
    assert isinstance(status_error(proto.FX_CONNECTION_LOST, "", "p"), ConnectionError)
    failure = status_error(proto.FX_FAILURE, "boom", "p")
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
def test_the_server_speaks_version_3_once_the_pipelined_init_is_answered(
    pipeline: SftpPipeline, tmp_path: Path, files: dict[str, bytes]
) -> None:
    # On OpenSSH the INIT leaves with the first requests: the version is known after them.
    op, pieces, _ = _collect(str(tmp_path / "small.txt"), 0, 6, 1000)
    pipeline.run(ops=[op])
    assert pipeline.server_version == 3
    assert b"".join(chunk for _, chunk in pieces) == files["small.txt"]


@pytest.mark.sshd
def test_a_pipeline_opened_with_a_plain_init_knows_the_version_at_once(
    ssh_client: paramiko.SSHClient,
) -> None:
    pipe = SftpPipeline.open(ssh_client.get_transport(), timeout=10, pipelined_init=False)
    try:
        assert pipe.server_version == 3
    finally:
        pipe.close()


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


# -- the session's first round trip (open_sftp_client with a prefetch) -------------------------


@pytest.fixture
def published(tmp_path: Path) -> dict[str, bytes]:
    """A full manifest bigger than one prefix and an active one, as a generator leaves them."""
    contents = {
        ".runicorn/full_manifest.json.gz": os.urandom(sp.MAX_READ_SIZE + 1000),
        ".runicorn/active_manifest.json.gz": os.urandom(3000),
    }
    for name, data in contents.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return contents


@pytest.mark.sshd
def test_the_first_round_trip_reads_the_prefixes_of_every_path(
    ssh_client: paramiko.SSHClient, sshd_server: SshServer, tmp_path: Path, published
) -> None:
    sshd_server.reset_request_counts()
    paths = [*published, ".runicorn/missing.json.gz"]
    client = sp.open_sftp_client(
        ssh_client.get_transport(), root=str(tmp_path), prefetch=paths, timeout=10
    )
    try:
        assert isinstance(client, PrefetchingSFTPClient)
        assert client.root == str(tmp_path)
        for name, data in published.items():
            assert (
                client.prefetched.take(str(tmp_path), name, sp.MAX_READ_SIZE)
                == data[: sp.MAX_READ_SIZE]
            )
        missing = client.prefetched.take(str(tmp_path), paths[-1], sp.MAX_READ_SIZE)
        assert isinstance(missing, FileNotFoundError)
        # Each answer is given once: a later reader asks the server again.
        assert client.prefetched.take(str(tmp_path), paths[0], sp.MAX_READ_SIZE) is None
        # paramiko can use the session as usual afterwards.
        assert client.stat(str(tmp_path / paths[1])).st_size == 3000
    finally:
        client.close()
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    # The guessed READ was right (one READ for the first file), the others read normally.
    assert counts.by_type == {"open": 3, "read": 2, "close": 2, "stat": 1}


@pytest.mark.sshd
def test_the_first_round_trip_resolves_a_relative_root(
    ssh_client: paramiko.SSHClient, tmp_path: Path, published
) -> None:
    relative = os.path.relpath(tmp_path, os.path.expanduser("~"))
    name = ".runicorn/active_manifest.json.gz"
    client = sp.open_sftp_client(
        ssh_client.get_transport(), root=relative, prefetch=[name], timeout=10
    )
    try:
        assert client.root == str(tmp_path)
        assert client.prefetched.take(str(tmp_path), name, sp.MAX_READ_SIZE) == published[name]
    finally:
        client.close()


@pytest.mark.sshd
def test_the_first_round_trip_reports_a_root_that_does_not_exist(
    ssh_client: paramiko.SSHClient, tmp_path: Path
) -> None:
    relative = os.path.relpath(tmp_path / "nowhere" / "deeper", os.path.expanduser("~"))
    with pytest.raises(FileNotFoundError):
        sp.open_sftp_client(ssh_client.get_transport(), root=relative, timeout=10)


@pytest.mark.sshd
def test_without_a_root_the_session_is_a_plain_sftp_client(
    ssh_client: paramiko.SSHClient,
) -> None:
    client = sp.open_sftp_client(ssh_client.get_transport(), timeout=10)
    try:
        assert type(client) is paramiko.SFTPClient
        assert client.normalize(".")
    finally:
        client.close()


# -- handles predicted from OpenSSH's handle table ----------------------------------------------


@pytest.mark.sshd
def test_every_first_read_leaves_with_its_open_on_a_predicted_handle(
    ssh_client: paramiko.SSHClient, sshd_server: SshServer, tmp_path: Path
) -> None:
    # More files than the pipeline keeps open, closes answered and detached: the server
    # reuses freed slots (last freed first); the table follows it, so each file costs one
    # READ (a directory opens too, and its READ fails). Then missing files among them: an
    # OPEN that fails takes no slot, and the guesses sent before that is known are wrong
    # (a READ more each), never the bytes.
    contents = {f"f{index:02}": os.urandom(100 + index * 50) for index in range(40)}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir").mkdir()
    names = list(contents)
    names[20:20] = ["dir"]
    with_missing = names[::-1]
    with_missing[5:5] = ["missing-1"]
    with_missing[30:30] = ["missing-2"]
    pipe = SftpPipeline.open(ssh_client.get_transport(), timeout=10, depth=16)

    def read_all(batch: list[str]) -> tuple[dict[str, bytes], set[str]]:
        results: dict[str, bytearray] = {}
        outcomes: dict[str, BaseException | None] = {}
        ops = iter(
            ReadRangeOp(
                str(tmp_path / name),
                0,
                len(contents.get(name, b"x")),
                255 * 1024,
                lambda off, chunk, n=name: results.setdefault(n, bytearray()).extend(chunk),
                lambda error, received, n=name: outcomes.__setitem__(n, error),
                detach_close=bool(index % 2),
            )
            for index, name in enumerate(batch)
        )
        pipe.run(lambda: next(ops, None), max_open=6)
        failed = {name for name, error in outcomes.items() if error is not None}
        return {name: bytes(data) for name, data in results.items()}, failed

    try:
        sshd_server.reset_request_counts()
        assert read_all(names) == (contents, {"dir"})
        counts = sshd_server.sftp_request_count()
        assert counts.by_type["read"] == len(names)
        assert read_all(with_missing) == (contents, {"dir", "missing-1", "missing-2"})
        assert read_all(names) == (contents, {"dir"})
        assert pipe._handles is not None and not pipe._handles.broken
    finally:
        pipe.close()


@pytest.mark.sshd
def test_a_handle_taken_behind_the_tables_back_stops_the_predictions_not_the_reads(
    ssh_client: paramiko.SSHClient, tmp_path: Path
) -> None:
    # paramiko's own client opens a file on the channel the pipeline borrows (first round
    # trip done): the table cannot know; its guesses go wrong once, then it stops guessing.
    contents = {f"g{index}": os.urandom(500 + index) for index in range(6)}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    client = sp.open_sftp_client(
        ssh_client.get_transport(), root=str(tmp_path), prefetch=["g0"], timeout=10
    )
    try:
        held = client.open(str(tmp_path / "g5"))  # takes slot 0 behind the table's back
        pipe = SftpPipeline.borrow(client, timeout=10)
        for _ in range(2):
            results: dict[str, bytes] = {}

            def keep(chunk: bytes, name: str, results: dict[str, bytes] = results) -> None:
                results[name] = results.get(name, b"") + chunk

            ops = [
                ReadRangeOp(
                    str(tmp_path / name),
                    0,
                    len(data),
                    255 * 1024,
                    lambda off, chunk, n=name: keep(chunk, n),
                    lambda error, received: None,
                )
                for name, data in contents.items()
            ]
            pipe.run(ops=ops)
            assert results == contents
        assert pipe._handles is not None and pipe._handles.broken
        assert held.read() == contents["g5"]
        held.close()
    finally:
        client.close()

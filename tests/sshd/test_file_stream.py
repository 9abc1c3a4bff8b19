"""The compressed file stream over a real sshd: the same caches with it on, off and automatic,
with compression on and off, and with zstd or zlib (zstd only where both ends have it); SFTP
takes over when the server has no python3 or the stream breaks mid-way; a hostile stream (a
zlib or zstd bomb among others) is refused and nothing lands outside the cache."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner, Result

from harness.lab import assert_cache_equals_server
from harness.server_closes import ServerCloses
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport import file_stream, openssh_shortcuts
from runicorn.transport import ssh as ssh_module
from runicorn.transport.fetch import FetchRun
from runicorn.transport.remote import FetchJob, FetchResult
from runicorn.transport.sftp_pipeline import open_sftp_client
from runicorn.transport.sftp_remote import SftpRemote

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("cli_backend")]

NOW = 1_700_000_000.0
MIB = 1024 * 1024


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> LabInfo:
    info = build_sample_lab(tmp_path / "lab", runs=6, seed=23, now=NOW)
    ManifestGenerator(info.root, backend=backend).generate()
    return info


def _sync(server: SshServer, lab: LabInfo, cache: Path, tmp_path: Path, *flags: str) -> dict:
    config = tmp_path / "ssh_config"
    server.write_ssh_config(config, "labserver")
    result: Result = CliRunner().invoke(
        main,
        [
            "sync",
            f"labserver:{lab.root}",
            str(cache),
            "--ssh-config",
            str(config),
            "--json",
            *flags,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    document: dict = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert document["failed_count"] == 0
    return document


@pytest.mark.parametrize("compress", ["--compress", "--no-compress"])
def test_stream_on_off_and_automatic_give_byte_identical_caches(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path, compress: str
) -> None:
    for stream in ("--stream", "--no-stream", ""):
        cache = tmp_path / f"cache{stream}"
        report = _sync(sshd_server, lab, cache, tmp_path, compress, *([stream] if stream else []))
        assert_cache_equals_server(lab.root, cache)
        choice = report["compression"]
        assert choice["enabled"] is (compress == "--compress")
        # The stream takes compression over from SSH: a first sync opens it (automatic)
        # while the manifest downloads; --no-stream leaves compression with SSH.
        expected = "stream" if stream != "--no-stream" and compress == "--compress" else "ssh"
        assert choice["carrier"] == expected
        assert choice["active"] is (compress == "--compress")


# -- SftpRemote with the stream forced on -------------------------------------------------------


@pytest.fixture
def codecs(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The codec each file stream of the test agreed with the server, in order."""
    agreed: list[str | None] = []
    hello = file_stream.FileStream._hello

    def record_codec(self: file_stream.FileStream, payload: bytes) -> None:
        hello(self, payload)
        agreed.append(self.codec)

    monkeypatch.setattr(file_stream.FileStream, "_hello", record_codec)
    return agreed


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, bytes]:
    """Small compressible files, a large random one, and links the stream must refuse."""
    root = tmp_path / "tree"
    contents: dict[str, bytes] = {}
    for run in range(8):
        contents[f"p/runs/r{run}/events.jsonl"] = b'{"step": 1, "loss": 0.5}\n' * (900 + run)
        contents[f"p/runs/r{run}/meta.json"] = b'{"status": "running"}'
    contents["p/runs/r0/media/big.bin"] = os.urandom(3 * MIB + 5)
    for relative, data in contents.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    os.symlink("meta.json", root / "p/runs/r1/linked.json")
    os.symlink("r2", root / "p/runs/r3/linked-dir")
    return contents


def _fetch(remote: SftpRemote, paths: dict[str, int]) -> dict[str, tuple[FetchResult, bytes]]:
    buffers = {path: bytearray() for path in paths}
    results: dict[str, FetchResult] = {}

    def sink_for(path: str):
        def sink(offset: int, data: bytes) -> None:
            assert offset == len(buffers[path]), "sink called out of offset order"
            buffers[path].extend(data)

        return sink

    jobs = [FetchJob(path, 0, length, sink_for(path)) for path, length in paths.items()]
    remote.fetch(jobs, lambda result: results.__setitem__(result.job.path, result), workers=2)
    return {path: (results[path], bytes(buffers[path])) for path in paths}


def _remote(ssh_client: paramiko.SSHClient, root: Path, *, python: str | None = None) -> SftpRemote:
    return SftpRemote(
        ssh_client.open_sftp(), str(root), timeout=20, stream=True, stream_python=python
    )


def test_the_stream_refuses_links_and_paths_outside_the_root(
    ssh_client: paramiko.SSHClient, tree: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / "outside.txt").write_bytes(b"secret")
    with _remote(ssh_client, tmp_path / "tree") as remote:
        got = _fetch(
            remote,
            {
                "p/runs/r1/linked.json": 10,
                "p/runs/r3/linked-dir/meta.json": 10,
                "../outside.txt": 6,
                "p/runs/r4/meta.json": len(tree["p/runs/r4/meta.json"]),
            },
        )
        stream = remote._stream
        assert stream is not None and remote._stream_refused is None
    # Closing the remote ends the command cleanly (its stdin closed, its exit awaited).
    assert stream._channel is not None and stream._channel.exit_status == 0
    assert isinstance(got["p/runs/r1/linked.json"][0].error, OSError)
    assert "symbolic link" in str(got["p/runs/r3/linked-dir/meta.json"][0].error)
    assert isinstance(got["../outside.txt"][0].error, ValueError)
    assert got["p/runs/r4/meta.json"][1] == tree["p/runs/r4/meta.json"]
    for path in ("p/runs/r1/linked.json", "p/runs/r3/linked-dir/meta.json", "../outside.txt"):
        assert got[path][1] == b""


def test_the_server_script_refuses_parent_components_itself(tmp_path: Path) -> None:
    """A client bug that sent ``..`` still reads nothing outside the root."""
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    request = b"../secret"
    stdin = struct.pack("!IQQI", 7, 0, 6, len(request)) + request
    command = file_stream.stream_command(str(tmp_path / "root"), 0, python=sys.executable)
    out = subprocess.run(command, shell=True, input=stdin, capture_output=True, check=True).stdout
    assert b"secret" not in out
    assert b"not a plain relative path" in out


def _assert_falls_back_to_sftp_naming_the_missing_python(
    ssh_client: paramiko.SSHClient,
    tree: dict[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fetch whose stream names an interpreter the server lacks gets every file over SFTP,
    and the fallback's warning names the missing interpreter."""
    caplog.set_level(logging.WARNING, "runicorn.transport.sftp_remote")
    with _remote(ssh_client, tmp_path / "tree", python="no-such-python3") as remote:
        got = _fetch(remote, {path: len(data) for path, data in tree.items()})
        assert remote._stream_refused is not None
    assert {path: data for path, (_, data) in got.items()} == tree
    assert "no-such-python3 was not found on the server" in caplog.text


def test_without_python3_on_the_server_the_fetch_goes_over_sftp(
    ssh_client: paramiko.SSHClient, tree: dict[str, bytes], tmp_path: Path, caplog
) -> None:
    _assert_falls_back_to_sftp_naming_the_missing_python(ssh_client, tree, tmp_path, caplog)


def test_a_stream_command_gone_before_the_first_request_still_says_why(
    ssh_client: paramiko.SSHClient,
    tree: dict[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command that fails at once (no such interpreter) can close its channel before the
    stream's thread sends its first requests (a loaded client): the fallback's warning still
    names the cause, not the closed channel the send ran into."""
    transport = ssh_client.get_transport()
    assert transport is not None
    server_closes = ServerCloses(transport, monkeypatch)
    original_serve = file_stream.FileStream.serve

    def serve(self: file_stream.FileStream, run: FetchRun) -> list[file_stream.Unfinished]:
        channel = self._channel
        assert channel is not None
        assert server_closes.wait(channel)
        return original_serve(self, run)

    monkeypatch.setattr(file_stream.FileStream, "serve", serve)
    _assert_falls_back_to_sftp_naming_the_missing_python(ssh_client, tree, tmp_path, caplog)


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable the stream runs instead of python3 (it gets the same arguments)."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


def test_a_stream_cut_mid_way_resumes_over_sftp(
    ssh_client: paramiko.SSHClient, tree: dict[str, bytes], tmp_path: Path, caplog
) -> None:
    # The real script, with its output cut after 300 kB: inside the large random file.
    relay = _fake_python(
        tmp_path,
        "import os, subprocess, sys\n"
        f"child = subprocess.Popen([{sys.executable!r}] + sys.argv[1:], stdout=subprocess.PIPE,"
        " stderr=subprocess.DEVNULL)\n"
        "left = 300_000\n"
        "while left > 0:\n"
        "    data = child.stdout.read1(min(left, 65536))\n"
        "    if not data:\n"
        "        break\n"
        "    os.write(1, data)\n"
        "    left -= len(data)\n"
        "sys.exit(3)\n",
    )
    caplog.set_level(logging.WARNING, "runicorn.transport.sftp_remote")
    big = "p/runs/r0/media/big.bin"
    jobs = {big: len(tree[big]), **{p: len(d) for p, d in tree.items() if p != big}}
    with _remote(ssh_client, tmp_path / "tree", python=relay) as remote:
        got = _fetch(remote, jobs)
    assert all(result.ok for result, _ in got.values())
    assert {path: data for path, (_, data) in got.items()} == tree
    assert got[big][0].bytes_received == len(tree[big])
    assert "ended mid-way (exit status 3" in caplog.text


def test_a_cancel_sends_nothing_on_the_stream_after_closing_it(
    sshd_server: SshServer,
    ssh_client: paramiko.SSHClient,
    tree: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenSSH drops the whole connection when data arrives for a channel it has freed
    ("data packet referred to nonexistent channel"), and paramiko sends a message after
    releasing the lock under which it checked that the channel is open. A cancelled fetch
    closes the stream from the caller's thread; here the stream's thread is held in that
    gap, with a batch of requests, until that close returned and, if it closed the channel,
    the server answered with its own CLOSE: the interleaving a loaded machine makes now and
    then. The connection must survive it, and the next fetch work."""
    transport = ssh_client.get_transport()
    assert transport is not None
    cancel, close_returned = threading.Event(), threading.Event()
    server_closes = ServerCloses(transport, monkeypatch)
    sends: list[int] = []  # the remote ids of the channels the stream's thread sent on
    held: list[bool] = []
    caller = threading.current_thread()
    original_send = transport._send_user_message  # type: ignore[attr-defined]
    original_close = file_stream.FileStream.close

    def send_user_message(message: paramiko.Message) -> None:
        raw = message.asbytes()
        if threading.current_thread().name.startswith("runicorn-fetch") and raw[0] == 94:
            sends.append(int.from_bytes(raw[1:5], "big"))  # CHANNEL_DATA: a batch's packet
            if len(sends) == 2 and not held:  # past the first: answers are on their way
                held.append(True)
                channels = list(transport._channels.values())  # type: ignore[attr-defined]
                channel = next(c for c in channels if c.remote_chanid == sends[-1])
                cancel.set()
                assert close_returned.wait(20)
                if channel.closed:
                    assert server_closes.wait(channel)
        original_send(message)

    def close(self: file_stream.FileStream) -> None:
        original_close(self)
        if cancel.is_set() and threading.current_thread() is caller:
            close_returned.set()

    monkeypatch.setattr(transport, "_send_user_message", send_user_message)
    monkeypatch.setattr(file_stream.FileStream, "close", close)
    dropped_before = sshd_server.sshd_log().count("nonexistent channel")
    paths = [path for path in sorted(tree) for _ in range(200)]  # more than one batch
    results: list[FetchResult] = []
    with _remote(ssh_client, tmp_path / "tree") as remote:
        jobs = [FetchJob(path, 0, len(tree[path]), lambda offset, data: None) for path in paths]
        remote.fetch(jobs, results.append, workers=1, cancel=cancel)
        monkeypatch.undo()
        assert held, "the stream sent one batch only: the interleaving was not made"
        assert len(results) == len(jobs)
        got = _fetch(remote, {path: len(data) for path, data in tree.items()})
    log = sshd_server.sshd_log()
    assert log.count("nonexistent channel") == dropped_before, log[-400:]
    assert transport.is_active()
    assert {path: data for path, (_, data) in got.items()} == tree


# Runs the stream's program the way the server would, with zstd made unimportable.
_NO_ZSTD = """\
import sys
sys.modules["zstandard"] = None
sys.modules["compression.zstd"] = None
at = sys.argv.index("-c")
program = sys.argv[at + 1]
sys.argv = ["-c", *sys.argv[at + 2 :]]
exec(compile(program, "<stream>", "exec"), {"__name__": "__main__"})
"""


@pytest.mark.parametrize("case", ["zstd", "server without zstd", "client without zstd"])
def test_zstd_and_zlib_streams_give_byte_identical_caches(
    lab: LabInfo,
    sshd_server: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    codecs: list[str | None],
    case: str,
) -> None:
    # This test's interpreter has zstandard (a dependency): it stands for a runicorn
    # environment on the server, named with --stream-python.
    python = sys.executable
    if case == "server without zstd":
        python = _fake_python(tmp_path, _NO_ZSTD)
    elif case == "client without zstd":
        monkeypatch.setitem(sys.modules, "zstandard", None)
        monkeypatch.setitem(sys.modules, "compression.zstd", None)
    cache = tmp_path / "cache"
    _sync(sshd_server, lab, cache, tmp_path, "--compress", "--stream", "--stream-python", python)
    assert_cache_equals_server(lab.root, cache)
    # The client without zstd asks for zlib, and the server (which has zstd) honours it.
    assert codecs == ["zstd" if case == "zstd" else "zlib"]


@pytest.mark.parametrize("shortcuts", ["1", "0"])
def test_the_stream_starts_with_and_without_the_early_exec(
    lab: LabInfo,
    sshd_server: SshServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shortcuts: str,
) -> None:
    """The requests leave right behind the exec request (OpenSSH shortcuts on), or after
    sshd accepted it (paramiko's exec_command): the same cache either way."""
    monkeypatch.setenv(openssh_shortcuts.ENV_VAR, shortcuts)
    execs: list[str] = []
    exec_command = paramiko.Channel.exec_command

    def record_exec(channel: paramiko.Channel, command: str) -> None:
        execs.append(command)
        exec_command(channel, command)

    monkeypatch.setattr(paramiko.Channel, "exec_command", record_exec)
    cache = tmp_path / "cache"
    report = _sync(sshd_server, lab, cache, tmp_path, "--compress", "--stream")
    assert_cache_equals_server(lab.root, cache)
    # Without the shortcuts compression stays with SSH (no clean re-key), the stream runs.
    assert report["compression"]["carrier"] == ("stream" if shortcuts == "1" else "ssh")
    assert len(execs) == (1 if shortcuts == "0" else 0)


@pytest.fixture
def account_runicorn(sshd_server: SshServer) -> Iterator[Path]:
    """Where the server account's own ``runicorn`` goes (``~/.local/bin``, as pip and pipx
    install it); removed again after the test, since the server is shared."""
    local = sshd_server.directory / "home" / ".local"
    command = local / "bin" / "runicorn"
    command.parent.mkdir(parents=True)
    try:
        yield command
    finally:
        shutil.rmtree(local)


@pytest.mark.parametrize(
    "case",
    ["runicorn with zstandard", "runicorn without zstandard", "env line", "named interpreter"],
)
def test_the_default_python3_hands_over_to_the_accounts_runicorn(
    lab: LabInfo,
    sshd_server: SshServer,
    account_runicorn: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    codecs: list[str | None],
    case: str,
) -> None:
    # The server's default python3 without zstd; the account's runicorn is installed in an
    # environment that has zstandard (this test's: a runicorn dependency) or in one that has not.
    no_zstd = _fake_python(tmp_path, _NO_ZSTD)
    monkeypatch.setattr(file_stream, "PYTHON", no_zstd)
    python = sys.executable
    if case == "runicorn without zstandard":
        bare = tmp_path / "bare-env" / "bin" / "python"
        bare.parent.mkdir(parents=True)
        bare.symlink_to(sys.executable)
        python = str(bare)
    shebang = f"#!/usr/bin/env {python}" if case == "env line" else f"#!{python}"
    account_runicorn.write_text(f"{shebang}\nraise SystemExit('not run by the stream')\n")
    account_runicorn.chmod(0o755)
    flags = ["--stream-python", no_zstd] if case == "named interpreter" else []
    cache = tmp_path / "cache"
    _sync(sshd_server, lab, cache, tmp_path, "--compress", "--stream", *flags)
    assert_cache_equals_server(lab.root, cache)
    # Only the account's own runicorn whose interpreter has zstandard beside it, and only
    # when no interpreter was named, is used.
    assert codecs == ["zstd" if case == "runicorn with zstandard" else "zlib"]


def test_without_zstandard_the_package_imports_and_asks_for_zlib(tmp_path: Path) -> None:
    program = (
        "import sys\n"
        "sys.modules['zstandard'] = None\n"
        "sys.modules['compression.zstd'] = None\n"
        "import runicorn, runicorn.cli\n"
        "from runicorn.transport import file_stream\n"
        "assert not file_stream.zstd_available()\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True)


_HOSTILE = """\
import os, struct, sys, zlib
head = os.read(0, 24)
index = struct.unpack("!IQQI", head)[0]
def block(kind, body):
    os.write(1, struct.pack("!BI", kind, len(body)) + body)
def record(kind, index, value, payload=b""):
    return struct.pack("!BIQI", kind, index, value, len(payload)) + payload
mode = %r
codec = {"zstd bomb": b"zstd", "unknown codec": b"lz4"}.get(mode, b"zlib")
block(82, record(72, 0, 2, codec))
if mode == "oversized":
    os.write(1, struct.pack("!BI", 82, 64 * 1024 * 1024))
elif mode == "wrong index":
    block(82, record(68, index + 1, 0, b"x" * 10))
elif mode == "zlib bomb":
    block(90, zlib.compress(record(68, index, 0, b"") + b"\\0" * 200_000_000)[:1000_000])
elif mode == "zstd bomb":
    import zstandard
    packer = zstandard.ZstdCompressor(level=1).compressobj()
    body = packer.compress(record(68, index, 0, b""))
    for _ in range(200):
        body += packer.compress(b"\\0" * 1048576)
    block(90, body + packer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
elif mode == "too long":
    block(82, record(68, index, 0, b"y" * 1000))
sys.stdin.read()
"""


@pytest.mark.parametrize(
    "mode", ["oversized", "wrong index", "zlib bomb", "zstd bomb", "unknown codec", "too long"]
)
def test_a_hostile_stream_is_refused_and_sftp_finishes(
    sftp: paramiko.SFTPClient,
    lab: LabInfo,
    tmp_path: Path,
    backend: Backend,
    caplog,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    # A real sync: the manifest plans the lab's files; the stream lies about the first one.
    fake = _fake_python(tmp_path, _HOSTILE % mode)
    # The stream is asked to compress (zlib or zstd), as over a connection that chose to.
    monkeypatch.setattr(ssh_module, "hand_compression_to_stream", lambda transport: True)
    caplog.set_level(logging.WARNING, "runicorn.transport.sftp_remote")
    cache = tmp_path / "cache"
    remote = SftpRemote(sftp, str(lab.root), timeout=20, stream=True, stream_python=fake)
    client = ManifestSyncClient(sftp, str(lab.root), cache, 0.0, backend=backend, remote=remote)
    try:
        stats = client.sync()
    finally:
        client.close()
        remote.close()
    assert remote._stream_refused is not None
    warning = caplog.text
    expected = {
        "oversized": "at most 1048576 are accepted",
        "wrong index": "while request",
        "zlib bomb": "zlib bomb",
        "zstd bomb": "zstd bomb",
        "unknown codec": "the server chose the codec 'lz4'",
        "too long": "outside what was asked",
    }[mode]
    assert expected in warning and "fetching over SFTP instead" in warning
    # Every planned file arrived (over SFTP), nothing else was written anywhere.
    assert stats["failed_count"] == 0, stats["failed_files"]
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    outside = {p for p in written if p.parts[0] not in ("lab", "cache", "fake-python")}
    assert outside == set()
    assert_cache_equals_server(lab.root, cache)


def test_the_stream_compresses_and_keeps_raw_what_does_not_shrink(
    tmp_path: Path, tree: dict[str, bytes]
) -> None:
    """The server script alone: JSON lines shrink, random bytes go in plain blocks."""
    paths = ["p/runs/r0/events.jsonl", "p/runs/r0/media/big.bin"]
    stdin = b""
    for index, path in enumerate(paths):
        encoded = path.encode()
        stdin += struct.pack("!IQQI", index, 0, len(tree[path]), len(encoded)) + encoded
    command = file_stream.stream_command(str(tmp_path / "tree"), 1, python=sys.executable)
    out = subprocess.run(command, shell=True, input=stdin, capture_output=True, check=True).stdout
    kinds: dict[int, int] = {}
    inflater = zlib.decompressobj()
    plain = b""
    at = 0
    while at < len(out):
        kind, length = struct.unpack_from("!BI", out, at)
        body = out[at + 5 : at + 5 + length]
        plain += inflater.decompress(body) if kind == ord("Z") else body
        kinds[kind] = kinds.get(kind, 0) + length
        at += 5 + length
    assert kinds[ord("R")] >= len(tree["p/runs/r0/media/big.bin"])
    assert kinds[ord("Z")] < len(tree["p/runs/r0/events.jsonl"]) / 5
    assert tree["p/runs/r0/events.jsonl"] in plain


# -- the stream's channel, opened beside the SFTP one ---------------------------------------------


def test_a_first_sync_runs_the_stream_on_the_channel_opened_ahead(
    sshd_server: SshServer, lab: LabInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[paramiko.Channel | None] = []
    take = openssh_shortcuts.ClientTransport.take_session_ahead

    def record(self: openssh_shortcuts.ClientTransport, *args: object) -> paramiko.Channel | None:
        channel = take(self, *args)  # type: ignore[arg-type]
        taken.append(channel)
        return channel

    monkeypatch.setattr(openssh_shortcuts.ClientTransport, "take_session_ahead", record)
    report = _sync(sshd_server, lab, tmp_path / "cache", tmp_path)
    assert len(taken) == 1 and taken[0] is not None
    assert taken[0].in_window_size == file_stream.WINDOW_SIZE
    assert report["files_synced"] > 0
    assert_cache_equals_server(lab.root, tmp_path / "cache")
    # A later sync is no first sync: nothing is opened ahead, and no stream runs.
    taken.clear()
    _sync(sshd_server, lab, tmp_path / "cache", tmp_path)
    assert taken == []


@pytest.mark.parametrize("asked", [2 * MIB, 3 * MIB])
def test_a_session_opened_ahead_is_handed_out_once_with_its_window(
    sshd_server: SshServer, asked: int
) -> None:
    client = sshd_server.runicorn_connect()
    try:
        transport = client.get_transport()
        assert isinstance(transport, openssh_shortcuts.ClientTransport)
        openssh_shortcuts.open_session_ahead(transport, 2 * MIB)
        sftp = open_sftp_client(transport, timeout=10.0)
        ahead = openssh_shortcuts.take_session_ahead(transport, asked, 10.0)
        assert openssh_shortcuts.take_session_ahead(transport, asked, 10.0) is None  # once
        if asked != 2 * MIB:  # opened with another window: closed, not handed out
            assert ahead is None
        else:
            assert ahead is not None
            assert ahead.remote_chanid != sftp.get_channel().remote_chanid
            ahead.exec_command("echo ahead")
            assert ahead.makefile("rb").read() == b"ahead\n"
        assert sftp.listdir(".") is not None  # the SFTP channel beside it is unharmed
        sftp.close()
    finally:
        client.close()

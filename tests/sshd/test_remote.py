"""The Remote interface: SftpRemote (real OpenSSH) and LocalRemote must behave the same.

Every behaviour test takes ``remote``, which runs once per implementation over the same tree.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from harness.server_closes import ServerCloses
from harness.sshd import SshServer
from runicorn.transport import fetch as fetch_module
from runicorn.transport.local_remote import LocalRemote
from runicorn.transport.remote import (
    FetchCancelled,
    FetchJob,
    FetchResult,
    Remote,
    RemoteDirEntry,
    ShrunkError,
)
from runicorn.transport.sftp_pipeline import SftpPipeline
from runicorn.transport.sftp_remote import SftpRemote

MIB = 1024 * 1024


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, bytes]:
    """A tree with many small files, a few large ones, empty ones and symbolic links."""
    root = tmp_path / "lab"
    contents: dict[str, bytes] = {}
    for run in range(6):
        for name, size in [("meta.json", 300), ("events.jsonl", 40_000 + run), ("empty.txt", 0)]:
            contents[f"p/e/runs/r{run}/{name}"] = os.urandom(size)
    contents["p/e/runs/r0/media/big.bin"] = os.urandom(5 * MIB + 3)
    contents["p/e/runs/r1/media/mid.bin"] = os.urandom(700_000)
    for relative, data in contents.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("meta.json", root / "p/e/runs/r0/link-to-file")
    os.symlink("../r1", root / "p/e/runs/r0/link-to-dir")
    return contents


@pytest.fixture
def lab_root(tmp_path: Path, lab: dict[str, bytes]) -> Path:
    return tmp_path / "lab"


@pytest.fixture(
    params=[
        "local",
        "local-threaded",
        pytest.param("sftp", marks=pytest.mark.sshd),
        pytest.param("sftp-stream", marks=pytest.mark.sshd),
    ]
)
def remote(request: pytest.FixtureRequest, lab_root: Path) -> Iterator[Remote]:
    if request.param == "local":
        instance: Remote = LocalRemote(lab_root)
    elif request.param == "local-threaded":
        instance = LocalRemote(lab_root, threaded=True)
    else:
        sftp: paramiko.SFTPClient = request.getfixturevalue("sftp")
        # "sftp-stream": every fetch through the file stream (file_stream.py).
        stream = True if request.param == "sftp-stream" else None
        instance = SftpRemote(sftp, str(lab_root), timeout=20, stream=stream)
    yield instance
    instance.close()


def fetch_all(
    remote: Remote, jobs: list[FetchJob], *, workers: int = 3, **options: object
) -> dict[int, FetchResult]:
    results: dict[int, FetchResult] = {}

    def on_result(result: FetchResult) -> None:
        assert id(result.job) not in results, "on_result called twice for one job"
        results[id(result.job)] = result

    remote.fetch(jobs, on_result, workers=workers, **options)  # type: ignore[arg-type]
    assert len(results) == len(jobs)
    return results


def collecting_job(
    path: str, offset: int, length: int, **options: object
) -> tuple[FetchJob, bytearray]:
    buffer = bytearray()
    expected = [offset]

    def sink(at: int, data: bytes) -> None:
        assert at == expected[0], "sink called out of offset order"
        buffer.extend(data)
        expected[0] = at + len(data)

    return FetchJob(path, offset, length, sink, **options), buffer  # type: ignore[arg-type]


def no_fetch_threads_left() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("runicorn-")]


# -- fetch ---------------------------------------------------------------------------------------


def test_fetch_of_many_files_is_byte_exact(remote: Remote, lab: dict[str, bytes]) -> None:
    pairs = {path: collecting_job(path, 0, len(data)) for path, data in lab.items()}
    results = fetch_all(remote, [job for job, _ in pairs.values()])
    assert all(result.ok for result in results.values())
    assert {path: bytes(buffer) for path, (_, buffer) in pairs.items()} == lab
    assert no_fetch_threads_left()


def test_fetch_reads_exactly_the_requested_range(remote: Remote, lab: dict[str, bytes]) -> None:
    path = "p/e/runs/r0/media/big.bin"
    job, buffer = collecting_job(path, 1_000_001, 2 * MIB + 5)
    (result,) = fetch_all(remote, [job]).values()
    assert result.ok and result.bytes_received == 2 * MIB + 5
    assert bytes(buffer) == lab[path][1_000_001 : 1_000_001 + 2 * MIB + 5]


def test_a_file_shorter_than_the_range_is_a_shrunk_error(remote: Remote, lab) -> None:
    job, _ = collecting_job("p/e/runs/r0/meta.json", 100, 500)
    (result,) = fetch_all(remote, [job]).values()
    assert isinstance(result.error, ShrunkError)
    assert result.error.actual_end == 300 and result.error.expected_end == 600


def test_errors_of_one_job_do_not_fail_the_others(remote: Remote, lab: dict[str, bytes]) -> None:
    missing, _ = collecting_job("p/e/runs/r9/meta.json", 0, 10)
    unsafe, _ = collecting_job("../outside", 0, 10)
    good, buffer = collecting_job(
        "p/e/runs/r2/events.jsonl", 0, len(lab["p/e/runs/r2/events.jsonl"])
    )
    results = fetch_all(remote, [missing, unsafe, good])
    assert isinstance(results[id(missing)].error, FileNotFoundError)
    assert isinstance(results[id(unsafe)].error, ValueError)
    assert results[id(good)].ok and bytes(buffer) == lab["p/e/runs/r2/events.jsonl"]


def test_a_failing_sink_fails_only_its_job(remote: Remote, lab: dict[str, bytes]) -> None:
    def broken(offset: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    bad = FetchJob("p/e/runs/r0/media/big.bin", 0, 5 * MIB + 3, broken)
    good, buffer = collecting_job("p/e/runs/r1/meta.json", 0, 300)
    results = fetch_all(remote, [bad, good], workers=1)
    assert isinstance(results[id(bad)].error, OSError) and results[id(bad)].error.errno == 28
    assert results[id(good)].ok and bytes(buffer) == lab["p/e/runs/r1/meta.json"]


def test_jobs_finish_in_priority_order_on_one_sequential_worker(
    request: pytest.FixtureRequest, remote: Remote, lab: dict[str, bytes]
) -> None:
    if isinstance(remote, SftpRemote):
        remote = SftpRemote(request.getfixturevalue("sftp"), remote.root, depth=1)
    paths = sorted(lab)
    jobs = [
        collecting_job(path, 0, len(lab[path]), priority=1 + i % 3)[0]
        for i, path in enumerate(paths)
    ]
    order: list[FetchJob] = []
    remote.fetch(jobs, lambda result: order.append(result.job), workers=1)
    remote.close()
    expected = sorted(jobs, key=lambda job: job.priority)  # stable: submission order within one
    assert [job.path for job in order] == [job.path for job in expected]


def test_cancel_stops_the_fetch_and_reports_the_rest_cancelled(remote: Remote, lab) -> None:
    cancel = threading.Event()
    path = "p/e/runs/r0/media/big.bin"
    jobs = [FetchJob(path, 0, len(lab[path]), lambda offset, data: cancel.set()) for _ in range(8)]
    results = fetch_all(remote, jobs, workers=2, cancel=cancel)
    assert any(isinstance(r.error, FetchCancelled) for r in results.values())
    assert no_fetch_threads_left()


def test_a_fetch_after_a_cancelled_one_works(remote: Remote, lab: dict[str, bytes]) -> None:
    cancel = threading.Event()
    path = "p/e/runs/r0/media/big.bin"
    fetch_all(remote, [FetchJob(path, 0, 5 * MIB, lambda o, d: cancel.set())], cancel=cancel)
    job, buffer = collecting_job(path, 0, len(lab[path]))
    (result,) = fetch_all(remote, [job]).values()
    assert result.ok and bytes(buffer) == lab[path]


# -- small reads -----------------------------------------------------------------------------------


def test_read_prefix_returns_at_most_length_bytes(remote: Remote, lab: dict[str, bytes]) -> None:
    assert remote.read_prefix("p/e/runs/r0/meta.json", 10) == lab["p/e/runs/r0/meta.json"][:10]
    assert remote.read_prefix("p/e/runs/r0/meta.json", 10_000) == lab["p/e/runs/r0/meta.json"]
    assert remote.read_prefix("p/e/runs/r0/empty.txt", 10) == b""


def test_read_prefix_of_a_missing_file_is_file_not_found(remote: Remote, lab) -> None:
    with pytest.raises(FileNotFoundError):
        remote.read_prefix("p/nope.json", 10)


def test_read_file_reads_a_large_file_whole(remote: Remote, lab: dict[str, bytes]) -> None:
    path = "p/e/runs/r0/media/big.bin"
    assert remote.read_file(path, 10 * MIB) == lab[path]
    assert remote.read_file("p/e/runs/r0/empty.txt", 0) == b""


def test_read_file_refuses_a_file_above_the_cap(remote: Remote, lab) -> None:
    with pytest.raises(ValueError, match="larger than"):
        remote.read_file("p/e/runs/r1/media/mid.bin", 699_999)
    with pytest.raises(ValueError, match="larger than"):
        remote.read_file("p/e/runs/r0/meta.json", 299)


# -- listings -----------------------------------------------------------------------------------


def test_listdir_reports_symlinks_as_links(remote: Remote, lab_root: Path, lab) -> None:
    entries = {entry.name: entry for entry in remote.listdir("p/e/runs/r0")}
    assert sorted(entries) == [
        "empty.txt",
        "events.jsonl",
        "link-to-dir",
        "link-to-file",
        "media",
        "meta.json",
    ]
    assert entries["link-to-dir"].is_symlink and not entries["link-to-dir"].is_dir
    assert entries["link-to-file"].is_symlink
    assert entries["media"].is_dir and not entries["media"].is_symlink
    assert entries["meta.json"].size == 300
    assert entries["meta.json"].mtime == float(
        int((lab_root / "p/e/runs/r0/meta.json").stat().st_mtime)
    )


def test_listdirs_lists_many_directories_and_reports_errors_per_path(remote: Remote, lab) -> None:
    paths = [f"p/e/runs/r{run}" for run in range(6)] + ["", "missing", "p/e/runs/r0/meta.json"]
    listing = remote.listdirs(paths)
    assert set(listing) == set(paths)
    assert [entry.name for entry in listing[""]] == ["p"]  # type: ignore[union-attr]
    assert isinstance(listing["missing"], FileNotFoundError)
    assert isinstance(listing["p/e/runs/r0/meta.json"], OSError)
    assert {e.name for e in listing["p/e/runs/r3"]} == {"empty.txt", "events.jsonl", "meta.json"}  # type: ignore[union-attr]


# -- both implementations agree -------------------------------------------------------------------


def _observe(remote: Remote, lab: dict[str, bytes]) -> dict[str, object]:
    """Everything a sync would see of the tree, in comparable form."""
    listing = remote.listdirs(
        ["", "p", "p/e", "p/e/runs", *(f"p/e/runs/r{i}" for i in range(6)), "x"]
    )
    jobs = {path: collecting_job(path, 3, max(0, len(data) - 3)) for path, data in lab.items()}
    jobs["gone"] = collecting_job("p/e/runs/r0/gone", 0, 1)
    jobs["short"] = collecting_job("p/e/runs/r0/meta.json", 0, 301)
    results = fetch_all(remote, [job for job, _ in jobs.values()])
    return {
        "listing": {k: v if isinstance(v, list) else type(v) for k, v in listing.items()},
        "data": {path: bytes(buffer) for path, (_, buffer) in jobs.items()},
        "errors": {path: type(results[id(job)].error) for path, (job, _) in jobs.items()},
        "received": {path: results[id(job)].bytes_received for path, (job, _) in jobs.items()},
        "prefix": remote.read_prefix("p/e/runs/r0/meta.json", 100),
    }


@pytest.mark.sshd
def test_sftp_and_local_remotes_give_identical_results(
    sftp: paramiko.SFTPClient, lab_root: Path, lab: dict[str, bytes]
) -> None:
    with LocalRemote(lab_root) as local, SftpRemote(sftp, str(lab_root)) as over_ssh:
        assert _observe(over_ssh, lab) == _observe(local, lab)


# -- SFTP specifics -------------------------------------------------------------------------------


@pytest.mark.sshd
def test_read_prefix_costs_exactly_open_read_close(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, lab_root: Path, lab
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    for length in (10, 300, 100_000):  # shorter than, equal to and longer than the file
        sshd_server.reset_request_counts()
        remote.read_prefix("p/e/runs/r0/meta.json", length)
        counts = sshd_server.sftp_request_count()
        assert counts.by_type == {"open": 1, "read": 1, "close": 1}
        assert counts.sessions == 0  # no new channel: the client's own one is used


@pytest.mark.sshd
def test_fetch_reuses_its_channels_across_calls(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, lab_root: Path, lab
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    jobs = lambda: [collecting_job(p, 0, len(d))[0] for p, d in lab.items()]  # noqa: E731
    sshd_server.reset_request_counts()
    fetch_all(remote, jobs(), workers=3)
    fetch_all(remote, jobs(), workers=3)
    assert sshd_server.sftp_request_count().sessions == 3
    remote.close()


@pytest.mark.sshd
def test_a_server_allowing_one_session_still_fetches(
    sshd_factory: Callable[..., SshServer],
    lab_root: Path,
    lab: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = sshd_factory(max_sessions=1)
    client = server.connect()
    try:
        sftp = client.open_sftp()
        with SftpRemote(sftp, str(lab_root)) as remote, caplog.at_level(logging.WARNING):
            pairs = {path: collecting_job(path, 0, len(data)) for path, data in lab.items()}
            results = fetch_all(remote, [job for job, _ in pairs.values()], workers=4)
            listing = remote.listdirs([f"p/e/runs/r{i}" for i in range(6)] * 3)
            assert (
                remote.read_prefix("p/e/runs/r0/meta.json", 5) == lab["p/e/runs/r0/meta.json"][:5]
            )
        assert all(result.ok for result in results.values())
        assert {path: bytes(buffer) for path, (_, buffer) in pairs.items()} == lab
        assert all(isinstance(entries, list) for entries in listing.values())
        assert "refused" in caplog.text
        assert sftp.listdir(str(lab_root)) == ["p"]  # the user's client still works
    finally:
        client.close()


@pytest.mark.sshd
def test_a_dropped_connection_fails_the_remaining_jobs_with_connection_error(
    ssh_client: paramiko.SSHClient, sftp: paramiko.SFTPClient, lab_root: Path, lab
) -> None:
    remote = SftpRemote(sftp, str(lab_root), timeout=20, depth=4)
    transport = ssh_client.get_transport()
    assert transport is not None
    dropped = []

    def sink(offset: int, data: bytes) -> None:
        if not dropped:
            dropped.append(True)
            transport.close()

    path = "p/e/runs/r0/media/big.bin"
    jobs = [FetchJob(path, 0, len(lab[path]), sink) for _ in range(6)]
    results = fetch_all(remote, jobs, workers=2)
    failures = [r.error for r in results.values() if r.error is not None]
    assert failures and all(isinstance(error, ConnectionError) for error in failures)
    assert no_fetch_threads_left()


def test_local_remote_never_follows_a_symlink_as_the_final_component(lab_root: Path, lab) -> None:
    remote = LocalRemote(lab_root)
    job, buffer = collecting_job("p/e/runs/r0/link-to-file", 0, 10)
    (result,) = fetch_all(remote, [job]).values()
    assert isinstance(result.error, OSError) and not buffer
    with pytest.raises(OSError, match="symbolic link"):
        remote.read_prefix("p/e/runs/r0/link-to-file", 10)


def test_remote_entry_is_a_value() -> None:
    assert RemoteDirEntry("a", False, False, 1, 2.0) == RemoteDirEntry("a", False, False, 1, 2.0)


def test_keyboard_interrupt_in_a_callback_stops_the_fetch_and_leaves_no_thread(
    remote: Remote, lab: dict[str, bytes]
) -> None:
    def interrupted(offset: int, data: bytes) -> None:
        raise KeyboardInterrupt

    path = "p/e/runs/r0/media/big.bin"
    jobs = [FetchJob(path, 0, len(lab[path]), interrupted) for _ in range(4)]
    with pytest.raises(KeyboardInterrupt):
        remote.fetch(jobs, lambda result: None, workers=2)
    assert no_fetch_threads_left()
    assert remote.read_prefix("p/e/runs/r0/meta.json", 3) == lab["p/e/runs/r0/meta.json"][:3]


@pytest.mark.sshd
def test_calling_the_remote_from_a_fetch_callback_is_refused(
    sftp: paramiko.SFTPClient, lab_root: Path, lab
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    errors: list[BaseException] = []

    def on_result(result: FetchResult) -> None:
        try:
            remote.listdirs(["p", "p/e"])
        except RuntimeError as error:
            errors.append(error)

    remote.fetch([collecting_job("p/e/runs/r0/meta.json", 0, 300)[0]], on_result, workers=1)
    remote.close()
    assert errors and "callback" in str(errors[0])


@pytest.mark.sshd
def test_read_prefixes_pipelines_the_opens_and_does_not_wait_for_the_closes(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, lab_root: Path, lab
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    sshd_server.reset_request_counts()
    meta, missing = remote.read_prefixes(["p/e/runs/r0/meta.json", "p/nope.json"], 100)
    assert meta == lab["p/e/runs/r0/meta.json"][:100]
    assert isinstance(missing, FileNotFoundError)
    # A second Remote on the same channel meets the first one's CLOSE answer still due.
    again = SftpRemote(sftp, str(lab_root))
    assert again.read_prefix("p/e/runs/r0/meta.json", 5) == lab["p/e/runs/r0/meta.json"][:5]
    assert sftp.listdir(str(lab_root)) == ["p"]  # the user's client still works
    counts = sshd_server.sftp_request_count()
    # Every CLOSE reached the server: two files, and the listing of the user's client.
    assert counts.by_type.get("open") == 3 and counts.by_type.get("close") == 3, counts.by_type
    assert counts.sessions == 0


# --- the event queue between the workers and the caller's thread -------------------------------


def test_queued_data_waits_for_room_by_bytes_not_by_event_count(monkeypatch) -> None:
    monkeypatch.setattr(fetch_module, "_EVENT_QUEUE_BYTES", 1000)
    run = fetch_module.FetchRun([], lambda result: None, None)
    for offset in range(0, 800, 8):
        run.data(0, offset, b"x" * 8)  # a hundred tiny events fit at once
    posted = threading.Event()
    worker = threading.Thread(target=lambda: (run.data(0, 800, b"y" * 300), posted.set()))
    worker.start()
    assert not posted.wait(0.3), "the queue took more bytes than its bound"
    _, _, _, data = run.events.get_nowait()
    run._taken(len(data))  # 8 bytes freed: still no room for 300
    assert not posted.wait(0.2)
    while not run.events.empty():
        run._taken(len(run.events.get_nowait()[3]))
    assert posted.wait(5)
    worker.join(5)
    assert run.events.get_nowait()[3] == b"y" * 300


def test_an_event_larger_than_the_bound_passes_an_empty_queue(monkeypatch) -> None:
    monkeypatch.setattr(fetch_module, "_EVENT_QUEUE_BYTES", 10)
    run = fetch_module.FetchRun([], lambda result: None, None)
    run.data(0, 0, b"z" * 100)
    assert run.events.get_nowait()[3] == b"z" * 100


def test_stopping_releases_a_worker_waiting_for_room(monkeypatch) -> None:
    monkeypatch.setattr(fetch_module, "_EVENT_QUEUE_BYTES", 10)
    run = fetch_module.FetchRun([], lambda result: None, None)
    run.data(0, 0, b"a" * 10)
    worker = threading.Thread(target=run.data, args=(0, 10, b"b" * 10))
    worker.start()
    run.stopping.set()
    worker.join(5)
    assert not worker.is_alive()
    assert run.events.qsize() == 1  # the late event is dropped, as every post after a stop


# -- directories above the fetched files ----------------------------------------------------------


def test_a_file_under_a_linked_directory_is_refused_and_the_rest_fetched(
    remote: Remote, lab: dict[str, bytes]
) -> None:
    linked, buffer = collecting_job("p/e/runs/r0/link-to-dir/meta.json", 0, 300)
    plain, plain_buffer = collecting_job("p/e/runs/r1/meta.json", 0, 300)
    results = fetch_all(remote, [linked, plain], workers=1)
    assert not results[id(linked)].ok
    assert isinstance(results[id(linked)].error, OSError)
    assert not buffer
    assert results[id(plain)].ok
    assert bytes(plain_buffer) == lab["p/e/runs/r1/meta.json"]


def _sftp_types(data: bytes) -> list[int]:
    """The SFTP packet types in one write to the channel."""
    types, at = [], 0
    while at + 5 <= len(data):
        types.append(data[at + 4])
        at += 4 + int.from_bytes(data[at : at + 4], "big")
    return types


@pytest.mark.sshd
def test_a_small_fetch_sends_its_directory_checks_with_the_opens(
    sshd_server: SshServer,
    sftp: paramiko.SFTPClient,
    lab_root: Path,
    lab: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    channel = sftp.get_channel()
    assert channel is not None
    flights: list[list[int]] = []
    send = channel.send
    monkeypatch.setattr(
        channel, "send", lambda data: (flights.append(_sftp_types(data)), send(data))[1]
    )
    paths = ["p/e/runs/r0/meta.json", "p/e/runs/r1/meta.json", "p/e/runs/r2/empty.txt"]
    pairs = [collecting_job(path, 0, len(lab[path])) for path in paths]
    sshd_server.reset_request_counts()
    results = fetch_all(remote, [job for job, _ in pairs], workers=4)
    assert all(result.ok for result in results.values())
    assert [bytes(buffer) for _, buffer in pairs] == [lab[path] for path in paths]
    counts = sshd_server.sftp_request_count()
    # p, p/e, p/e/runs and three run directories: one LSTAT each (the CLOSEs are not waited
    # for; the empty file's FSTAT checks it is a file); no new channel
    by_type = {kind: n for kind, n in counts.by_type.items() if kind != "close"}
    assert by_type == {"lstat": 6, "open": 3, "read": 2, "fstat": 1}
    assert counts.sessions == 0
    lstat, open_ = 7, 3
    assert sorted(flights[0]) == [open_] * 3 + [lstat] * 6
    remote.close()


@pytest.mark.sshd
def test_a_linked_directory_is_refused_before_any_read(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, lab_root: Path, lab: dict[str, bytes]
) -> None:
    remote = SftpRemote(sftp, str(lab_root))
    job, buffer = collecting_job("p/e/runs/r0/link-to-dir/meta.json", 0, 300)
    sshd_server.reset_request_counts()
    results = fetch_all(remote, [job], workers=1)
    error = results[id(job)].error
    assert isinstance(error, OSError)
    assert "symbolic link" in str(error)
    assert not buffer
    counts = sshd_server.sftp_request_count()
    assert "read" not in counts.by_type  # opened with its checks, closed unread
    assert counts.by_type["lstat"] == 5
    remote.close()


@pytest.mark.sshd
def test_a_fetch_over_worker_channels_checks_directories_on_each_channel(
    sshd_server: SshServer, sftp: paramiko.SFTPClient, lab_root: Path, lab: dict[str, bytes]
) -> None:
    # Too many files for the client's own channel (depth 2): worker channels, each sending
    # the LSTATs above the files it takes ahead of their OPENs, with no round trip of their
    # own; the file under a linked directory is refused unread on whichever channel takes it.
    remote = SftpRemote(sftp, str(lab_root), depth=2, stream=False)
    paths = [path for path in lab if path.endswith(("meta.json", "events.jsonl"))]
    pairs = [collecting_job(path, 0, len(lab[path])) for path in paths]
    linked, linked_buffer = collecting_job("p/e/runs/r0/link-to-dir/meta.json", 0, 300)
    sshd_server.reset_request_counts()
    results = fetch_all(remote, [linked, *(job for job, _ in pairs)], workers=3)
    error = results[id(linked)].error
    assert isinstance(error, OSError) and "symbolic link" in str(error)
    assert not linked_buffer
    assert [bytes(buffer) for _, buffer in pairs] == [lab[path] for path in paths]
    remote.close()
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    assert counts.sessions == 3
    # Each directory is asked at least once, at most once per channel.
    assert 5 <= counts.by_type["lstat"] <= 3 * 9


@pytest.mark.sshd
@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_stopping_a_fetch_sends_nothing_on_a_worker_channel_after_closing_it(
    how: str,
    sshd_server: SshServer,
    ssh_client: paramiko.SSHClient,
    sftp: paramiko.SFTPClient,
    lab_root: Path,
    lab: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenSSH drops the whole connection when data arrives for a channel it has freed
    ("data packet referred to nonexistent channel"), and paramiko sends a message after
    releasing the lock under which it checked that the channel is open. A fetch stopped by
    ``cancel`` or by an exception in a callback (Ctrl+C) closes its worker channels from the
    caller's thread; here the worker is held in that gap, with its SFTP CLOSE of the file,
    until that close returned and, if it closed the channel, the server freed it: the
    interleaving a loaded machine makes now and then. The connection must survive it, and
    the next fetch work."""
    transport = ssh_client.get_transport()
    assert transport is not None
    remote = SftpRemote(sftp, str(lab_root), timeout=20, stream=False)
    cancel, stopped = threading.Event(), threading.Event()
    in_send, close_returned = threading.Event(), threading.Event()
    server_closes = ServerCloses(transport, monkeypatch)
    held: list[int] = []  # the remote id of the channel whose send is held
    caller = threading.current_thread()
    original_data = fetch_module.FetchRun.data
    original_send = transport._send_user_message  # type: ignore[attr-defined]
    original_close = SftpPipeline.close

    def stop(offset: int, data: bytes) -> None:
        stopped.set()
        if how == "cancel":
            cancel.set()
        else:
            raise KeyboardInterrupt

    def data(self: fetch_module.FetchRun, index: int, offset: int, chunk: bytes) -> None:
        # No answer past the first before the fetch stops: the other reads are still in
        # flight, so the worker's CLOSE of the file comes after the stop.
        original_data(self, index, offset, chunk)
        assert self.stopping.wait(20)

    def send_user_message(message: paramiko.Message) -> None:
        raw = message.asbytes()
        worker = threading.current_thread().name.startswith("runicorn-fetch")
        if worker and stopped.is_set() and raw[0] == 94 and not held:  # CHANNEL_DATA
            held.append(int.from_bytes(raw[1:5], "big"))
            channels = list(transport._channels.values())  # type: ignore[attr-defined]
            channel = next(c for c in channels if c.remote_chanid == held[0])
            in_send.set()
            assert close_returned.wait(20)
            if channel.closed:
                assert server_closes.wait(channel)
                # The server may send its CLOSE before it read ours; one round trip more and
                # it has read ours and freed the channel before it reads what follows.
                transport.global_request("keepalive@openssh.com", wait=True)
        original_send(message)

    def close(self: SftpPipeline) -> None:
        stopping = stopped.is_set() and threading.current_thread() is caller
        if stopping:
            assert in_send.wait(20)
        original_close(self)
        if stopping:
            close_returned.set()

    monkeypatch.setattr(fetch_module.FetchRun, "data", data)
    monkeypatch.setattr(transport, "_send_user_message", send_user_message)
    monkeypatch.setattr(SftpPipeline, "close", close)
    dropped_before = sshd_server.sshd_log().count("nonexistent channel")
    path = "p/e/runs/r0/media/big.bin"
    first = FetchJob(path, 0, 5 * MIB, stop)
    if how == "cancel":
        fetch_all(remote, [first], workers=1, cancel=cancel)  # one channel: the one held
    else:
        with pytest.raises(KeyboardInterrupt):
            remote.fetch([first], lambda result: None, workers=1)
    monkeypatch.undo()
    assert held, "the worker sent nothing after the stop: the interleaving was not made"
    job, buffer = collecting_job(path, 0, len(lab[path]))
    (result,) = fetch_all(remote, [job], workers=1).values()
    log = sshd_server.sshd_log()
    assert log.count("nonexistent channel") == dropped_before, log[-400:]
    assert transport.is_active()
    assert result.ok and bytes(buffer) == lab[path]
    remote.close()

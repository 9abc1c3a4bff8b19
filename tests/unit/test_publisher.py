"""The long-running publisher (``generate-manifest --watch``): changes in the tree reach the
published manifests, with inotify and with polling, on both backends.

The publisher runs on a thread of the test; every wait is for a condition on the published
files, re-checked after each generation (the publisher's callback), with a deadline.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn.format.models import ManifestType, SyncManifest
from runicorn.generate import changes as changes_module
from runicorn.generate.changes import (
    InotifySource,
    Waker,
    network_filesystem,
    polling_reason,
)
from runicorn.generate.generator import ManifestGenerator
from runicorn.generate.inotify import (
    IN_CREATE,
    IN_ISDIR,
    IN_Q_OVERFLOW,
    encode_event,
    parse_events,
)
from runicorn.generate.watch import ManifestPublisher

DEADLINE_SECONDS = 20.0


def _write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


def _make_run(root: Path, name: str, run_id: str, *, status: str = "running") -> Path:
    run = root / "proj" / name / "runs" / run_id
    _write(run / "meta.json", f'{{"id":"{run_id}"}}')
    _write(run / "status.json", f'{{"status":"{status}"}}')
    _write(run / "events.jsonl", '{"step":0}\n')
    _write(run / "media" / "a.png", "png")
    return run


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    root = tmp_path / "lab"
    _make_run(root, "exp", "run_a")
    _make_run(root, "exp", "run_b", status="finished")
    return root


@pytest.fixture(autouse=True)
def use_backend(backend, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("runicorn.generate.generator.active_backend", lambda: backend)
    return backend


class Running:
    """A publisher on a thread, and waits for conditions on what it published."""

    def __init__(self, root: Path, source: str, **options) -> None:
        self.root = root
        self._generations = 0
        self._changed = threading.Condition()
        self.publisher = ManifestPublisher(
            ManifestGenerator(root),
            source=source,
            **{
                "poll_interval": 0.05,
                "debounce": 0.02,
                "max_delay": 0.2,
                "full_interval": 0,
                **options,
            },
            on_generation=self._generated,
        )
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.publisher.run()
        except BaseException as error:
            self.error = error
            with self._changed:
                self._changed.notify_all()

    def _generated(self, _report, _manifest) -> None:
        with self._changed:
            self._generations += 1
            self._changed.notify_all()

    def start(self) -> Running:
        self._thread.start()
        assert self.publisher.wait_started(DEADLINE_SECONDS), "the publisher did not start"
        return self

    def stop(self) -> None:
        self.publisher.stop()
        self._thread.join(DEADLINE_SECONDS)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error

    def manifest(self, kind: ManifestType) -> SyncManifest:
        return SyncManifest.from_json((self.root / ".runicorn" / kind.filename).read_bytes())

    def _published(self, kind: ManifestType) -> SyncManifest | None:
        try:
            return self.manifest(kind)
        except FileNotFoundError:
            return None  # a new root, not published into yet

    def wait_for(self, kind: ManifestType, condition: Callable[[SyncManifest], bool]) -> None:
        """Until the published ``kind`` manifest satisfies ``condition`` (checked after each
        generation), or fail at the deadline."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        with self._changed:
            while True:
                if self.error is not None:
                    raise self.error
                manifest = self._published(kind)
                if manifest is not None and condition(manifest):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"{kind.value} manifest never satisfied the condition")
                self._changed.wait(remaining)


@pytest.fixture(params=["inotify", "poll"])
def source(request) -> str:
    return request.param


@pytest.fixture
def running(lab: Path, source: str) -> Iterator[Running]:
    publisher = Running(lab, source).start()
    yield publisher
    publisher.stop()


def _sizes(manifest: SyncManifest) -> dict[str, int]:
    return {f.path: f.size for e in manifest.experiments for f in e.files}


def _runs(manifest: SyncManifest) -> set[str]:
    return {e.run_id for e in manifest.experiments}


EVENTS_A = "proj/exp/runs/run_a/events.jsonl"


# --- changes reach the manifests ---------------------------------------------------------------


def test_publishes_both_manifests_at_start(running: Running):
    assert _runs(running.manifest(ManifestType.FULL)) == {"run_a", "run_b"}
    assert "run_a" in _runs(running.manifest(ManifestType.ACTIVE))


def test_an_appended_line_republishes_the_active_manifest_with_the_new_size(running, lab):
    with open(lab / EVENTS_A, "a") as handle:
        handle.write('{"step":1}\n')
    size = (lab / EVENTS_A).stat().st_size
    running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(EVENTS_A) == size)


def test_an_incomplete_last_line_is_not_published(running, lab):
    with open(lab / EVENTS_A, "a") as handle:
        handle.write('{"step":1}\n{"step":')
    complete = (lab / EVENTS_A).stat().st_size - len('{"step":')
    running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(EVENTS_A) == complete)


def test_a_change_after_a_quiet_spell_is_published_without_waiting_for_the_debounce(lab):
    """The leading edge: with a debounce far longer than the test's deadline, a lone line is
    still published, since nothing came before it within the debounce."""
    late = DEADLINE_SECONDS * 100
    running = Running(lab, "inotify", debounce=late, max_delay=late)
    running.start()
    try:
        with open(lab / EVENTS_A, "a") as handle:
            handle.write('{"step":1}\n')
        size = (lab / EVENTS_A).stat().st_size
        running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(EVENTS_A) == size)
    finally:
        running.stop()


def test_each_full_publication_is_followed_by_an_active_one_naming_it(running, lab):
    """A client that applied an older full manifest can take that active manifest in place
    of the new full one: it names the new full snapshot last."""
    _make_run(lab, "other", "run_c")
    running.wait_for(ManifestType.FULL, lambda m: "run_c" in _runs(m))
    snapshot = running.manifest(ManifestType.FULL).snapshot_id
    running.wait_for(
        ManifestType.ACTIVE, lambda m: bool(m.changes_since) and m.changes_since[-1] == snapshot
    )


def test_a_new_run_appears_in_both_manifests(running, lab):
    _make_run(lab, "other", "run_c")
    running.wait_for(ManifestType.ACTIVE, lambda m: "run_c" in _runs(m))
    running.wait_for(ManifestType.FULL, lambda m: "run_c" in _runs(m))


def test_a_run_in_a_new_project_tree_appears(running, lab):
    """Directories created faster than their watches land: their content still counts."""
    run = lab / "newproj" / "deep" / "runs" / "run_d"
    _write(run / "media" / "nested" / "b.png", "png")
    _write(run / "status.json", '{"status":"running"}')
    running.wait_for(
        ManifestType.FULL,
        lambda m: "newproj/deep/runs/run_d/media/nested/b.png" in _sizes(m),
    )


def test_a_deleted_run_disappears_from_the_full_manifest(running, lab):
    shutil.rmtree(lab / "proj/exp/runs/run_b")
    running.wait_for(ManifestType.FULL, lambda m: _runs(m) == {"run_a"})


def test_a_renamed_run_is_published_under_its_new_name(running, lab):
    os.rename(lab / "proj/exp/runs/run_a", lab / "proj/exp/runs/run_z")
    running.wait_for(ManifestType.FULL, lambda m: _runs(m) == {"run_b", "run_z"})
    with open(lab / "proj/exp/runs/run_z/events.jsonl", "a") as handle:
        handle.write('{"step":1}\n')  # the moved directory is watched under its new name
    size = (lab / "proj/exp/runs/run_z/events.jsonl").stat().st_size
    key = "proj/exp/runs/run_z/events.jsonl"
    running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(key) == size)


def test_a_replaced_root_is_watched_again(running, lab, tmp_path):
    os.rename(lab, tmp_path / "old_lab")
    root = lab
    _make_run(root, "fresh", "run_new")
    running.wait_for(ManifestType.FULL, lambda m: _runs(m) == {"run_new"})
    with open(root / "proj/fresh/runs/run_new/events.jsonl", "a") as handle:
        handle.write('{"step":1}\n')
    size = (root / "proj/fresh/runs/run_new/events.jsonl").stat().st_size
    key = "proj/fresh/runs/run_new/events.jsonl"
    running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(key) == size)


def test_the_manifests_equal_a_one_shot_generation(running, lab, tmp_path):
    """Whatever the source, what is published is what a from-scratch generation gives."""
    with open(lab / EVENTS_A, "a") as handle:
        handle.write('{"step":1}\n')
    _make_run(lab, "other", "run_c")
    shutil.rmtree(lab / "proj/exp/runs/run_b")
    running.wait_for(ManifestType.FULL, lambda m: _runs(m) == {"run_a", "run_c"})
    size = (lab / EVENTS_A).stat().st_size
    running.wait_for(ManifestType.FULL, lambda m: _sizes(m).get(EVENTS_A) == size)
    for kind in (ManifestType.FULL, ManifestType.ACTIVE):
        fresh, _ = ManifestGenerator(lab, tmp_path / "fresh", incremental=False).generate(kind)
        running.wait_for(kind, lambda m, fresh=fresh: m.experiments == fresh.experiments)


# --- lost events, rescans, fallbacks ----------------------------------------------------------


def _append_unseen(lab: Path, tmp_path: Path) -> int:
    """Append to run_a's events through a hard link outside the tree: inotify reports a
    write to the directory it was made through, so the watches never hear of this one."""
    outside = tmp_path / "outside.jsonl"
    if not outside.exists():
        os.link(lab / EVENTS_A, outside)
    with open(outside, "a") as handle:
        handle.write('{"step":42}\n')
    return outside.stat().st_size


def test_a_queue_overflow_rescans(lab, tmp_path):
    _append_unseen(lab, tmp_path)  # the link itself, made before the watches
    running = Running(lab, "inotify").start()
    try:
        size = _append_unseen(lab, tmp_path)
        running.publisher.source.inject(encode_event(-1, IN_Q_OVERFLOW))
        running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(EVENTS_A) == size)
    finally:
        running.stop()


def test_a_rescan_request_catches_what_no_event_reported(lab, tmp_path, source):
    _append_unseen(lab, tmp_path)
    running = Running(lab, source).start()
    try:
        size = _append_unseen(lab, tmp_path)
        running.publisher.request_rescan()
        running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(EVENTS_A) == size)
    finally:
        running.stop()


def test_too_few_watches_at_start_means_polling(lab, monkeypatch, caplog):
    monkeypatch.setattr(changes_module, "watches_in_use", lambda: 0)
    monkeypatch.setattr(changes_module, "max_user_watches", lambda: 4)
    caplog.set_level(logging.INFO, logger="runicorn")
    running = Running(lab, "auto").start()
    try:
        assert running.publisher.source_name == "polling"
        assert "the tree needs 8 inotify watches" in caplog.text
        assert "sysctl fs.inotify.max_user_watches=65536" in caplog.text
        _make_run(lab, "other", "run_c")
        running.wait_for(ManifestType.FULL, lambda m: "run_c" in _runs(m))
    finally:
        running.stop()


def test_running_out_of_watches_later_falls_back_to_polling(lab, monkeypatch, caplog):
    """The tree needs 8 watches now; a new run in a new experiment needs 4, 2 are left."""
    monkeypatch.setattr(changes_module, "watches_in_use", lambda: 0)
    monkeypatch.setattr(changes_module, "max_user_watches", lambda: 11)
    caplog.set_level(logging.INFO, logger="runicorn")
    running = Running(lab, "auto").start()
    try:
        assert running.publisher.source_name == "inotify"
        _make_run(lab, "other", "run_c")
        running.wait_for(ManifestType.FULL, lambda m: "run_c" in _runs(m))
        assert running.publisher.source_name == "polling"
        assert "falling back to polling" in caplog.text
    finally:
        running.stop()


def test_inotify_demanded_but_refused_is_an_error(lab, monkeypatch):
    monkeypatch.setattr(changes_module, "watches_in_use", lambda: 0)
    monkeypatch.setattr(changes_module, "max_user_watches", lambda: 4)
    publisher = ManifestPublisher(ManifestGenerator(lab), source="inotify")
    with pytest.raises(changes_module.ChangeSourceFailed, match="needs 8 inotify watches"):
        publisher.run()


def test_the_publishers_own_files_are_not_changes(lab, tmp_path):
    """With --output inside the tree, writing the manifest must not trigger another
    generation (it would loop forever)."""
    waker = Waker()
    output = lab / "proj" / "full.json"
    source = InotifySource(lab, waker, outputs=[output])
    source.start()
    try:
        (lab / "proj" / ".full.json.state").write_text("x")
        (lab / "proj" / "full.json").write_text("x")
        (lab / "proj" / "full.json.gz").write_text("x")
        waker.wake()
        assert not source.wait(0)
        (lab / "proj" / "unrelated.txt").write_text("x")
        assert source.wait(DEADLINE_SECONDS).directories == {"proj"}
    finally:
        source.close()
        waker.close()


# --- the pieces ------------------------------------------------------------------------------


def test_inotify_events_round_trip_through_the_parser():
    raw = encode_event(3, IN_CREATE | IN_ISDIR, 0, "run_1") + encode_event(-1, IN_Q_OVERFLOW)
    events = parse_events(raw)
    assert [(e.wd, e.mask, e.name) for e in events] == [
        (3, IN_CREATE | IN_ISDIR, "run_1"),
        (-1, IN_Q_OVERFLOW, ""),
    ]


def test_a_truncated_event_is_an_error():
    with pytest.raises(ValueError, match="truncated"):
        parse_events(encode_event(3, IN_CREATE, 0, "run_1")[:-2])


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:40 / /data rw,relatime shared:2 - nfs4 server:/export rw\n"
    "41 22 0:41 / /scratch\\040space rw - lustre 10.0.0.1@tcp:/fs rw\n"
    "42 22 8:2 / /home rw - ext4 /dev/sda2 rw\n"
    "43 42 0:43 / /home/u/mnt rw - fuse.sshfs u@h:/ rw\n"
)


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("/data/experiments", "nfs4"),
        ("/data", "nfs4"),
        ("/scratch space/lab", "lustre"),
        ("/home/u/lab", None),
        ("/home/u", "fuse.sshfs"),  # a shared mount below the root must be polled too
        ("/srv", None),
    ],
)
def test_network_file_systems_are_recognised(tmp_path, root, expected):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    assert network_filesystem(Path(root), str(mountinfo)) == expected


def test_a_local_root_may_use_inotify(lab):
    assert polling_reason(lab) is None


# --- the command: generate-manifest --watch in a child process ---------------------------------


class Child:
    """``runicorn generate-manifest --watch`` in a child process, its stderr read line by
    line on a thread so the test can wait for a log line with a deadline."""

    def __init__(self, backend, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
        if backend.name == "python":
            full_env["RUNICORN_PURE_PYTHON"] = "1"
        full_env.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runicorn", "generate-manifest", "--watch", *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, text: str) -> str:
        """The next stderr line containing ``text`` (fails at the deadline or at EOF)."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} on stderr; saw {self.seen}")
            if line is None:
                pytest.fail(f"stderr ended without {text!r}; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def expect_all(self, *texts: str) -> None:
        """Lines containing each of ``texts``, in any order."""
        missing = set(texts)
        while missing:
            line = self.expect("")
            missing = {text for text in missing if text not in line}

    def finish(self, signum: int) -> tuple[int, str]:
        """Send ``signum``; the exit code and stdout once the child has exited."""
        assert self.process.stdout is not None and self.process.stderr is not None
        self.process.send_signal(signum)
        try:
            stdout = self.process.stdout.read()  # until the child exits (it prints little)
            self.process.wait(DEADLINE_SECONDS)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(DEADLINE_SECONDS)  # stderr to its end before it is closed
            self.process.stdout.close()
            self.process.stderr.close()
        return self.process.returncode, stdout


def _published_files_are_valid(lab: Path) -> None:
    out = lab / ".runicorn"
    assert not [p.name for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
    for kind in (ManifestType.ACTIVE, ManifestType.FULL):
        json_doc = SyncManifest.from_json((out / kind.filename).read_bytes())
        gzip_doc = SyncManifest.from_gzip((out / f"{kind.filename}.gz").read_bytes())
        assert json_doc.revision == gzip_doc.revision


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_watch_with_exit_0_and_valid_manifests(backend, lab, signum):
    child = Child(backend, "--root", str(lab))
    child.expect("watching")
    child.expect("published full manifest revision 1")
    with open(lab / EVENTS_A, "a") as handle:
        handle.write('{"step":1}\n')  # the signal may land during this one's publication
    code, _ = child.finish(signum)
    assert code == 0, child.seen
    _published_files_are_valid(lab)


def test_sighup_rescans(backend, lab, tmp_path):
    _append_unseen(lab, tmp_path)
    child = Child(backend, "--root", str(lab))
    child.expect("published full manifest revision 1")
    _append_unseen(lab, tmp_path)
    child.process.send_signal(signal.SIGHUP)
    child.expect("rescan requested")
    child.expect("published active manifest revision 2")
    assert child.finish(signal.SIGTERM)[0] == 0
    active = SyncManifest.from_json((lab / ".runicorn/active_manifest.json").read_bytes())
    assert _sizes(active)[EVENTS_A] == (lab / EVENTS_A).stat().st_size


@pytest.mark.parametrize(("args", "env"), [(["--poll"], {}), ([], {"RUNICORN_WATCH_POLL": "1"})])
def test_polling_is_forced_by_option_or_environment(backend, lab, args, env):
    child = Child(backend, "--root", str(lab), "--poll-interval", "0.05", *args, env=env)
    child.expect("polling was asked for")
    child.expect("published full manifest revision 1")
    _make_run(lab, "other", "run_c")
    child.expect("published active manifest revision 2")
    assert child.finish(signal.SIGTERM)[0] == 0


def test_json_prints_one_summary_per_publication(backend, lab):
    child = Child(backend, "--root", str(lab), "--json", "--full-interval", "0")
    child.expect("published full manifest revision 1")
    _make_run(lab, "other", "run_c")
    child.expect("published full manifest revision 2")
    # followed by an active publication naming it (its changes_since)
    child.expect("published active manifest revision")
    code, stdout = child.finish(signal.SIGTERM)
    assert code == 0
    summaries = [orjson.loads(line) for line in stdout.splitlines()]
    # (how many publications the new run makes depends on when its files land: the first
    # change is published at once)
    for kind in ("active", "full"):
        revisions = [s["revision"] for s in summaries if s["type"] == kind]
        assert revisions == list(range(1, len(revisions) + 1)) and len(revisions) >= 2
    assert summaries[-1]["type"] == "active"
    assert all(s["published"] and s["backend"] == backend.name for s in summaries)


def test_a_root_that_does_not_exist_yet_is_waited_for(backend, tmp_path):
    """A missing root is not fatal for a long-running publisher: it says so and waits."""
    root = tmp_path / "later"
    child = Child(backend, "--root", str(root))
    child.expect("does not exist; waiting for it to appear")
    _make_run(root, "exp", "run_a")
    child.expect("published full manifest revision 1")
    assert child.finish(signal.SIGTERM)[0] == 0


# --- both run layouts, and what is not part of the tree ------------------------------------------


def test_a_run_in_the_runs_path_layout_appears(running, lab):
    run = lab / "runs" / "team" / "vision" / "run_p"
    _write(run / "meta.json", '{"id":"run_p"}')
    _write(run / "status.json", '{"status":"running"}')
    _write(run / "events.jsonl", '{"step":0}\n')
    running.wait_for(
        ManifestType.FULL, lambda m: "runs/team/vision/run_p/events.jsonl" in _sizes(m)
    )
    with open(run / "events.jsonl", "a") as handle:
        handle.write('{"step":1}\n')
    size = (run / "events.jsonl").stat().st_size
    key = "runs/team/vision/run_p/events.jsonl"
    running.wait_for(ManifestType.ACTIVE, lambda m: _sizes(m).get(key) == size)


def test_hidden_directories_are_watched_only_inside_runs(lab):
    _write(lab / "runs" / ".recycle" / "run_old" / "meta.json", "{}")
    _write(lab / "runs" / "team" / "run_p" / "meta.json", "{}")
    _write(lab / "runs" / "team" / "run_p" / ".cache" / "x", "x")
    _write(lab / "proj" / "exp" / "runs" / "run_a" / ".hidden" / "x", "x")
    _write(lab / ".git" / "objects" / "x", "x")
    waker = Waker()
    source = InotifySource(lab, waker)
    source.start()
    try:
        watched = set(source._wds)
        assert {"proj/exp/runs/run_a/.hidden", "runs/team/run_p/.cache"} <= watched
        assert not {"runs/.recycle", ".git", ".runicorn"} & watched
    finally:
        source.close()
        waker.close()


def test_the_sdk_index_at_the_root_is_not_a_change(lab):
    """SDK 0.6+ keeps runicorn.db (and -wal, -shm) at the root and writes it all the time;
    it is never synced, so it must not cost a generation."""
    waker = Waker()
    source = InotifySource(lab, waker)
    source.start()
    try:
        for name in ("runicorn.db", "runicorn.db-wal", "runicorn.db-shm"):
            (lab / name).write_bytes(b"x")
        waker.wake()
        assert not source.wait(0)
        (lab / ".experiments_metadata.json").write_text("{}")  # the tags are part of it
        assert source.wait(DEADLINE_SECONDS).directories == {""}
    finally:
        source.close()
        waker.close()

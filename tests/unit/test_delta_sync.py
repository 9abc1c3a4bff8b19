"""A step applied from the active manifest (``changes_since``) leaves the cache a full sync
would leave.

Generated histories of runs added, appended to, rewritten, retagged and deleted, with every
file's mtime set ten days back (so the activity window selects nothing: only the change
journal can put a run in the active manifest). After each step the server publishes the
manifests in one of the orders a publisher or cron may (full then active, active only,
full only); two caches follow it through a local-directory remote, one in ``auto`` mode
(which may apply the active manifest in place of the full one) and one reading only the
full manifest, both without deleting. Whenever the server's manifests are current (full
then active), the two caches hold the same files with the same bytes and the same runs.
Both backends (``backend``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.lab import cache_files
from runicorn.core.backend import Backend
from runicorn.manifest import ManifestGenerator, ManifestType
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote

OLD = time.time() - 10 * 24 * 3600.0
"""Files' mtimes start here: far outside the activity window."""

_ids = itertools.count(1)
_ticks = itertools.count(1)


def _stamp(path: Path) -> None:
    """An mtime ten days old, a second later at every write: a write moves it, as a real
    one does (the quick check of size and mtime, rsync's too, cannot see a rewrite of the
    same size and mtime)."""
    mtime = OLD + next(_ticks)
    os.utime(path, (mtime, mtime))


def _write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    _stamp(path)


def _append(path: Path, data: str) -> None:
    with open(path, "a") as handle:
        handle.write(data)
    _stamp(path)


class Lab:
    """A small lab the operations act on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: list[Path] = []
        self.tags: dict[str, list[str]] = {}

    def add(self, project: int, status: str = "finished") -> None:
        run_id = f"20240101_000000_{next(_ids):06x}"
        run = self.root / f"proj{project}" / "exp" / "runs" / run_id
        _write(run / "meta.json", f'{{"id":"{run_id}","created_at":{OLD - 100}}}')
        _write(run / "status.json", f'{{"status":"{status}"}}')
        _write(run / "summary.json", '{"loss":1}')
        _write(run / "events.jsonl", '{"step":0}\n')
        _write(run / "logs.txt", "started\n")
        self.runs.append(run)

    def prefixes(self) -> set[str]:
        """The run directories the server has, as cache paths start."""
        return {run.relative_to(self.root).as_posix() + "/" for run in self.runs}

    def pick(self, index: int) -> Path | None:
        return self.runs[index % len(self.runs)] if self.runs else None

    def apply(self, op: str, index: int) -> None:
        run = self.pick(index)
        if op == "add" or run is None:
            self.add(index % 3, "running" if index % 2 else "finished")
        elif op == "append":
            _append(run / "events.jsonl", f'{{"step":{index}}}\n')
            _append(run / "logs.txt", f"line {index}\n")
        elif op == "rewrite":
            _write(run / "summary.json", f'{{"loss":{index},"acc":{index / 7}}}')
        elif op == "media":
            _write(run / "media" / f"step_{index}.png", "png" * (index % 5 + 1))
        elif op == "retag":
            self.tags[run.name] = [f"tag{index % 3}"]
            doc = {run_id: {"tags": tags} for run_id, tags in self.tags.items()}
            _write(self.root / ".experiments_metadata.json", orjson.dumps(doc).decode())
        elif op == "delete":
            shutil.rmtree(run)
            self.runs.remove(run)


def _client(root: Path, cache: Path, backend: Backend, mode: str) -> ManifestSyncClient:
    return ManifestSyncClient(
        None,
        str(root),
        cache,
        0.0,
        remote=LocalRemote(str(root)),
        backend=backend,
        manifest_type=mode,
    )


def _files(cache: Path, prefixes: set[str]) -> dict[str, bytes]:
    return {
        path: data
        for path, data in cache_files(cache).items()
        if "/".join(path.split("/")[:4]) + "/" in prefixes
    }


def _runs(client: ManifestSyncClient, prefixes: set[str]) -> list[tuple[object, ...]]:
    return sorted(
        (run.project, run.name, run.run_id, run.status, run.tags, run.created_at, run.updated_at)
        for run in client.cache.list_runs()
        if f"{run.project}/{run.name}/runs/{run.run_id}/" in prefixes
    )


_OPS = st.tuples(
    st.sampled_from(["add", "append", "rewrite", "media", "retag", "delete"]),
    st.integers(min_value=0, max_value=50),
)
_PUBLISH = st.sampled_from(["full+active", "full+active", "active", "full"])


@given(steps=st.lists(st.tuples(st.lists(_OPS, max_size=4), _PUBLISH), min_size=1, max_size=6))
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_a_step_from_the_active_manifest_equals_a_full_sync(
    backend: Backend, steps: list[tuple[list[tuple[str, int]], str]]
) -> None:
    with tempfile.TemporaryDirectory() as work:
        top = Path(work)
        lab = Lab(top / "lab")
        for index in range(3):
            lab.add(index, "running" if index else "finished")
        generator = ManifestGenerator(lab.root, backend=backend)
        generator.generate(ManifestType.FULL)
        generator.generate(ManifestType.ACTIVE)
        auto = _client(lab.root, top / "auto", backend, "auto")
        full = _client(lab.root, top / "full", backend, "full")
        try:
            auto.sync()
            full.sync()
            for ops, publish in steps:
                for op, index in ops:
                    lab.apply(op, index)
                for kind in publish.split("+"):
                    generator.generate(ManifestType(kind))
                auto.sync()
                full.sync()
                if publish == "full+active":
                    # removed runs stay in both caches as each last saw them: compare the
                    # runs the server has
                    current = lab.prefixes()
                    assert _files(top / "auto", current) == _files(top / "full", current)
                    assert _runs(auto, current) == _runs(full, current)
        finally:
            auto.close()
            full.close()


def test_a_run_copied_in_with_old_mtimes_arrives_through_the_active_manifest(
    backend: Backend, tmp_path: Path
) -> None:
    lab = Lab(tmp_path / "lab")
    lab.add(0)
    generator = ManifestGenerator(lab.root, backend=backend)
    generator.generate(ManifestType.FULL)
    client = _client(lab.root, tmp_path / "cache", backend, "auto")
    try:
        client.sync()
        lab.add(1)  # ten-day-old mtimes: only the journal says it is new
        generator.generate(ManifestType.FULL)
        generator.generate(ManifestType.ACTIVE)
        stats = client.sync()
    finally:
        client.close()
    assert stats["manifest_type"] == "active"
    assert (stats["delta_from"], stats["delta_to"]) == (1, 2)
    served = {
        path.relative_to(lab.root).as_posix(): path.read_bytes()
        for run in lab.runs
        for path in run.rglob("*")
        if path.is_file()
    }
    assert _files(tmp_path / "cache", lab.prefixes()) == served


def test_unchanged_runs_of_an_active_manifest_are_left_out_and_the_cache_equals_a_full_sync(
    backend: Backend, tmp_path: Path
) -> None:
    lab = Lab(tmp_path / "lab")
    for index in range(4):
        lab.add(index % 2, "running")
    lab.add(0)
    generator = ManifestGenerator(lab.root, backend=backend)
    generator.generate(ManifestType.FULL)
    generator.generate(ManifestType.ACTIVE)
    auto = _client(lab.root, tmp_path / "auto", backend, "auto")
    full = _client(lab.root, tmp_path / "full", backend, "full")
    try:
        auto.sync()
        full.sync()
        steps = []
        for op, index in (("append", 1), ("rewrite", 2), ("media", 1), ("add", 7)):
            lab.apply(op, index)
            generator.generate(ManifestType.FULL)
            generator.generate(ManifestType.ACTIVE)
            steps.append(auto.sync())
            full.sync()
            assert _files(tmp_path / "auto", lab.prefixes()) == _files(
                tmp_path / "full", lab.prefixes()
            )
            assert _runs(auto, lab.prefixes()) == _runs(full, lab.prefixes())
    finally:
        auto.close()
        full.close()
    assert all(stats["manifest_type"] == "active" for stats in steps)
    # the full sync recorded the running runs: at least the running runs a step left alone
    # (three, then four with the one added) are left out of its decoding
    unchanged = [stats.get("runs_unchanged", 0) for stats in steps]
    assert all(count >= least for count, least in zip(unchanged, [3, 3, 3, 4], strict=True))
    assert [stats["files_synced"] for stats in steps] == [2, 1, 1, 5]

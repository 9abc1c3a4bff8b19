"""Helpers shared by the sync-client tests: build a lab, publish its manifest, compare trees."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import paramiko

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.format import layout
from runicorn.manifest import ManifestGenerator, ManifestType, SyncManifest
from runicorn.sync.cache import STATE_DIRNAME, LocalCacheManager
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.service import MetadataSyncService
from runicorn.transport.local_remote import LocalRemote

NOW = 1_700_000_000.0
SEED = 11


@dataclass
class Lab:
    """A sample lab on the test server's filesystem, and the clock its manifests use."""

    root: Path
    info: LabInfo
    now: float
    backend: Backend

    def publish(
        self, manifest_type: ManifestType = ManifestType.FULL, *, now: float | None = None
    ) -> SyncManifest:
        """Generate (and publish when changed) a manifest, as the server's timer would."""
        if now is not None:
            self.now = now
        clock_now = self.now
        generator = ManifestGenerator(self.root, backend=self.backend, clock=lambda: clock_now)
        manifest, _path = generator.generate(manifest_type)
        return manifest

    @property
    def manifest_dir(self) -> Path:
        return self.root / layout.MANIFEST_DIRNAME


def make_lab(
    tmp_path: Path,
    backend: Backend,
    *,
    runs: int = 10,
    scale: float = 0.05,
    publish: bool = True,
    run_layout: str = layout.LAYOUT_PROJECT_NAME,
) -> Lab:
    """A seeded sample lab under ``tmp_path/lab`` with its full manifest published."""
    root = tmp_path / "lab"
    info = build_sample_lab(root, runs=runs, seed=SEED, scale=scale, now=NOW, layout=run_layout)
    lab = Lab(root=root, info=info, now=NOW, backend=backend)
    if publish:
        lab.publish()
    return lab


def make_client(
    sftp: paramiko.SFTPClient, lab_root: Path, cache: Path, backend: Backend, **options: object
) -> ManifestSyncClient:
    """A client without jitter (tests must not sleep)."""
    return ManifestSyncClient(sftp, str(lab_root), cache, 0.0, backend=backend, **options)


def local_client(lab: Lab, cache: Path, **options: object) -> ManifestSyncClient:
    """A client of ``lab`` read as a local directory (no server), without jitter."""
    remote = LocalRemote(lab.root)
    return ManifestSyncClient(
        None, str(lab.root), cache, 0.0, backend=lab.backend, remote=remote, **options
    )


def local_service(lab: Lab, cache: Path, **options: object) -> MetadataSyncService:
    """The API document's service over ``lab`` read as a local directory, without jitter."""
    return MetadataSyncService(
        None,
        None,
        str(lab.root),
        LocalCacheManager(cache),
        manifest_sync_jitter=0.0,
        remote=LocalRemote(lab.root),
        backend=lab.backend,
        **options,
    )


def settle(sftp: paramiko.SFTPClient) -> None:
    """Return once the server has handled every request sent on ``sftp`` so far.

    A sync leaves the closes of its last handles in flight; sftp-server answers in order, so
    one round trip is a barrier, and counting started after it sees none of them.
    """
    sftp.normalize(".")


def server_files(root: Path) -> dict[str, bytes]:
    """What a cache of ``root`` must hold: every synced file of every listed run.

    Runs are ``<project>/<name>/runs/<run_id>`` and, below a top-level ``runs``, the first
    directory holding meta.json or status.json (written out here again, independently of the
    scanners). Hidden names above the run level (manifests, tags, the recycle bin), files
    outside runs (the SDK's index), lock files, soft-delete markers and soft-deleted runs are
    not synced.
    """
    found: dict[str, bytes] = {}
    for run_dir in _run_dirs(root):
        names = os.listdir(root / run_dir)
        if layout.DELETED_MARKER in names:
            continue
        for directory, _dirnames, filenames in os.walk(root / run_dir):
            rel_dir = os.path.relpath(directory, root)
            for name in filenames:
                rel = f"{rel_dir}/{name}"
                if layout.is_synced_file(rel[len(run_dir) + 1 :]):
                    found[rel] = (Path(directory) / name).read_bytes()
    return found


def _visible_dirs(path: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(path)
        if entry.is_dir(follow_symlinks=False) and not layout.is_hidden(entry.name)
    )


def _run_dirs(root: Path) -> list[str]:
    found: list[str] = []
    for project in _visible_dirs(root):
        if project == layout.RUNS_DIRNAME:
            continue
        for name in _visible_dirs(root / project):
            runs = root / project / name / layout.RUNS_DIRNAME
            if runs.is_dir() and not runs.is_symlink():
                found += [f"{project}/{name}/runs/{run_id}" for run_id in _visible_dirs(runs)]
    pending = [layout.RUNS_DIRNAME] if (root / layout.RUNS_DIRNAME).is_dir() else []
    while pending:
        rel = pending.pop()
        for child in _visible_dirs(root / rel):
            names = os.listdir(root / rel / child)
            if "meta.json" in names or "status.json" in names:
                found.append(f"{rel}/{child}")
            else:
                pending.append(f"{rel}/{child}")
    return found


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every regular file of the mirrored tree (the cache's own state directory excluded)."""
    found: dict[str, bytes] = {}
    for directory, dirnames, filenames in os.walk(cache):
        if Path(directory) == cache:
            dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
        for name in filenames:
            path = Path(directory) / name
            found[path.relative_to(cache).as_posix()] = path.read_bytes()
    return found


def temp_files(cache: Path) -> list[str]:
    """Temp files visible anywhere in the cache tree."""
    return sorted(p for p in cache_files(cache) if p.rsplit("/", 1)[-1].startswith(TEMP_PREFIX))


def assert_cache_equals_server(lab_root: Path, cache: Path) -> None:
    """Byte for byte, with the server's mtimes (to the microsecond), and no temp file."""
    expected = server_files(lab_root)
    actual = cache_files(cache)
    assert sorted(actual) == sorted(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, "
        f"extra {sorted(set(actual) - set(expected))[:5]}"
    )
    different = [path for path in expected if actual[path] != expected[path]]
    assert not different, f"content differs: {different[:5]}"
    for path in expected:
        server_mtime = (lab_root / path).stat().st_mtime_ns
        cache_mtime = (cache / path).stat().st_mtime_ns
        assert abs(server_mtime - cache_mtime) < 1_000, path

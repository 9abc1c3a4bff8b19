"""Crash safety (issue 5, item 2): the sync client and the manifest generator killed with
SIGKILL at seeded random points, 20 times each. After every kill no cached file is a mix of
two versions and the next run repairs everything; a killed generation always leaves the
previous or the new manifest published, never anything else."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import paramiko
import pytest

from harness.lab import (
    NOW,
    SEED,
    assert_cache_equals_server,
    cache_files,
    make_client,
    make_lab,
    server_files,
    temp_files,
)
from harness.sshd import SshServer
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import training_step
from runicorn.manifest import ManifestGenerator, SyncManifest
from runicorn.sync.cache import LocalCacheManager

RUNS = 20
CHILD_TIMEOUT = 60.0
KILL_MODES = ("progress", "bytes", "rename", "utime")

# The sync client in a child process. It kills itself with SIGKILL at a point drawn from
# its seed once it knows the transfer plan: after N progress callbacks, after N bytes
# handed to the cache, right after the N-th rename into place or the N-th mtime stamp
# (before the state records either). Self-delivery makes the point exact, not a race.
_KILLED_SYNC = r"""
import os, random, signal, sys
from pathlib import Path
import paramiko
from runicorn.core.backend import load_backend
from runicorn.sync.client import ManifestSyncClient

host, port, user, key, known_hosts, lab, cache, backend, seed, mode = sys.argv[1:]
rng = random.Random(int(seed))
seen = 0
kill_at = None

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def count(n=1):
    global seen
    seen += n
    if kill_at is not None and seen > kill_at:
        die()

def hooked(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        count()
        return result
    return call

if mode == "bytes":
    # Transfer has slots: the class's sink is wrapped, not each instance's.
    from runicorn.sync.transfer import Transfer
    real_sink = Transfer.sink
    def counted_sink(self, offset, data):
        real_sink(self, offset, data)
        count(len(data))
    Transfer.sink = counted_sink
elif mode == "rename":
    os.replace = hooked(os.replace)
elif mode == "utime":
    os.utime = hooked(os.utime)

class Client(ManifestSyncClient):
    def _transfer(self, transfers, run, progress, remote_id):
        global kill_at
        if mode == "bytes":
            kill_at = rng.randrange(sum(t.length for t in transfers))
        elif mode == "rename":
            kill_at = rng.randrange(max(1, sum(1 for t in transfers if not t.append)))
        else:
            kill_at = rng.randrange(len(transfers))
        return super()._transfer(transfers, run, progress, remote_id)

def progress(done, total, path):
    if mode == "progress" and done:
        count()

ssh = paramiko.SSHClient()
ssh.load_host_keys(known_hosts)
ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
ssh.connect(host, int(port), username=user, key_filename=key, look_for_keys=False,
            allow_agent=False)
client = Client(ssh.open_sftp(), lab, Path(cache), 0.0, backend=load_backend(backend),
                max_workers=2, delete=True)
client.sync(progress)
print("finished", flush=True)
"""


def _copy_tree(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source`` with the same mtimes (a server restoring it)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, symlinks=True)


@pytest.mark.slow
@pytest.mark.sshd
def test_sync_killed_at_random_points_never_mixes_versions_and_the_next_sync_repairs(
    tmp_path: Path, backend: Backend, sshd_server: SshServer, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=8, scale=0.5)
    versions = {"a": tmp_path / "version_a", "b": tmp_path / "version_b"}
    _copy_tree(lab.root, versions["a"])
    training_step(lab.root, seed=SEED, now=NOW + 60)
    lab.publish(now=NOW + 60)
    _copy_tree(lab.root, versions["b"])
    content = {name: server_files(path) for name, path in versions.items()}
    assert content["a"] != content["b"]
    cache = tmp_path / "cache"
    rng = random.Random(20240505)
    killed = 0

    for number in range(RUNS):
        serving = "ab"[number % 2]
        _copy_tree(versions[serving], lab.root)
        mode = rng.choice(KILL_MODES)
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                _KILLED_SYNC,
                sshd_server.host,
                str(sshd_server.port),
                sshd_server.username,
                str(sshd_server.client_key_path),
                str(sshd_server.known_hosts_path),
                str(lab.root),
                str(cache),
                backend.name,
                str(rng.randrange(2**32)),
                mode,
            ],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
        assert child.returncode in (0, -signal.SIGKILL), child.stderr
        killed += child.returncode == -signal.SIGKILL
        context = f"run {number}, mode {mode}"

        partial = set(temp_files(cache))
        for path, data in cache_files(cache).items():
            if path in partial:
                continue
            assert data in (content["a"].get(path), content["b"].get(path)), (
                f"{context}: {path} is a mix of two versions"
            )

        client = make_client(sftp, lab.root, cache, backend, delete=True)
        try:
            stats = client.sync()
        finally:
            client.close()
        assert stats["failed_count"] == 0, (context, stats["failed_files"])
        assert_cache_equals_server(lab.root, cache)
        assert temp_files(cache) == []
        manager = LocalCacheManager(cache)
        try:
            assert manager.damaged_files() == set(), context
            assert manager.failed_files() == [], context
        finally:
            manager.close()

    assert killed == RUNS


# --------------------------------------------------------------------------- the generator

# The generator in a child process, killed by itself at its N-th step: a tail hash of the
# scan, an fsync, a chmod or a rename of a temp file into place. With N = -1 it runs to the
# end and prints how many steps it took.
_KILLED_GENERATOR = r"""
import dataclasses, os, signal, sys
from pathlib import Path
from runicorn.core.backend import load_backend
from runicorn.manifest import ManifestGenerator

root, backend_name, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
backend = load_backend(backend_name)
steps = 0

def hooked(real):
    def call(*args, **kwargs):
        global steps
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1
        return real(*args, **kwargs)
    return call

for name in ("fsync", "chmod", "replace"):
    setattr(os, name, hooked(getattr(os, name)))
generator = ManifestGenerator(
    Path(root), backend=dataclasses.replace(backend, hash_tails=hooked(backend.hash_tails))
)
generator.generate()
print(steps, flush=True)
"""


def _generate_in_child(root: Path, backend: Backend, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _KILLED_GENERATOR, str(root), backend.name, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def _content(manifest: SyncManifest) -> dict[str, Any]:
    """What a manifest says about the tree (not when or under which revision)."""
    document = manifest.to_dict()
    for key in ("revision", "snapshot_id", "generated_at"):
        document.pop(key)
    return document


def _append_event(root: Path, run_rel: str, number: int) -> None:
    with open(root / run_rel / "events.jsonl", "ab") as handle:
        handle.write(b'{"crash_test_step": %d}\n' % number)


@pytest.mark.slow
def test_generator_killed_at_random_points_always_leaves_the_previous_or_the_new_manifest(
    tmp_path: Path, backend: Backend
) -> None:
    lab = make_lab(tmp_path, backend, runs=20, scale=0.2)
    out = lab.manifest_dir
    json_path, gz_path = out / "full_manifest.json", out / "full_manifest.json.gz"
    runs = [run.rel for run in lab.info.listed_runs]
    _append_event(lab.root, runs[0], -1)
    counted = _generate_in_child(lab.root, backend, -1)
    assert counted.returncode == 0, counted.stderr
    steps = int(counted.stdout)
    assert steps >= 5  # scan, then fsync, chmod and rename for each published file
    rng = random.Random(20240506)

    for number in range(RUNS):
        before = {path: path.read_bytes() for path in (json_path, gz_path)}
        previous = SyncManifest.from_json(before[json_path])
        _append_event(lab.root, rng.choice(runs), number)
        kill_at = rng.randrange(steps)

        child = _generate_in_child(lab.root, backend, kill_at)

        context = f"run {number}, killed at step {kill_at}"
        assert child.returncode == -signal.SIGKILL, (context, child.stderr)
        after = {path: path.read_bytes() for path in (json_path, gz_path)}
        published = {
            json_path: SyncManifest.from_json(after[json_path]),
            gz_path: SyncManifest.from_gzip(after[gz_path]),
        }
        repaired, _ = ManifestGenerator(lab.root, backend=backend).generate()
        for path, manifest in published.items():
            if after[path] == before[path]:
                continue
            assert manifest.revision == previous.revision + 1, context
            assert _content(manifest) == _content(repaired), f"{context}: {path.name} is new"
        assert repaired.revision > max(m.revision for m in published.values()), context
        assert SyncManifest.from_json(json_path.read_bytes()) == repaired
        assert SyncManifest.from_gzip(gz_path.read_bytes()) == repaired
        assert not [p.name for p in out.iterdir() if p.name.startswith(".runicorn-tmp-")]

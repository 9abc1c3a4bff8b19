"""Live writers (issue 5, item 3): a trainer process keeps appending to events.jsonl and
logs.txt (each line in two write calls, so half-lines exist on disk) and rewriting
status.json and summary.json in place (truncate, then write in two calls) while the server's
manifest is generated and the client syncs, over and over. Whatever moment a sync catches,
every cached log is a byte prefix of the server's file ending at a newline, and every cached
JSON file is a complete document -- or the sync said it was not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import paramiko
import pytest

from harness.lab import Lab, assert_cache_equals_server, make_client, make_lab, temp_files
from runicorn.core.backend import Backend
from runicorn.manifest import ManifestGenerator
from runicorn.sync.transfer import JSON_ACCEPT_AFTER_ATTEMPTS, TRUNCATED_JSON

pytestmark = pytest.mark.sshd

ITERATIONS = 25
"""Generate-then-sync rounds while the trainer writes."""
MAX_STEPS = 20_000
"""The trainer stops by itself after this many steps (bounds the test if the parent dies)."""
PAUSE = 0.0005
"""Seconds the trainer spends between the two halves of each write (a slow writer)."""

# One training run, as the SDK writes it but slower: every write is split in two syscalls,
# and the JSON files are truncated before they are written. It prints READY once it has
# written a step, and stops when its stdin has data (or closes).
_TRAINER = r"""
import os, select, sys
run, max_steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def halves(data):
    cut = len(data) // 2
    return data[:cut], data[cut:]

def told_to_stop(timeout):
    return bool(select.select([sys.stdin], [], [], timeout)[0])

def append(name, data):
    fd = os.open(os.path.join(run, name), os.O_WRONLY | os.O_APPEND)
    try:
        first, second = halves(data)
        os.write(fd, first)
        told_to_stop(pause)
        os.write(fd, second)
    finally:
        os.close(fd)

def rewrite(name, data):
    fd = os.open(os.path.join(run, name), os.O_WRONLY | os.O_TRUNC)
    try:
        first, second = halves(data)
        os.write(fd, first)
        told_to_stop(pause)
        os.write(fd, second)
    finally:
        os.close(fd)

for step in range(max_steps):
    pad, loss = b"x" * (step % 97), 1.0 / (step + 1)
    append("events.jsonl", b'{"step": %d, "loss": %f, "pad": "%s"}\n' % (step, loss, pad))
    append("logs.txt", b"step %d: training %s\n" % (step, pad))
    rewrite("status.json",
            b'{"status": "running", "step": %d, "pad": "%s", "end": true}\n' % (step, pad))
    rewrite("summary.json", b'{"best_loss": %f, "steps": %d, "end": true}\n' % (loss, step))
    if step == 0:
        print("READY", flush=True)
    if told_to_stop(pause):
        break
"""

LOGS = ("events.jsonl", "logs.txt")
DOCUMENTS = ("status.json", "summary.json")


def _generate(lab: Lab) -> None:
    ManifestGenerator(lab.root, backend=lab.backend).generate()


def _check_round(
    lab: Lab,
    cache: Path,
    run_rel: str,
    stats: dict[str, Any],
    reported: set[str],
    installed_invalid: dict[str, bytes],
) -> None:
    """One round's guarantees. ``reported`` collects the failure reasons seen;
    ``installed_invalid`` what the client reported installing although it does not parse
    (that exact copy may stay in the cache until the server's file changes)."""
    for name in LOGS:
        cached = (cache / run_rel / name).read_bytes()
        on_server = (lab.root / run_rel / name).read_bytes()  # read after: it only grows
        assert on_server.startswith(cached), f"{name} is not a prefix of the server's file"
        assert cached == b"" or cached.endswith(b"\n"), f"{name} ends in half a line"
        if name == "events.jsonl":
            assert all(orjson.loads(line) for line in cached.splitlines())
    for name in DOCUMENTS:
        rel = f"{run_rel}/{name}"
        if not (cache / rel).exists():  # never fetched whole yet: that must be reported
            assert rel in stats["failed_files"], f"{name} is missing and nothing was reported"
            reported.add(stats["failed_files"][rel])
            continue
        cached = (cache / rel).read_bytes()
        try:
            complete = orjson.loads(cached).get("end") is True
        except orjson.JSONDecodeError:
            complete = False
        if rel in stats.get("invalid_json_files", {}):
            installed_invalid[rel] = cached
        if not complete:
            said = rel in stats["failed_files"] or installed_invalid.get(rel) == cached
            assert said, f"{name} was installed truncated and nothing was reported: {cached!r}"
        if rel in stats["failed_files"]:
            reported.add(stats["failed_files"][rel])


@pytest.mark.slow
def test_syncs_during_live_writes_never_install_half_lines_or_truncated_json(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    run_rel = lab.info.running_runs[0].rel
    cache = tmp_path / "cache"
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(lab.root / run_rel), str(MAX_STEPS), str(PAUSE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    client = make_client(sftp, lab.root, cache, backend)
    reported: set[str] = set()
    installed_invalid: dict[str, bytes] = {}
    try:
        assert trainer.stdout is not None and trainer.stdin is not None
        assert trainer.stdout.readline().strip() == "READY"
        for _round in range(ITERATIONS):
            _generate(lab)
            stats = client.sync()
            _check_round(lab, cache, run_rel, stats, reported, installed_invalid)
            assert temp_files(cache) == []
        trainer.stdin.write("stop\n")
        trainer.stdin.close()
        assert trainer.wait(timeout=30) == 0
    finally:
        with trainer:  # leaving it waits and closes the pipes
            trainer.kill()

    _generate(lab)  # the writer is gone: one more round leaves the cache equal to the server
    final = client.sync()
    client.close()
    assert final["failed_count"] == 0, final["failed_files"]
    assert_cache_equals_server(lab.root, cache)


def test_json_still_truncated_after_the_retry_limit_is_installed_and_reported(
    tmp_path: Path, backend: Backend, sftp: paramiko.SFTPClient
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    rel = f"{lab.info.running_runs[0].rel}/status.json"
    cache = tmp_path / "cache"
    client = make_client(sftp, lab.root, cache, backend)
    client.sync()
    broken = (lab.root / rel).read_bytes()[:10]
    (lab.root / rel).write_bytes(broken)
    lab.publish(now=lab.now + 60)

    rounds = [client.sync() for _ in range(JSON_ACCEPT_AFTER_ATTEMPTS)]
    client.close()

    assert all(stats["failed_files"] == {rel: TRUNCATED_JSON} for stats in rounds[:-1])
    assert rounds[-1]["failed_count"] == 0
    assert list(rounds[-1]["invalid_json_files"]) == [rel]
    assert (cache / rel).read_bytes() == broken

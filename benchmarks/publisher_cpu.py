"""CPU of the long-running publisher (``generate-manifest --watch``), idle and under load.

Starts the publisher on ROOT as a child process, waits for its first publications, then
reads the child's CPU time (user + system, from ``/proc/PID/stat``) over an idle period and
over a loaded one, in which ``--writers`` runs each append ``--rate`` complete lines a
second to their ``events.jsonl``. Prints the share of one core used in each period, the
publications made, the watch count (inotify) and the peak resident memory.

The baseline, measured in the same run on the same tree: a one-shot incremental
``generate-manifest --active`` (what a publication cost when each one scanned the whole
tree), against the publisher's CPU per publication under load.

    python -m runicorn.demo.sample_lab /tmp/lab --runs 10000 --scale 0.01
    python benchmarks/publisher_cpu.py /tmp/lab
    python benchmarks/publisher_cpu.py /tmp/lab --poll --idle 30 --load 30
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (fields 14 and 15 of ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Publisher:
    def __init__(self, root: Path, extra: list[str]) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runicorn",
                "generate-manifest",
                "--root",
                str(root),
                "--watch",
                *extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.published = 0
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if "published" in line:
                self.published += 1
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if re.search(pattern, line):
                return line

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(60)
        self._reader.join(10)  # its last lines, up to EOF
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


def running_runs(root: Path, count: int) -> list[Path]:
    """``count`` runs that are not soft-deleted (their appends are in the manifests)."""
    runs = [
        run
        for run in sorted(root.glob("*/*/runs/*"))
        if (run / "events.jsonl").exists() and not (run / ".deleted").exists()
    ]
    random.Random(1).shuffle(runs)
    return runs[:count]


def write_load(runs: list[Path], rate: float, seconds: float) -> int:
    """Append ``rate`` lines a second to each run's events.jsonl for ``seconds``."""
    handles = [open(run / "events.jsonl", "a") for run in runs]  # noqa: SIM115
    lines = 0
    step = 1_000_000
    try:
        started = time.monotonic()
        tick = 1.0 / rate
        next_tick = started
        while time.monotonic() - started < seconds:
            for handle in handles:
                handle.write(f'{{"step": {step}, "loss": {random.random():.6f}}}\n')
                handle.flush()
                lines += 1
            step += 1
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        for handle in handles:
            handle.close()
    return lines


def one_shot_active_cpu(root: Path) -> float:
    """CPU seconds of an incremental one-shot active generation of ``root`` (the second of
    two into a scratch directory: the first leaves the memos an incremental one reuses)."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "runicorn", "generate-manifest", "--root", str(root)]
        command += ["--active", "--output", os.path.join(scratch, "active_manifest.json")]
        subprocess.run(command, check=True, capture_output=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds measured")
    parser.add_argument("--load", type=float, default=60.0, help="loaded seconds measured")
    parser.add_argument("--writers", type=int, default=100, help="runs appending")
    parser.add_argument("--rate", type=float, default=10.0, help="lines a second per run")
    parser.add_argument("--poll", action="store_true", help="force polling")
    args = parser.parse_args()

    extra = ["--poll"] if args.poll else []
    publisher = Publisher(args.root, extra)
    started = time.monotonic()
    source = publisher.wait_for(r"watching|polling")
    publisher.wait_for(r"up to date")
    ready = time.monotonic() - started
    pid = publisher.process.pid

    before = cpu_seconds(pid)
    published = publisher.published
    time.sleep(args.idle)
    idle_cpu = cpu_seconds(pid) - before
    idle_published = publisher.published - published

    runs = running_runs(args.root, args.writers)
    before = cpu_seconds(pid)
    published = publisher.published
    wall = time.monotonic()
    lines = write_load(runs, args.rate, args.load)
    wall = time.monotonic() - wall
    load_cpu = cpu_seconds(pid) - before
    load_published = publisher.published - published
    rss = peak_rss_mb(pid)
    code = publisher.stop()
    baseline = one_shot_active_cpu(args.root)
    per_publication = load_cpu / load_published if load_published else float("nan")

    print(f"root:             {args.root}")
    print(f"source:           {source.strip()}")
    print(f"ready after:      {ready:.1f} s (first publications, watches in place)")
    print(
        f"idle:             {100 * idle_cpu / args.idle:.2f} % of one core "
        f"({idle_cpu:.2f} s CPU in {args.idle:.0f} s, {idle_published} publications)"
    )
    print(
        f"load:             {100 * load_cpu / wall:.1f} % of one core "
        f"({load_cpu:.2f} s CPU in {wall:.1f} s; {len(runs)} runs x {args.rate:g} lines/s = "
        f"{lines} lines; {load_published} publications)"
    )
    print(f"peak RSS:         {rss:.0f} MB")
    print(
        f"per publication:  {per_publication:.3f} s CPU under load; a one-shot incremental "
        f"active generation: {baseline:.3f} s ({per_publication / baseline:.2f}x)"
    )
    print(f"exit code:        {code}")


if __name__ == "__main__":
    main()

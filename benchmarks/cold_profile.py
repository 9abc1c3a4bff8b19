"""One cold sync of a local-directory lab in this process: its wall time, CPU time and peak
memory, with ``--profile OUT`` a ``cProfile`` of it (read it with ``pstats``), and with
``--phases`` where the memory goes: the resident memory on entering and leaving each stage
(the full manifest's download and decoding, the plan, the transfer, the run digests, the
active manifest read after it) and its peak within each, sampled every 0.1 s (Linux), and
with ``--timeline`` where the wall time goes that is not CPU: the stages with their start
times, the chunks of the local copy (copying on the worker against recording on the sync's
thread, and how long each waited for the other), and every 20 ms each thread's state and,
when it is not running, the kernel function it waits in (``/proc/self/task/*/wchan``):
``D`` in ``rwsem_down_write_slowpath`` is a directory's lock, in ``jbd2_*`` or
``wait_transaction_locked`` the ext4 journal, in ``io_schedule`` the disk; ``S`` in
``futex_wait_queue`` is a Python lock (the GIL, or the other side of the chunk hand-over).

The cache must not exist yet (or be empty): the point is the per-file cost of a cold sync
without the CLI's start-up around it.

    python benchmarks/cold_profile.py LAB /dev/shm/cache
    python benchmarks/cold_profile.py LAB /dev/shm/cache --profile cold.prof
    python benchmarks/cold_profile.py LAB /dev/shm/cache --phases
    python benchmarks/cold_profile.py LAB /work/bench/cache --timeline
    python -c "import pstats; pstats.Stats('cold.prof').sort_stats('cumtime').print_stats(30)"
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import gc
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runicorn.sync import client as client_module
from runicorn.sync import manifest_fetch, transfer
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote


def _resident_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


class Phases:
    """Resident memory per stage of a sync: sampled on a thread, stages marked by wrapping
    the functions that run them."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), _resident_mb())

    def wrap(self, owner: Any, name: str, label: str) -> None:
        real: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(real)
        def marked(*args: Any, **kwargs: Any) -> Any:
            self.calls[label] = self.calls.get(label, 0) + 1
            stage = label if self.calls[label] == 1 else f"{label} {self.calls[label]}"
            self.mark(stage)
            try:
                return real(*args, **kwargs)
            finally:
                self.mark(f"after {stage}")

        setattr(owner, name, marked)

    def mark(self, stage: str) -> None:
        rss = _resident_mb()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
        at = time.perf_counter() - self.started
        cpu = _cpu_seconds()
        print(f"{at:8.2f} s  {cpu:8.2f} s CPU  {rss:5d} MB  {stage}")
        self.marks.append((at, stage))
        self.stage = stage

    def __enter__(self) -> Phases:
        self.wrap(manifest_fetch.ManifestFetcher, "download", "manifest download")
        self.wrap(client_module, "plan", "plan")
        self.wrap(transfer.FileTransfer, "transfer", "transfer")
        self.wrap(transfer._StateBatch, "make_durable", "flush (syncfs)")
        self.wrap(LocalCacheManager, "save_runs", "save runs")
        self.wrap(ManifestSyncClient, "_save_digests", "run digests")
        self.wrap(LocalCacheManager, "set_dirty", "set dirty")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mark("done")
        print("peak within each stage:", ", ".join(f"{k} {v} MB" for k, v in self.peaks.items()))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_TICKS = os.sysconf("SC_CLK_TCK")


def _task_state(tid: int) -> tuple[str, int, str]:
    """A thread's state letter, its CPU ticks so far and what it waits in (or "")."""
    base = f"/proc/self/task/{tid}"
    try:
        with open(f"{base}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        state = fields[0].decode()
        ticks = int(fields[11]) + int(fields[12])
        wchan = ""
        if state != "R":
            with open(f"{base}/wchan") as handle:
                wchan = handle.read().strip()
        return state, ticks, wchan
    except (OSError, IndexError, ValueError):
        return "?", 0, ""


def _role(name: str) -> str:
    if name == "MainThread":
        return "sync"
    if name.startswith("runicorn-copy-"):
        return "copy helper"
    if name.startswith("runicorn-copy"):
        return "copy"
    return "other"


class Timeline(Phases):
    """:class:`Phases` plus where each thread spends the wall time (every 20 ms: running,
    or waiting in which kernel function) and the local copy's chunk hand-over."""

    INTERVAL = 0.02

    def __init__(self, bucket: float) -> None:
        super().__init__()
        self.bucket = bucket
        # per role: (state, wchan) -> samples; per bucket: role -> state -> samples
        self.waits: dict[str, dict[tuple[str, str], int]] = {}
        self.buckets: dict[int, dict[str, dict[str, int]]] = {}
        self.bucket_cpu: dict[int, float] = {}
        self.copies: list[tuple[float, float, int]] = []
        self.records: list[tuple[float, float]] = []
        self.sampler = threading.Thread(target=self._states, name="state-sampler", daemon=True)
        # the cyclic collector's passes: generation -> [passes, seconds]
        self.collections: dict[int, list[float]] = {}
        self._collecting = 0.0

    def _collector(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collecting = time.perf_counter()
            return
        tally = self.collections.setdefault(info["generation"], [0, 0.0])
        tally[0] += 1
        tally[1] += time.perf_counter() - self._collecting

    def _states(self) -> None:
        own = threading.get_native_id()
        while not self._stop.wait(self.INTERVAL):
            at = time.perf_counter() - self.started
            index = int(at // self.bucket)
            names = {thread.native_id: thread.name for thread in threading.enumerate()}
            row = self.buckets.setdefault(index, {})
            for entry in os.listdir("/proc/self/task"):
                tid = int(entry)
                if tid == own or names.get(tid) in ("rss-sampler",):
                    continue
                role = _role(names.get(tid, "?"))
                state, _ticks, wchan = _task_state(tid)
                key = (state, wchan)
                waits = self.waits.setdefault(role, {})
                waits[key] = waits.get(key, 0) + 1
                states = row.setdefault(role, {})
                states[state] = states.get(state, 0) + 1
            self.bucket_cpu[index] = _cpu_seconds()

    def __enter__(self) -> Timeline:
        super().__enter__()
        timeline = self
        real_init = transfer._LocalCopy.__init__
        real_record = transfer._LocalCopy._record

        def init(copier: Any, *args: Any, **kwargs: Any) -> None:
            real_init(copier, *args, **kwargs)
            real_copy = copier.backend.copy_files

            def copy_files(*cargs: Any, **ckwargs: Any) -> Any:
                began = time.perf_counter() - timeline.started
                try:
                    return real_copy(*cargs, **ckwargs)
                finally:
                    ended = time.perf_counter() - timeline.started
                    timeline.copies.append((began, ended, len(cargs[2])))

            copier.backend = dataclasses.replace(copier.backend, copy_files=copy_files)

        def record(copier: Any) -> None:
            if copier.copied is None:
                return
            began = time.perf_counter() - timeline.started
            try:
                real_record(copier)
            finally:
                timeline.records.append((began, time.perf_counter() - timeline.started))

        transfer._LocalCopy.__init__ = init  # type: ignore[method-assign]
        transfer._LocalCopy._record = record  # type: ignore[method-assign]
        gc.callbacks.append(self._collector)
        self.sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self.sampler.join()
        gc.callbacks.remove(self._collector)
        self.report()

    def report(self) -> None:
        print()
        print("where each thread was, share of its samples (state: R running, S sleeping,")
        print("D uninterruptible; the kernel function it waited in):")
        for role, waits in sorted(self.waits.items()):
            total = sum(waits.values())
            top = sorted(waits.items(), key=lambda item: -item[1])[:8]
            shown = ", ".join(
                f"{state}{' ' + wchan if wchan else ''} {count / total:.0%}"
                for (state, wchan), count in top
            )
            print(f"  {role} ({total * self.INTERVAL:.1f} thread-s): {shown}")
        print(
            "the cyclic collector: "
            + ", ".join(
                f"generation {generation} {int(passes)} passes {seconds:.2f} s"
                for generation, (passes, seconds) in sorted(self.collections.items())
            )
        )
        if self.copies:
            copying = sum(end - begin for begin, end, _n in self.copies)
            recording = sum(end - begin for begin, end in self.records)
            gaps = sum(
                max(0.0, later[0] - earlier[1])
                for earlier, later in zip(self.copies, self.copies[1:], strict=False)
            )
            print()
            print(
                f"local copy: {len(self.copies)} chunks, the first from "
                f"{self.copies[0][0]:.2f} s, the last until {self.copies[-1][1]:.2f} s; "
                f"copying {copying:.2f} s, recording {recording:.2f} s on the sync's thread; "
                f"the copy idle between chunks {gaps:.2f} s"
            )
        print()
        print(f"per {self.bucket:g} s: cores busy (the process), stage, threads by state")
        stages = list(self.marks)
        previous_cpu = 0.0
        for index in sorted(self.buckets):
            cpu = self.bucket_cpu.get(index, previous_cpu)
            busy = (cpu - previous_cpu) / self.bucket
            previous_cpu = cpu
            begin = index * self.bucket
            stage = "start"
            for at, name in stages:
                if at <= begin + self.bucket:
                    stage = name
            row = self.buckets[index]
            shown = "; ".join(
                f"{role} " + " ".join(f"{s}{n}" for s, n in sorted(states.items()))
                for role, states in sorted(row.items())
            )
            print(f"  {begin:7.1f} s  {busy:4.2f}  {stage[:24]:24}  {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cold_profile.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("lab", type=Path, help="a lab with a published full manifest")
    parser.add_argument("cache", type=Path, help="a cache directory that does not exist yet")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the sync here")
    parser.add_argument(
        "--phases", action="store_true", help="print the resident memory of each stage"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="--phases, and where each thread spends the wall time (see above)",
    )
    parser.add_argument(
        "--bucket", type=float, default=1.0, help="--timeline: seconds per line of its table"
    )
    args = parser.parse_args(argv)
    if args.cache.exists() and any(args.cache.iterdir()):
        parser.error(f"{args.cache} is not empty: a cold sync needs an empty cache")

    client = ManifestSyncClient(
        None, str(args.lab), args.cache, jitter_max=0, remote=LocalRemote(args.lab)
    )
    profile = cProfile.Profile() if args.profile else None
    phases = Timeline(args.bucket) if args.timeline else Phases() if args.phases else None
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    if phases is not None:
        with phases:
            stats = client.sync()
    else:
        stats = client.sync()
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    wall = time.perf_counter() - started
    client.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"{stats['files_synced']} files in {wall:.2f} s "
        f"({usage.ru_utime + usage.ru_stime:.2f} s CPU, the process), "
        f"peak {usage.ru_maxrss / 1024:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

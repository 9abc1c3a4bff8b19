"""One cold sync of a local-directory lab in this process: its wall time, CPU time and peak
memory, with ``--profile OUT`` a ``cProfile`` of it (read it with ``pstats``), and with
``--phases`` where the memory goes: the resident memory on entering and leaving each stage
(the full manifest's download and decoding, the plan, the transfer, the run digests, the
active manifest read after it) and its peak within each, sampled every 0.1 s (Linux).

The cache must not exist yet (or be empty): the point is the per-file cost of a cold sync
without the CLI's start-up around it.

    python benchmarks/cold_profile.py LAB /dev/shm/cache
    python benchmarks/cold_profile.py LAB /dev/shm/cache --profile cold.prof
    python benchmarks/cold_profile.py LAB /dev/shm/cache --phases
    python -c "import pstats; pstats.Stats('cold.prof').sort_stats('cumtime').print_stats(30)"
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runicorn.sync import client as client_module
from runicorn.sync import manifest_fetch, transfer
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
        print(f"{time.perf_counter() - self.started:8.2f} s  {rss:5d} MB  {stage}")
        self.stage = stage

    def __enter__(self) -> Phases:
        self.wrap(manifest_fetch.ManifestFetcher, "download", "manifest download")
        self.wrap(client_module, "plan", "plan")
        self.wrap(transfer.FileTransfer, "transfer", "transfer")
        self.wrap(ManifestSyncClient, "_save_digests", "run digests")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mark("done")
        print("peak within each stage:", ", ".join(f"{k} {v} MB" for k, v in self.peaks.items()))


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
    args = parser.parse_args(argv)
    if args.cache.exists() and any(args.cache.iterdir()):
        parser.error(f"{args.cache} is not empty: a cold sync needs an empty cache")

    client = ManifestSyncClient(
        None, str(args.lab), args.cache, jitter_max=0, remote=LocalRemote(args.lab)
    )
    profile = cProfile.Profile() if args.profile else None
    phases = Phases() if args.phases else None
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

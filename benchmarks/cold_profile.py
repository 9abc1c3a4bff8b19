"""One cold sync of a local-directory lab in this process: its wall time, CPU time and peak
memory, and with ``--profile OUT`` a ``cProfile`` of it (read it with ``pstats``).

The cache must not exist yet (or be empty): the point is the per-file cost of a cold sync
without the CLI's start-up around it.

    python benchmarks/cold_profile.py LAB /dev/shm/cache
    python benchmarks/cold_profile.py LAB /dev/shm/cache --profile cold.prof
    python -c "import pstats; pstats.Stats('cold.prof').sort_stats('cumtime').print_stats(30)"
"""

from __future__ import annotations

import argparse
import cProfile
import resource
import time
from pathlib import Path

from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cold_profile.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("lab", type=Path, help="a lab with a published full manifest")
    parser.add_argument("cache", type=Path, help="a cache directory that does not exist yet")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the sync here")
    args = parser.parse_args(argv)
    if args.cache.exists() and any(args.cache.iterdir()):
        parser.error(f"{args.cache} is not empty: a cold sync needs an empty cache")

    client = ManifestSyncClient(
        None, str(args.lab), args.cache, jitter_max=0, remote=LocalRemote(args.lab)
    )
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
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

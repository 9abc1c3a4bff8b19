"""How many CPU cores this process may use, for sizing its thread pools."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores the scheduler lets this process run on (a container's or ``taskset``'s
    limit, not the machine's count), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

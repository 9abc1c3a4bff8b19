"""What the generator remembers of an append-only file, so an unchanged one is not re-hashed.

The memo lives in the core layer because the entry builders (both twins) consume it; the
generator's state file (:mod:`runicorn.generate.state`) stores and reloads it.
"""

from __future__ import annotations

from dataclasses import dataclass

StatKey = tuple[int, int, int, int]
"""``(size, mtime_ns, ctime_ns, inode)``"""


@dataclass(slots=True)
class FileMemo:
    """A file's stat key when it was last hashed, with the size and tail hash recorded."""

    key: StatKey
    recorded_size: int
    tail_hash: str

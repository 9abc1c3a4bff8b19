"""The change journal: which runs changed since which published full manifest.

A client that applied full manifest N and sees full manifest M published would have to
download and decode all of M (150 MB of JSON at 100,000 runs) to learn which runs differ,
though a training step changes a hundred. The active manifest can tell it instead, if it
lists every run that changed since N -- not only those the activity window selects by
mtime, which misses runs copied in with their old mtimes, tags edited, files restored.

So every generation, full or active, *observes* the tree it scanned, and the journal (one
file beside the manifests, shared by both kinds under its own lock) numbers the observation
and remembers, per run, a signature and the number of the last observation that saw the
signature move. The signature is the run's file count, the sum of its files' ``ctime``s and
its tags: whatever changes a run's manifest entry -- a write, a file added, removed, renamed
or copied in with old mtimes -- sets some file's ``ctime`` to the present (no user can set
it) or changes the count; it costs no hashing of a 100,000-run lab's records. A run with a
``ctime`` within :data:`REUSE_MARGIN_NS` of the previous observation's scan counts as changed
too (git's "racy clean": a write inside one timestamp tick leaves the stat as it was).
Every full manifest published is recorded with the observation it was built from; an
observation that finds nothing changed takes the previous one's number and writes nothing.

An active generation then lists, besides its window, every run changed after the oldest
recent full manifest, and names those full manifests in its ``changes_since`` header
(format 1.0, optional; see docs/reference/manifest-format.md). A change between any two
observations is numbered after the first, so for each full manifest named, every run that
differs from it now is listed. Removed runs cannot be listed; clients learn of them from
the full manifest.

The journal is a cache like the generator state: lost or unreadable, it starts afresh and
names no full manifest until the next one is published.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from runicorn._sys.atomic import exclusive_lock, temp_prefix_for, write_atomically
from runicorn.core.scan import FileStat, RunScan
from runicorn.format.layout import LOCK_SUFFIX, run_prefix

logger = logging.getLogger(__name__)

JOURNAL_FILENAME = ".manifest_journal.json"
JOURNAL_VERSION = 1

REUSE_MARGIN_NS = 2_000_000_000
"""A run with a file this close to (or newer than) the previous observation's scan start
counts as changed: the generator's reuse margin, for the same reason."""

MAX_NAMED_FULLS = 64
"""At most this many full manifests are named in an active manifest's ``changes_since``."""


@dataclass(frozen=True, slots=True)
class FullRecord:
    """A published full manifest and the observation it was built from."""

    snapshot_id: str
    revision: int
    seq: int
    generated_at: float


@dataclass(frozen=True, slots=True)
class Observation:
    """What one generation's scan told the journal."""

    seq: int
    changed: dict[str, int]
    """Per run prefix, the number of the last observation that saw the run change."""
    fulls: tuple[FullRecord, ...]
    """The full manifests recorded so far, oldest first."""

    def changes_since(self, horizon: float) -> tuple[list[str], set[str]]:
        """The snapshot ids an active manifest generated now names (the full manifests
        generated since ``horizon``, at least the newest, oldest first) and the run prefixes
        it must list for them: those changed after the oldest one named."""
        if not self.fulls:
            return [], set()
        named = [full for full in self.fulls if full.generated_at >= horizon][-MAX_NAMED_FULLS:]
        if not named:
            named = [self.fulls[-1]]
        oldest = named[0].seq
        return (
            [full.snapshot_id for full in named],
            {prefix for prefix, seq in self.changed.items() if seq > oldest},
        )


_CTIME = itemgetter(3)
_SUM_MODULUS = 1 << 63
"""The ``ctime`` sum is kept modulo this: JSON integers stay within 64 bits."""

Signature = tuple[int, int, int]
"""A run's file count, the sum of its files' ``ctime_ns`` (modulo 2**63) and the newest."""


def signature(files: list[FileStat]) -> Signature:
    """The :data:`Signature` of a run's scan records."""
    if not files:
        return (0, 0, 0)
    ctimes = list(map(_CTIME, files))
    return (len(files), sum(ctimes) % _SUM_MODULUS, max(ctimes))


def signatures_of(runs: list[RunScan]) -> Iterator[tuple[str, str, Signature]]:
    """``(prefix, run_id, signature)`` of every scanned run, for :meth:`ChangeJournal.observe`."""
    for project, name, run_id, files in runs:
        yield run_prefix(project, name, run_id), run_id, signature(files)


_LAST_WRITTEN: dict[str, tuple[tuple[str, int, int, int], dict[str, Any]]] = {}
"""Per journal path, the document this process last wrote and the file's identity then: a
long-running publisher does not decode its own 8 MB again (100,000 runs) while the file is
the one it wrote. Another writer's replacement has another inode."""


class ChangeJournal:
    """The journal kept in ``directory`` (where the manifests are published)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILENAME
        self._lock = directory / f".{JOURNAL_FILENAME}{LOCK_SUFFIX}"

    def observe(
        self,
        runs: Iterable[tuple[str, str, Signature]],
        tags: dict[str, list[str]],
        scan_started_ns: int,
    ) -> Observation:
        """Number this scan and mark the runs it finds changed since the previous one.

        ``runs``: every run of the tree as ``(prefix, run_id, signature)``
        (:func:`signature`), the runs left out of the manifest included."""
        with exclusive_lock(self._lock):
            doc = self._load()
            seq = doc["seq"] + 1
            known: dict[str, list[Any]] = doc["runs"]
            settled_before = min(doc["scan_started_ns"] or scan_started_ns, scan_started_ns)
            settled_before -= REUSE_MARGIN_NS
            current: dict[str, list[Any]] = {}
            moved = False
            for prefix, run_id, (count, ctimes, newest) in runs:
                run_tags = tags.get(run_id)
                before = known.get(prefix)
                # [count, ctime sum, newest ctime, tags, number of the observation]
                if (
                    before is None
                    or before[0] != count
                    or before[1] != ctimes
                    or before[3] != run_tags
                    or newest >= settled_before
                ):
                    current[prefix] = [count, ctimes, newest, run_tags, seq]
                    moved = True
                else:
                    current[prefix] = before
            moved = moved or len(current) != len(known)
            if not moved:  # the tree as the previous observation saw it
                seq -= 1
            else:
                doc.update(seq=seq, scan_started_ns=scan_started_ns, runs=current)
                self._save(doc)
            return Observation(
                seq=seq,
                changed={prefix: entry[4] for prefix, entry in current.items()},
                fulls=tuple(FullRecord(*full) for full in doc["fulls"]),
            )

    def record_full(self, full: FullRecord, horizon: float) -> None:
        """Remember that ``full`` is the published full manifest; records older than
        ``horizon`` (but the newest two) are pruned.

        A full manifest someone else publishes in between is never recorded: a client
        that applied it finds its snapshot in no ``changes_since`` and reads the full
        manifest, while the records kept stay true (the observations saw every change)."""
        with exclusive_lock(self._lock):
            doc = self._load()
            fulls = [FullRecord(*entry) for entry in doc["fulls"]]
            if fulls and fulls[-1].snapshot_id == full.snapshot_id:
                return
            fulls.append(full)
            recent = [entry for entry in fulls if entry.generated_at >= horizon]
            fulls = (recent if len(recent) >= 2 else fulls[-2:])[-MAX_NAMED_FULLS:]
            doc["fulls"] = [
                [entry.snapshot_id, entry.revision, entry.seq, entry.generated_at]
                for entry in fulls
            ]
            self._save(doc)

    def _load(self) -> dict[str, Any]:
        empty: dict[str, Any] = {
            "journal_version": JOURNAL_VERSION,
            "seq": 0,
            "scan_started_ns": 0,
            "runs": {},
            "fulls": [],
        }
        try:
            stat = self.path.stat()
            identity = (str(self.path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = _LAST_WRITTEN.get(str(self.path))
            if cached is not None and cached[0] == identity:
                return dict(cached[1])  # what this process wrote last, still in place
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return empty
        except (OSError, orjson.JSONDecodeError) as error:
            logger.warning("change journal %s unusable (%s); starting afresh", self.path, error)
            return empty
        try:
            if doc["journal_version"] != JOURNAL_VERSION:
                raise ValueError(f"unknown version {doc['journal_version']!r}")
            checked = {
                "journal_version": JOURNAL_VERSION,
                "seq": int(doc["seq"]),
                "scan_started_ns": int(doc["scan_started_ns"]),
                "runs": dict(doc["runs"]),
                "fulls": [[str(s), int(r), int(q), float(g)] for s, r, q, g in list(doc["fulls"])],
            }
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("change journal %s is corrupt (%s); starting afresh", self.path, error)
            return empty
        return checked

    def _save(self, doc: dict[str, Any]) -> None:
        self._remove_leftovers()
        _LAST_WRITTEN.pop(str(self.path), None)
        write_atomically(self.path, orjson.dumps(doc), durable=False)
        stat = self.path.stat()
        identity = (str(self.path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        _LAST_WRITTEN[str(self.path)] = (identity, doc)

    def _remove_leftovers(self) -> None:
        """Temp files of a journal write that was killed (we hold the lock: none is live)."""
        prefix = temp_prefix_for(self.path)
        with contextlib.suppress(OSError), os.scandir(self.path.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

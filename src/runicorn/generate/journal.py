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
from collections.abc import Callable, Iterable, Iterator
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
    """Per run prefix, the number of the last observation that saw the run change, for
    the runs changed after the oldest full manifest recorded (the others are listed for
    no full manifest)."""
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


RunSignature = tuple[str, str, Signature]
"""``(prefix, run_id, signature)`` of one run."""
RunsSource = Iterable[RunSignature] | Callable[[], Iterable[RunSignature]]
"""Every run of the tree as ``(prefix, run_id, signature)``, or a callable returning them (so
that an observation which needs only the reported runs never builds the whole list)."""


@dataclass(slots=True)
class _Memory:
    """What this process knows of one journal file: its document as last loaded or written
    (newer than the file after observations that were not written, see
    :meth:`ChangeJournal.observe`), and what is derived from it to keep an observation
    proportional to what changed."""

    identity: tuple[int, int, int] | None
    """The file's (inode, mtime, size) when the document last matched it; another writer's
    replacement has another identity, and the file is then read again."""
    doc: dict[str, Any]
    recent: dict[str, int]
    """Per run prefix, the number of the observation that saw it change, for the runs
    changed after the oldest full manifest recorded (the only ones ``changes_since`` can
    list)."""
    racy: set[str]
    """Runs whose newest ``ctime`` was within the margin of the last observation's scan:
    they count as changed again while they stay so."""
    tags: dict[str, list[str]] | None
    """The tags the last observation saw (``None``: not known, compare every run)."""
    complete: bool
    """Whether the runs of the document are exactly the runs of the tree as the last
    observation reported it (the base an observation of reported runs builds on)."""


_MEMORY: dict[str, _Memory] = {}
"""Per journal path: a long-running publisher does not decode its own 8 MB again (100,000
runs) while the file is the one it wrote, nor compare every run at every observation."""


class ChangeJournal:
    """The journal kept in ``directory`` (where the manifests are published)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILENAME
        self._lock = directory / f".{JOURNAL_FILENAME}{LOCK_SUFFIX}"

    def observe(
        self,
        runs: RunsSource,
        tags: dict[str, list[str]],
        scan_started_ns: int,
        *,
        reported: Iterable[RunSignature] | None = None,
        run_count: int | None = None,
    ) -> Observation:
        """Number this scan and mark the runs it finds changed since the previous one.

        ``runs``: every run of the tree as ``(prefix, run_id, signature)``
        (:func:`signature`), the runs left out of the manifest included.

        A caller that knows which runs may have changed since its previous observation
        (a tree told by inotify or a poll) names them in ``reported``, and ``run_count``
        the runs of the tree now: when this process made the previous observation of the
        same journal and the tags are as it saw them, only the reported runs (and those
        still within the margin) are compared, and the journal is written at the next
        full manifest recorded, not now. A run removed shows in the count and makes it
        compare every run, as does anything else it cannot vouch for."""
        with exclusive_lock(self._lock):
            memory = self._memory()
            doc = memory.doc
            seq = doc["seq"] + 1
            settled_before = min(doc["scan_started_ns"] or scan_started_ns, scan_started_ns)
            settled_before -= REUSE_MARGIN_NS
            moved: dict[str, list[Any]] | None = None
            if reported is not None and memory.complete and memory.tags == tags:
                moved = _moved_among(reported, memory, tags, seq, settled_before, run_count)
            if moved is not None:
                if moved:
                    known: dict[str, list[Any]] = doc["runs"]
                    known.update(moved)
                    doc.update(seq=seq, scan_started_ns=scan_started_ns)
                    memory.recent.update((prefix, seq) for prefix in moved)
                    memory.racy = {
                        prefix
                        for prefix in memory.racy.union(moved)
                        if known[prefix][2] >= settled_before
                    }
                else:
                    seq -= 1
            else:
                seq = self._observe_all(memory, runs, tags, seq, settled_before, scan_started_ns)
            memory.tags = dict(tags)
            memory.complete = True
            return Observation(
                seq=seq,
                changed=dict(memory.recent),
                fulls=tuple(FullRecord(*full) for full in doc["fulls"]),
            )

    def _observe_all(
        self,
        memory: _Memory,
        runs: RunsSource,
        tags: dict[str, list[str]],
        seq: int,
        settled_before: int,
        scan_started_ns: int,
    ) -> int:
        """Compare every run (see :meth:`observe`); written at once when anything moved."""
        doc = memory.doc
        known: dict[str, list[Any]] = doc["runs"]
        current: dict[str, list[Any]] = {}
        racy: set[str] = set()
        moved = False
        for prefix, run_id, (count, ctimes, newest) in runs() if callable(runs) else runs:
            run_tags = tags.get(run_id)
            before = known.get(prefix)
            if before is None or _moved(before, count, ctimes, newest, run_tags, settled_before):
                current[prefix] = [count, ctimes, newest, run_tags, seq]
                moved = True
            else:
                current[prefix] = before
            if newest >= settled_before:
                racy.add(prefix)
        moved = moved or len(current) != len(known)
        memory.racy = racy
        if not moved:  # the tree as the previous observation saw it
            return seq - 1
        doc.update(seq=seq, scan_started_ns=scan_started_ns, runs=current)
        memory.recent = _recent(doc)
        self._save(memory)
        return seq

    def record_full(self, full: FullRecord, horizon: float) -> None:
        """Remember that ``full`` is the published full manifest; records older than
        ``horizon`` (but the newest two) are pruned. The journal is written here, with
        every observation made since it was last written.

        A full manifest someone else publishes in between is never recorded: a client
        that applied it finds its snapshot in no ``changes_since`` and reads the full
        manifest, while the records kept stay true (the observations saw every change)."""
        with exclusive_lock(self._lock):
            memory = self._memory()
            doc = memory.doc
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
            memory.recent = _recent(doc)
            self._save(memory)

    def _memory(self) -> _Memory:
        """This process's memory of the journal, read afresh when the file is not the one
        it last read or wrote."""
        key = str(self.path)
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            identity = None
        except OSError as error:
            logger.warning("change journal %s unusable (%s); starting afresh", self.path, error)
            identity = None
        else:
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        memory = _MEMORY.get(key)
        if memory is not None and memory.identity == identity:
            return memory
        doc = self._load() if identity is not None else _empty()
        memory = _Memory(identity, doc, _recent(doc), set(), None, complete=False)
        _MEMORY[key] = memory
        return memory

    def _load(self) -> dict[str, Any]:
        try:
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return _empty()
        except (OSError, orjson.JSONDecodeError) as error:
            logger.warning("change journal %s unusable (%s); starting afresh", self.path, error)
            return _empty()
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
            return _empty()
        return checked

    def _save(self, memory: _Memory) -> None:
        self._remove_leftovers()
        memory.identity = None  # (a failed write leaves the file unknown)
        write_atomically(self.path, orjson.dumps(memory.doc), durable=False)
        stat = self.path.stat()
        memory.identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _remove_leftovers(self) -> None:
        """Temp files of a journal write that was killed (we hold the lock: none is live)."""
        prefix = temp_prefix_for(self.path)
        with contextlib.suppress(OSError), os.scandir(self.path.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _moved_among(
    reported: Iterable[RunSignature],
    memory: _Memory,
    tags: dict[str, list[str]],
    seq: int,
    settled_before: int,
    run_count: int | None,
) -> dict[str, list[Any]] | None:
    """The entries of the reported runs (and of the racy ones) that moved, numbered
    ``seq``; ``None`` when the runs of the tree are not the journal's plus the new ones
    (a run was removed): then every run is compared."""
    known: dict[str, list[Any]] = memory.doc["runs"]
    moved: dict[str, list[Any]] = {}
    added = 0
    for prefix, run_id, (count, ctimes, newest) in reported:
        run_tags = tags.get(run_id)
        before = known.get(prefix)
        if before is None:
            added += 1
        if before is None or _moved(before, count, ctimes, newest, run_tags, settled_before):
            moved[prefix] = [count, ctimes, newest, run_tags, seq]
    if run_count is None or len(known) + added != run_count:
        return None
    for prefix in memory.racy:
        entry = known.get(prefix)
        if prefix not in moved and entry is not None and entry[2] >= settled_before:
            moved[prefix] = [*entry[:4], seq]
    return moved


def _recent(doc: dict[str, Any]) -> dict[str, int]:
    """The runs changed after the oldest full manifest recorded (none without one)."""
    if not doc["fulls"]:
        return {}
    floor = min(int(full[2]) for full in doc["fulls"])
    return {prefix: entry[4] for prefix, entry in doc["runs"].items() if entry[4] > floor}


def _empty() -> dict[str, Any]:
    return {
        "journal_version": JOURNAL_VERSION,
        "seq": 0,
        "scan_started_ns": 0,
        "runs": {},
        "fulls": [],
    }


def _moved(
    before: list[Any],
    count: int,
    ctimes: int,
    newest: int,
    run_tags: object,
    settled_before: int,
) -> bool:
    """Whether a run's observation differs from its journal entry ``before`` (``[count,
    ctime sum, newest ctime, tags, observation number]``), or is too recent to be trusted
    as settled."""
    return (
        before[0] != count
        or before[1] != ctimes
        or before[3] != run_tags
        or newest >= settled_before
    )

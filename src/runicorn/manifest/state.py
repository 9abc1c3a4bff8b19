"""The generator's private memory between runs, kept beside the manifest it publishes.

It holds what the published manifest cannot: the revision bookkeeping (content digest) and,
for incremental generation, each append-only file's stat key with the size and tail hash
recorded for it, and each run's derived status. A file is reused only when its
``(size, mtime_ns, ctime_ns, inode)`` is unchanged *and* its mtime is older than the
previous scan's start: a file modified during that scan may have changed again within the
same timestamp granularity (git's "racy clean" problem).

The state is a cache: when it is missing or unreadable, the generator recomputes everything
and only the revision bookkeeping falls back to the published manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from runicorn.atomic import write_atomically

STATE_VERSION = 1

StatKey = tuple[int, int, int, int]
"""``(size, mtime_ns, ctime_ns, inode)``"""


@dataclass(slots=True)
class FileMemo:
    key: StatKey
    recorded_size: int
    tail_hash: str


@dataclass(slots=True)
class RunMemo:
    meta_key: StatKey | None
    status_key: StatKey | None
    status: str
    created_at: float | None


def _key(value: list | None) -> StatKey | None:
    """A stat key back from JSON; anything malformed makes the caller treat the state as
    corrupt (``ValueError``/``TypeError``)."""
    if value is None:
        return None
    a, b, c, d = value
    return (int(a), int(b), int(c), int(d))


@dataclass
class GeneratorState:
    revision: int = 0
    snapshot_id: str = ""
    generated_at: float = 0.0
    digest: str = ""
    scan_started_ns: int = 0
    scan_fingerprint: str = ""
    published_hash: str = ""
    """BLAKE3 of the published ``.json`` and ``.json.gz``: an edited or corrupted manifest on
    disk no longer matches and is republished."""
    """Hash of the scan that produced the published manifest (see the generator's fast path)."""
    files: dict[str, FileMemo] = field(default_factory=dict)
    runs: dict[str, RunMemo] = field(default_factory=dict)
    warning: str | None = None
    """Set by :meth:`load` when a state file existed but could not be used."""

    @classmethod
    def load(cls, path: Path) -> GeneratorState:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as error:
            return cls(warning=f"generator state {path} unreadable ({error.strerror}); rescanning")
        try:
            return cls._from_document(orjson.loads(data))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return cls(warning=f"generator state {path} is corrupt; rescanning everything")

    @classmethod
    def _from_document(cls, doc: dict) -> GeneratorState:
        if doc.get("state_version") != STATE_VERSION:
            raise ValueError("unknown state version")
        state = cls(
            revision=int(doc["revision"]),
            snapshot_id=str(doc["snapshot_id"]),
            generated_at=float(doc["generated_at"]),
            digest=str(doc["digest"]),
            scan_started_ns=int(doc["scan_started_ns"]),
            scan_fingerprint=str(doc.get("scan_fingerprint", "")),
            published_hash=str(doc.get("published_hash", "")),
        )
        files = state.files
        for path, (key, size, tail_hash) in doc["files"].items():
            files[path] = FileMemo((key[0], key[1], key[2], key[3]), int(size), str(tail_hash))
        for prefix, (meta_key, status_key, status, created_at) in doc["runs"].items():
            state.runs[prefix] = RunMemo(
                _key(meta_key),
                _key(status_key),
                str(status),
                None if created_at is None else float(created_at),
            )
        return state

    def save(self, path: Path) -> None:
        document = {
            "state_version": STATE_VERSION,
            "revision": self.revision,
            "snapshot_id": self.snapshot_id,
            "generated_at": self.generated_at,
            "digest": self.digest,
            "scan_started_ns": self.scan_started_ns,
            "scan_fingerprint": self.scan_fingerprint,
            "published_hash": self.published_hash,
            "files": {p: [m.key, m.recorded_size, m.tail_hash] for p, m in self.files.items()},
            "runs": {
                p: [m.meta_key, m.status_key, m.status, m.created_at] for p, m in self.runs.items()
            },
        }
        write_atomically(path, orjson.dumps(document), durable=False)

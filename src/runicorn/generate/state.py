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
from typing import Any

import orjson

from runicorn._sys.atomic import write_atomically
from runicorn.core.memo import FileMemo, StatKey

STATE_VERSION = 2


@dataclass(slots=True)
class RunMemo:
    """A run's status and creation time as derived from its ``meta.json`` and
    ``status.json``, with the two files' stat keys when read: while the keys hold, the run is
    described again without opening either file."""

    meta_key: StatKey | None
    status_key: StatKey | None
    status: str
    created_at: float | None


def _key(value: list[Any] | None) -> StatKey | None:
    """A stat key back from JSON; anything malformed makes the caller treat the state as
    corrupt (``ValueError``/``TypeError``)."""
    if value is None:
        return None
    a, b, c, d = value
    return (int(a), int(b), int(c), int(d))


def _count(value: object) -> int | None:
    """A count back from JSON (``None`` when absent); anything else is corrupt."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


@dataclass
class GeneratorState:
    revision: int = 0
    snapshot_id: str = ""
    generated_at: float = 0.0
    digest: str = ""
    scan_started_ns: int = 0
    scan_fingerprint: str = ""
    """Hash of the scan that produced the published manifest (see the generator's fast path)."""
    published_hash: str = ""
    """BLAKE3 of the published ``.json`` and ``.json.gz``: an edited or corrupted manifest on
    disk no longer matches and is republished."""
    append_only_files: int | None = None
    """How many append-only files the published manifest lists: the fast path reports them
    as reused without decoding the manifest (``None`` in an older generator's state)."""
    files: dict[str, FileMemo] = field(default_factory=dict)
    runs: dict[str, RunMemo] = field(default_factory=dict)
    warning: str | None = None
    """Set when a state file existed but could not be used."""
    memo_path: Path | None = None
    """Where :meth:`load_memos` finds ``files`` and ``runs``: kept in a file of their own so
    that a run with nothing to do never parses them."""
    encoded_memos: bytes | None = None
    """The memo file's bytes, made by the caller (the publisher's tree joins them from what
    it keeps packed); ``files`` and ``runs`` are then not used for it."""
    keep_memo_file: bool = False
    """Save only the header: the memo file on disk, written with this ``scan_started_ns``,
    still stands (the publisher rewrites its memos now and then, not with every
    publication; they are a cache)."""

    @staticmethod
    def memo_path_for(path: Path) -> Path:
        return path.with_name(path.name.removesuffix(".state") + ".memo")

    @classmethod
    def load(cls, path: Path) -> GeneratorState:
        """The header: revision bookkeeping and fingerprints; memos come on demand."""
        doc = cls._read(path)
        if isinstance(doc, str):
            return cls(warning=doc)
        if doc is None:
            return cls()
        try:
            return cls(
                revision=int(doc["revision"]),
                snapshot_id=str(doc["snapshot_id"]),
                generated_at=float(doc["generated_at"]),
                digest=str(doc["digest"]),
                scan_started_ns=int(doc["scan_started_ns"]),
                scan_fingerprint=str(doc.get("scan_fingerprint", "")),
                published_hash=str(doc.get("published_hash", "")),
                append_only_files=_count(doc.get("append_only_files")),
                memo_path=cls.memo_path_for(path),
            )
        except (KeyError, TypeError, ValueError):
            return cls(warning=f"generator state {path} is corrupt; rescanning everything")

    def load_memos(self) -> str | None:
        """Read the per-file and per-run memos written with this header (incremental runs);
        returns a warning when they exist but cannot be used."""
        memo_path, self.memo_path = self.memo_path, None
        if memo_path is None:
            return None
        doc = self._read(memo_path)
        if isinstance(doc, str):
            return doc
        # Memos of another generation (killed between the two writes) carry another scan
        # start: their reuse boundary is unknown, so they are not used.
        if doc is None or doc.get("scan_started_ns") != self.scan_started_ns:
            return None
        try:
            files = self.files
            for path, (key, size, tail_hash) in doc["files"].items():
                files[path] = FileMemo((key[0], key[1], key[2], key[3]), int(size), str(tail_hash))
            for prefix, (meta_key, status_key, status, created_at) in doc["runs"].items():
                self.runs[prefix] = RunMemo(
                    _key(meta_key),
                    _key(status_key),
                    str(status),
                    None if created_at is None else float(created_at),
                )
        except (KeyError, TypeError, ValueError):
            self.files.clear()
            self.runs.clear()
            return f"generator memos {memo_path} are corrupt; rehashing"
        return None

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | str | None:
        """The JSON object in ``path``; ``None`` if missing; a warning text if unusable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            return f"generator state {path} unreadable ({error.strerror}); rescanning"
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return f"generator state {path} is corrupt; rescanning everything"
        if not isinstance(doc, dict) or doc.get("state_version") != STATE_VERSION:
            return f"generator state {path} has an unknown format; rescanning everything"
        return doc

    def encode_memos(self) -> bytes:
        """The memo file's bytes; the generator encodes them while the manifest is being
        compressed on other threads."""
        if self.keep_memo_file:
            return b""
        if self.encoded_memos is not None:
            return self.encoded_memos
        memos = {
            "state_version": STATE_VERSION,
            "scan_started_ns": self.scan_started_ns,
            "files": {p: [m.key, m.recorded_size, m.tail_hash] for p, m in self.files.items()},
            "runs": {
                p: [m.meta_key, m.status_key, m.status, m.created_at] for p, m in self.runs.items()
            },
        }
        return orjson.dumps(memos)

    def save(self, path: Path, memos: bytes | None = None) -> None:
        """Write the memos (``memos``: :meth:`encode_memos` of this state, if already made),
        then the header that vouches for them (only the header with :attr:`keep_memo_file`)."""
        if not self.keep_memo_file:
            if memos is None:
                memos = self.encode_memos()
            write_atomically(self.memo_path_for(path), memos, durable=False)
        header = {
            "state_version": STATE_VERSION,
            "revision": self.revision,
            "snapshot_id": self.snapshot_id,
            "generated_at": self.generated_at,
            "digest": self.digest,
            "scan_started_ns": self.scan_started_ns,
            "scan_fingerprint": self.scan_fingerprint,
            "published_hash": self.published_hash,
            "append_only_files": self.append_only_files,
        }
        write_atomically(path, orjson.dumps(header), durable=False)

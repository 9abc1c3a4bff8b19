"""A manifest this generator published, read back with its runs decoded only on demand.

An incremental generation that finds the tree as it was returns the manifest already on
disk. At 100,000 runs, turning its 850,000 file entries into objects takes about two seconds
and most of a gigabyte, and the CLI then reads only the header and its statistics from it. So
the header is decoded at once, and the experiments on first access.

Only for bytes this generator wrote and has verified against the hash it recorded when it
published them: they are decoded without the validation a downloaded manifest gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from runicorn._sys.gcpause import paused_gc
from runicorn.format.models import (
    EXPERIMENTS_KEY,
    ExperimentEntry,
    FileEntry,
    ManifestType,
    SyncManifest,
)


def decode_own_experiments(array: bytes | memoryview) -> list[ExperimentEntry]:
    """The ``experiments`` array of a manifest this generator wrote, as entry objects."""
    with paused_gc():
        return [
            ExperimentEntry(
                run_id=exp["run_id"],
                project=exp["project"],
                name=exp["name"],
                status=exp["status"],
                created_at=exp["created_at"],
                updated_at=exp["updated_at"],
                files=[
                    FileEntry(
                        f["path"],
                        f["size"],
                        f["mtime"],
                        f["priority"],
                        f["is_append_only"],
                        f.get("tail_hash"),
                    )
                    for f in exp["files"]
                ],
                tags=exp.get("tags"),
                path=exp.get("path"),
            )
            for exp in orjson.loads(array)
        ]


class PublishedManifest(SyncManifest):
    """A :class:`SyncManifest` over the bytes of a published manifest.

    It compares equal to the fully decoded manifest of the same bytes. The statistics come
    from the header until the experiments are decoded; assigning ``experiments`` replaces
    the document as it would on a plain manifest.
    """

    __slots__ = ("_array_start", "_decoded", "_document", "_header_statistics")

    def __init__(self, document: bytes) -> None:
        """Decode the header of ``document``; ``ValueError`` or ``KeyError`` if it is not
        one of this generator's manifests."""
        header_end = document.find(EXPERIMENTS_KEY)
        if header_end < 0 or not document.endswith(b"}"):
            raise ValueError("not a manifest written by this generator")
        header: dict[str, Any] = orjson.loads(document[:header_end] + b"}")
        self.manifest_type = ManifestType(header["manifest_type"])
        self.revision = header["revision"]
        self.snapshot_id = header["snapshot_id"]
        self.generated_at = header["generated_at"]
        self.server_hostname = header["server_hostname"]
        self.remote_root = header["remote_root"]
        self.format_version = header["format_version"]
        self.generator_version = header.get("generator_version", "")
        self.tail_hash_algorithm = header.get("tail_hash_algorithm")
        self.tail_hash_window = header.get("tail_hash_window")
        self.changes_since = header.get("changes_since")
        problems = header.get("problems")
        self.problems = (
            None if problems is None else [(item["path"], item["reason"]) for item in problems]
        )
        self.skipped = []
        self.unchanged = []
        statistics = header["statistics"]
        self._header_statistics = {
            key: int(statistics[key]) for key in ("total_experiments", "total_files", "total_bytes")
        }
        self._document: bytes | None = document
        self._array_start = header_end + len(EXPERIMENTS_KEY)
        self._decoded: list[ExperimentEntry] = []

    @property
    def is_decoded(self) -> bool:
        """Whether the experiments have been turned into objects yet."""
        return self._document is None

    @property
    def experiments(self) -> list[ExperimentEntry]:
        if self._document is not None:
            self._decoded = decode_own_experiments(
                memoryview(self._document)[self._array_start : -1]
            )
            self._document = None
        return self._decoded

    @experiments.setter
    def experiments(self, value: list[ExperimentEntry]) -> None:
        self._decoded = value
        self._document = None

    @property
    def total_experiments(self) -> int:
        if self._document is not None:
            return self._header_statistics["total_experiments"]
        return super().total_experiments

    @property
    def total_files(self) -> int:
        if self._document is not None:
            return self._header_statistics["total_files"]
        return super().total_files

    @property
    def total_bytes(self) -> int:
        if self._document is not None:
            return self._header_statistics["total_bytes"]
        return super().total_bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SyncManifest):
            return NotImplemented
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(SyncManifest)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it extends

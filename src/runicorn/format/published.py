"""A manifest this generator published, read back with its runs decoded only on demand.

An incremental generation that finds the tree as it was returns the manifest already on
disk. At 100,000 runs, turning its 850,000 file entries into objects takes about two seconds
and most of a gigabyte, and the CLI then reads only the header and its statistics from it. So
the header is decoded at once, and the experiments on first access. :class:`LazyManifest` is
that behaviour on its own, shared with the manifest the publisher assembles from its tree
(:class:`runicorn.generate.tree.AssembledManifest`).

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


_HEADER_FIELDS = (
    "revision",
    "snapshot_id",
    "generated_at",
    "server_hostname",
    "remote_root",
    "format_version",
)
"""The header fields every manifest of this generator carries, as :class:`SyncManifest`
names them (``manifest_type``, ``problems`` and ``statistics`` are converted)."""
_OPTIONAL_HEADER_FIELDS = (
    ("generator_version", ""),
    ("tail_hash_algorithm", None),
    ("tail_hash_window", None),
    ("changes_since", None),
)
"""The header fields that may be missing, with what a missing one means."""


class LazyManifest(SyncManifest):
    """A :class:`SyncManifest` holding its experiments as the JSON array this generator
    encoded, decoded into objects only on first access.

    At 100,000 runs the objects take about two seconds and most of a gigabyte, and the
    generator and the CLI mostly need only the header and the statistics: those come from
    ``totals`` (experiments, files, bytes) until the experiments are decoded. It compares
    equal to the fully decoded manifest of the same content; assigning ``experiments``
    replaces the array as it would on a plain manifest.
    """

    __slots__ = ("_array", "_decoded", "_totals")

    def __init__(
        self, array: bytes | memoryview, totals: tuple[int, int, int], **header: Any
    ) -> None:
        """``array``: the experiments as published; ``header``: the other fields, as
        :class:`SyncManifest` takes them."""
        SyncManifest.__init__(self, **header)
        self._array: bytes | memoryview | None = array
        self._totals = totals

    @property
    def is_decoded(self) -> bool:
        """Whether the experiments have been turned into objects yet."""
        return self._array is None

    @property
    def experiments(self) -> list[ExperimentEntry]:
        if self._array is not None:
            self._decoded = decode_own_experiments(self._array)
            self._array = None
        return self._decoded

    @experiments.setter
    def experiments(self, value: list[ExperimentEntry]) -> None:
        self._decoded = value
        self._array = None

    @property
    def total_experiments(self) -> int:
        return self._totals[0] if self._array is not None else super().total_experiments

    @property
    def total_files(self) -> int:
        return self._totals[1] if self._array is not None else super().total_files

    @property
    def total_bytes(self) -> int:
        return self._totals[2] if self._array is not None else super().total_bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SyncManifest):
            return NotImplemented
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(SyncManifest)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it extends


class PublishedManifest(LazyManifest):
    """A manifest read back from the bytes this generator published: the header decoded at
    once, the experiments on demand (:class:`LazyManifest`)."""

    __slots__ = ()

    def __init__(self, document: bytes) -> None:
        """Decode the header of ``document``; ``ValueError`` or ``KeyError`` if it is not
        one of this generator's manifests."""
        header_end = document.find(EXPERIMENTS_KEY)
        if header_end < 0 or not document.endswith(b"}"):
            raise ValueError("not a manifest written by this generator")
        header: dict[str, Any] = orjson.loads(document[:header_end] + b"}")
        problems = header.get("problems")
        statistics = header["statistics"]
        LazyManifest.__init__(
            self,
            memoryview(document)[header_end + len(EXPERIMENTS_KEY) : -1],
            (
                int(statistics["total_experiments"]),
                int(statistics["total_files"]),
                int(statistics["total_bytes"]),
            ),
            manifest_type=ManifestType(header["manifest_type"]),
            **{name: header[name] for name in _HEADER_FIELDS},
            **{name: header.get(name, default) for name, default in _OPTIONAL_HEADER_FIELDS},
            problems=(
                None if problems is None else [(item["path"], item["reason"]) for item in problems]
            ),
        )

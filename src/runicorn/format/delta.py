"""The delta of an active manifest: the runs changed since the publication before it.

A long-running publisher republishes the active manifest at every change; at 100,000 runs it
lists some 15,000 running runs (2.6 MB compressed) while a line written changes one of them.
So beside it the publisher writes ``active_manifest.delta.json.gz``: a first line naming the
active publication it builds on (its *base*: revision and snapshot), then an active manifest
in format 1.0 with the header of the whole one published with it (revision, snapshot, time,
``changes_since``) but listing only the runs whose entry differs from the base's: new,
changed, or with other tags.

A client that applied the base cleanly and then applies the delta holds what applying the
whole active manifest would have given it: the runs left out are listed in the whole one
exactly as in the base, and an active manifest removes nothing. Any other client reads the
whole active manifest. The published manifests stay as they are; the delta is an addition
beside them, for the push channel of a watching client.
"""

from __future__ import annotations

import orjson

from runicorn._sys.atomic import Document, pieces_of
from runicorn.format.compression import compress, decompress_capped
from runicorn.format.models import ManifestFormat

__all__ = ["DELTA_MARKER", "delta_filename", "read_delta", "write_delta"]

DELTA_MARKER = b'{"delta_base":'
"""How a delta's content begins, once decompressed (a manifest begins otherwise)."""


def delta_filename(manifest_filename: str) -> str:
    """``active_manifest.json`` -> ``active_manifest.delta.json.gz``."""
    stem, dot, suffix = manifest_filename.rpartition(".")
    name = f"{stem}.delta.{suffix}" if dot else f"{manifest_filename}.delta"
    return name + ManifestFormat.GZIP_SUFFIX


def write_delta(base_revision: int, base_snapshot_id: str, manifest: Document) -> bytes:
    """The delta's compressed content: the base line, then ``manifest`` (the JSON of an
    active manifest listing the changed runs, possibly in pieces)."""
    base = orjson.dumps(
        {"delta_base": {"revision": base_revision, "snapshot_id": base_snapshot_id}}
    )
    return compress([base + b"\n", *pieces_of(manifest)])


def read_delta(data: bytes, limit: int) -> tuple[int, str, bytes] | None:
    """``(base revision, base snapshot, manifest JSON)`` of a delta's compressed content;
    ``None`` when ``data`` is something else (a whole manifest's ``.gz``). Raises
    ``ValueError`` for a delta that is malformed or inflates past ``limit`` bytes."""
    if not data.startswith(b"\x1f\x8b"):
        return None
    plain = bytes(decompress_capped(data, limit, source="active manifest delta"))
    if not plain.startswith(DELTA_MARKER):
        return None
    line, newline, manifest = plain.partition(b"\n")
    try:
        base = orjson.loads(line)["delta_base"]
        revision, snapshot_id = base["revision"], base["snapshot_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"a malformed active manifest delta ({error})") from error
    if not newline or not isinstance(revision, int) or not isinstance(snapshot_id, str):
        raise ValueError("a malformed active manifest delta (its base line)")
    return revision, snapshot_id, manifest

"""The Runicorn run layout: where runs live and what their files mean.

Runs live at ``<root>/<project>/<name>/runs/<run_id>/``. Every rule about that layout --
which directories are runs, which files belong to a run, their sync priority, which are
append-only -- is stated here once, so the scanners, the generator and the client agree.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

RUNS_DIRNAME = "runs"
"""The directory between an experiment name and its run ids."""

MANIFEST_DIRNAME = ".runicorn"
"""Where generated manifests live, under the experiments root."""

EXPERIMENTS_METADATA_FILENAME = ".experiments_metadata.json"
"""Root-level file mapping run ids to their tags."""

LOCK_SUFFIX = ".lock"
DELETED_MARKER = ".deleted"

APPEND_ONLY_FILES = frozenset({"events.jsonl", "logs.txt"})
"""Files the SDK only ever appends to (under a lock that readers do not take)."""

PRIORITY_CRITICAL = 1
PRIORITY_HIGH = 2
PRIORITY_MEDIUM = 3
PRIORITY_LOW = 4

_CRITICAL_FILES = frozenset({"meta.json", "status.json"})

RUN_STATUSES = frozenset({"running", "finished", "failed", "interrupted"})
UNKNOWN_STATUS = "unknown"


def is_hidden(name: str) -> bool:
    """Names starting with a dot are never projects, experiments or runs (``.runicorn``,
    editors' temp dirs, half-created run dirs)."""
    return name.startswith(".")


def is_synced_file(path_in_run: str) -> bool:
    """Whether a regular file inside a run directory belongs in the manifest.

    Lock files are the writer's business and the soft-delete marker is a property of the
    run, not content, so neither is synced.
    """
    return not path_in_run.endswith(LOCK_SUFFIX) and path_in_run != DELETED_MARKER


def is_append_only(path_in_run: str) -> bool:
    """Append-only logs at the top of a run directory (``events.jsonl``, ``logs.txt``)."""
    return path_in_run in APPEND_ONLY_FILES


def priority_for(path_in_run: str) -> int:
    """Sync priority, 1 first: the files a UI needs to list runs come before bulk data.

    1: meta.json, status.json; 2: summary.json and other top-level JSON metadata;
    3: events.jsonl, logs.txt; 4: media and everything else.
    """
    if path_in_run in _CRITICAL_FILES:
        return PRIORITY_CRITICAL
    if path_in_run in APPEND_ONLY_FILES:
        return PRIORITY_MEDIUM
    if "/" not in path_in_run and path_in_run.endswith(".json"):
        return PRIORITY_HIGH
    return PRIORITY_LOW


def run_prefix(project: str, name: str, run_id: str) -> str:
    """The manifest path prefix (with trailing slash) of every file of a run."""
    return f"{project}/{name}/{RUNS_DIRNAME}/{run_id}/"


# --- What a run says about itself -------------------------------------------------------


def parse_json_object(data: bytes | None) -> dict[str, Any] | None:
    """A JSON object from a run's metadata file, or ``None`` when it is missing, truncated
    (the SDK rewrites these files in place) or not an object."""
    if not data:
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _finite_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def derive_status(status_doc: dict[str, Any] | None) -> str:
    """The run's status from status.json, ``unknown`` when it cannot be read."""
    if status_doc is None:
        return UNKNOWN_STATUS
    status = status_doc.get("status")
    return status if isinstance(status, str) and status else UNKNOWN_STATUS


def derive_created_at(
    meta_doc: dict[str, Any] | None, status_doc: dict[str, Any] | None, fallback: float
) -> float:
    """meta.json ``created_at``, else status.json ``started_at``, else ``fallback`` (the
    oldest file mtime of the run)."""
    for doc, key in ((meta_doc, "created_at"), (status_doc, "started_at")):
        if doc is not None:
            number = _finite_number(doc.get(key))
            if number is not None:
                return number
    return fallback


def tags_by_run(metadata_doc: dict[str, Any] | None) -> dict[str, list[str]]:
    """Tags per run id from ``.experiments_metadata.json``.

    Accepts ``{run_id: {"tags": [...]}}`` and ``{run_id: [...]}``; anything else is ignored.
    Tags are returned sorted and de-duplicated so the manifest does not depend on the order
    a UI stored them in.
    """
    result: dict[str, list[str]] = {}
    if not metadata_doc:
        return result
    for run_id, value in metadata_doc.items():
        tags = value.get("tags") if isinstance(value, dict) else value
        if isinstance(tags, list):
            clean = sorted({tag for tag in tags if isinstance(tag, str)})
            if clean:
                result[run_id] = clean
    return result

"""The Runicorn run layouts: where runs live and what their files mean.

Two layouts, both found on one root:

* **project-name** (the API document's, SDK 0.5 and earlier):
  ``<root>/<project>/<name>/runs/<run_id>/``;
* **runs-path** (SDK 0.6 and later): ``<root>/runs/<path...>/<run_id>/``, where ``<path>`` has
  any number of components (none included) and a directory below ``runs/`` is a run when it
  holds ``meta.json`` or ``status.json`` -- otherwise it is one more path component. This is
  how the upstream SDK writes runs and how its viewer finds them.

A top-level ``runs`` directory is always the runs-path layout, never a project: the upstream
viewers (0.5 and 0.7 alike) skip a project named ``runs``. So project ``runs`` *means* the
runs-path layout everywhere -- in a scan, a manifest, the cache: such a run is listed with
``project`` ``"runs"``, ``name`` its path (``""`` for the empty path) and, in a manifest, the
optional field ``path`` equal to the name. ``(project, name, run_id)`` stays unique across
both layouts, and a run's directory follows from it alone (:func:`run_prefix`).

Every rule about the layouts -- which directories are runs, which files belong to a run,
their sync priority, which are append-only -- is stated here once, so the scanners, the
generator and the client agree.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import orjson

RUNS_DIRNAME = "runs"
"""The directory between an experiment name and its run ids (project-name layout), and the
top-level directory holding every run of the runs-path layout."""

RUN_MARKERS = ("meta.json", "status.json")
"""Below ``runs/`` (runs-path layout), a directory holding an entry of one of these names is a
run; any other directory is a path component (the upstream viewer's rule)."""

RECYCLE_DIRNAME = ".recycle"
"""Where the upstream viewer moves deleted runs (``runs/.recycle/<run_id>``); never synced
(hidden, like every dot name above the run level)."""

INDEX_FILE_PREFIX = "runicorn.db"
"""The upstream SDK's SQLite index at the root (``runicorn.db``, ``-wal``, ``-shm``): server
paths, written mid-transaction, rebuilt by the viewer from the run files. Never synced: only
files inside run directories are, and the index lies at the root."""

LAYOUT_PROJECT_NAME = "project-name"
LAYOUT_RUNS_PATH = "runs-path"
LAYOUT_MIXED = "mixed"
LAYOUT_NONE = "none"
"""Names of what a root holds, as ``generate-manifest`` reports them."""

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
    """The manifest path prefix (with trailing slash) of every file of a run.

    Project ``runs`` is the runs-path layout, whose path is the ``name``:
    ``runs/<name>/<run_id>/`` (``runs/<run_id>/`` for the empty path).
    """
    if project == RUNS_DIRNAME:
        return f"{RUNS_DIRNAME}/{name}/{run_id}/" if name else f"{RUNS_DIRNAME}/{run_id}/"
    return f"{project}/{name}/{RUNS_DIRNAME}/{run_id}/"


def run_path_of(project: str, name: str) -> str | None:
    """The runs-path ``path`` of a run, ``None`` for a project-name run."""
    return name if project == RUNS_DIRNAME else None


def is_run_dir_listing(names: Collection[str]) -> bool:
    """Whether a directory below ``runs/`` with these entry names is a run (runs-path)."""
    return any(marker in names for marker in RUN_MARKERS)


def layout_name(project_name_runs: int, runs_path_runs: int) -> str:
    """What a root holds: :data:`LAYOUT_PROJECT_NAME`, :data:`LAYOUT_RUNS_PATH`,
    :data:`LAYOUT_MIXED` or :data:`LAYOUT_NONE`."""
    if project_name_runs and runs_path_runs:
        return LAYOUT_MIXED
    if runs_path_runs:
        return LAYOUT_RUNS_PATH
    return LAYOUT_PROJECT_NAME if project_name_runs else LAYOUT_NONE


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

"""What a 0.5.x Runicorn generator publishes, written out for tests of interop with it.

Written from the 0.5.3 package's behaviour (not its code): its manifest is indented JSON with
the experiments before the statistics and no ``tail_hash_algorithm`` field; it lists only a
run's metadata files (priority 1) and its two logs (priority 2, append-only, with an MD5 of
their last ``min(size, 4096)`` bytes as ``tail_hash``, omitted for empty files); its revision
is one above the ``last_revision`` it keeps in ``.manifest_state.json`` beside the manifest,
whatever the published manifest says.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

METADATA_FILES = (
    "meta.json",
    "status.json",
    "summary.json",
    "environment.json",
    "artifacts_created.json",
    "artifacts_used.json",
)
APPEND_ONLY_FILES = ("events.jsonl", "logs.txt")
STATE_FILENAME = ".manifest_state.json"


def _dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _file(root: Path, path: Path, priority: int) -> dict[str, Any]:
    append_only = priority == 2
    st = path.stat()
    entry: dict[str, Any] = {
        "path": path.relative_to(root).as_posix(),
        "size": st.st_size,
        "mtime": st.st_mtime,
    }
    if append_only and st.st_size > 0:
        with open(path, "rb") as handle:
            handle.seek(-min(4096, st.st_size), os.SEEK_END)
            entry["tail_hash"] = hashlib.md5(handle.read()).hexdigest()
    entry["priority"] = priority
    if append_only:
        entry["is_append_only"] = True
    return entry


def _run(root: Path, project: str, name: str, run_dir: Path) -> dict[str, Any]:
    status = "unknown"
    with contextlib.suppress(OSError, ValueError):
        status = json.loads((run_dir / "status.json").read_text()).get("status", "unknown")
    present = [f for f in (*METADATA_FILES, *APPEND_ONLY_FILES) if (run_dir / f).is_file()]
    files = [_file(root, run_dir / f, 2 if f in APPEND_ONLY_FILES else 1) for f in present]
    st = run_dir.stat()
    return {
        "run_id": run_dir.name,
        "project": project,
        "name": name,
        "status": status,
        "created_at": st.st_ctime,
        "updated_at": st.st_mtime,
        "files": files,
        "tags": None,
    }


def publish_v05(root: Path, manifest_type: str = "full", hostname: str = "lab") -> dict[str, Any]:
    """Publish ``<root>/.runicorn/<type>_manifest.json`` (and ``.gz``) as 0.5.x does; returns
    the document."""
    out = root / ".runicorn"
    out.mkdir(exist_ok=True)
    state_path = out / STATE_FILENAME
    last = json.loads(state_path.read_text()).get("last_revision", 0) if state_path.exists() else 0
    experiments = []
    for project in _dirs(root):
        if project.name in ("artifacts", "sweeps"):
            continue
        for experiment in _dirs(project):
            runs = experiment / "runs"
            if runs.is_dir():
                for run_dir in _dirs(runs):
                    entry = _run(root, project.name, experiment.name, run_dir)
                    if entry["files"]:
                        experiments.append(entry)
    doc = {
        "format_version": "1.0",
        "manifest_type": manifest_type,
        "revision": last + 1,
        "snapshot_id": str(uuid.uuid4()),
        "generated_at": 1_700_000_000.0,
        "server_hostname": hostname,
        "remote_root": str(root.resolve()),
        "experiments": experiments,
        "statistics": {
            "total_experiments": len(experiments),
            "total_files": sum(len(e["files"]) for e in experiments),
            "total_bytes": sum(f["size"] for e in experiments for f in e["files"]),
        },
        "generator_version": "1.0",
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    target = out / f"{manifest_type}_manifest.json"
    target.write_text(text, encoding="utf-8")
    with gzip.open(target.with_name(target.name + ".gz"), "wt", encoding="utf-8") as handle:
        handle.write(text)
    state_path.write_text(json.dumps({"last_revision": last + 1, "last_generated": 0.0}))
    return doc

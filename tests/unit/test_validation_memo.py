"""The validation memo (``SyncManifest.from_json(..., memo=...)``): a manifest decoded with a
memo primed by an earlier one gives exactly what decoding it alone gives -- the same model,
the same skipped names, or the same error message."""

from __future__ import annotations

import copy
import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.format.layout import run_prefix
from runicorn.format.models import ValidationMemo
from runicorn.manifest import SyncManifest

_NAMES = ["a", "b", "Run-1", "café", "bad\u202ename", "x\\y", "C:"]
_RESTS = ["events.jsonl", "media/a.png", "bad\x1bname", ".runicorn-tmp-x", "café.txt", "n" * 300]
_VALUES = [None, True, False, 0, 1, 1.0, -1, 4, 5, 2**63, 0.5, "", "a", "ab" * 16, [], {}]


@st.composite
def _runs(draw) -> list[dict]:
    runs = []
    for _ in range(draw(st.integers(1, 4))):
        run_id = draw(st.sampled_from(["r1", "r2"]))
        if draw(st.booleans()):  # project-name layout
            project = draw(st.sampled_from(["p", "q"]))
            name = draw(st.sampled_from(_NAMES))
            path = None
        else:  # runs-path layout, where one run's directory may lie inside another's
            project = "runs"
            name = path = draw(st.sampled_from(["", "a", "a/r1", "a/r1/r2"]))
        prefix = run_prefix(project, name, run_id)
        rests = draw(st.lists(st.sampled_from(_RESTS), max_size=3, unique=True))
        files = []
        for rest in rests:
            entry: dict = {
                "path": prefix + rest,
                "size": draw(st.integers(0, 100)),
                "mtime": draw(st.sampled_from([1.5, 2.25, 1e9])),
                "priority": draw(st.integers(1, 4)),
                "is_append_only": draw(st.booleans()),
            }
            if draw(st.booleans()):
                entry["tail_hash"] = draw(st.sampled_from(["ab" * 16, "0f" * 16]))
            files.append(entry)
        run: dict = {
            "run_id": run_id,
            "project": project,
            "name": name,
            "status": "running",
            "created_at": 1.0,
            "updated_at": 2.0,
            "files": files,
        }
        if path is not None:
            run["path"] = path
        if draw(st.booleans()):
            run["tags"] = ["t"]
        runs.append(run)
    return runs


def _document(runs: list[dict]) -> dict:
    files = [entry for run in runs for entry in run["files"] if isinstance(entry, dict)]
    return {
        "format_version": "1.0",
        "manifest_type": "active",
        "revision": 3,
        "snapshot_id": "s",
        "generated_at": 5.0,
        "server_hostname": "h",
        "remote_root": "/r",
        "experiments": runs,
        "statistics": {
            "total_experiments": len(runs),
            "total_files": len(files),
            "total_bytes": sum(entry["size"] for entry in files if type(entry.get("size")) is int),
        },
    }


@st.composite
def _changed(draw, runs: list[dict]) -> list[dict]:
    """The next publication: some fields of some runs and files changed (often to a value of
    another JSON type that compares equal in Python, ``1``/``1.0``/``true``), runs or files
    repeated, runs dropped."""
    runs = copy.deepcopy(runs)
    for _ in range(draw(st.integers(0, 3))):
        run = draw(st.sampled_from(runs))
        kind = draw(st.sampled_from(["file", "run", "repeat", "steal", "drop"]))
        if kind == "file" and run["files"]:
            entry = draw(st.sampled_from(run["files"]))
            key = draw(
                st.sampled_from(["size", "mtime", "priority", "is_append_only", "tail_hash"])
            )
            entry[key] = draw(st.sampled_from(_VALUES))
        elif kind == "run":
            key = draw(st.sampled_from(["status", "created_at", "tags", "name", "run_id"]))
            run[key] = draw(st.sampled_from(_VALUES + _NAMES))
        elif kind == "repeat":
            runs.append(copy.deepcopy(run))
        elif kind == "steal" and run["files"]:
            other = draw(st.sampled_from(runs))
            other["files"].append(copy.deepcopy(draw(st.sampled_from(run["files"]))))
        elif kind == "drop" and len(runs) > 1:
            runs.remove(run)
    return runs


def _outcome(data: bytes, memo: ValidationMemo | None) -> object:
    try:
        manifest = SyncManifest.from_json(data, memo=memo)
    except ValueError as error:
        return str(error)
    return manifest, manifest.skipped


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_memo_never_changes_what_a_manifest_decodes_to(data):
    first = _document(data.draw(_runs()))
    runs = first["experiments"]
    second = _document(data.draw(_changed(runs)))
    if data.draw(st.booleans()):  # a statistics line that no longer adds up
        second["statistics"]["total_files"] += 1
    memo = ValidationMemo()
    for doc in (first, second, second, first):
        # The standard library's encoder, since orjson refuses 2**63, a value the decoder
        # must meet and refuse with a message.
        encoded = json.dumps(doc).encode()
        assert _outcome(encoded, memo) == _outcome(encoded, None)


def _lab(n_runs: int = 3) -> list[dict]:
    return [
        {
            "run_id": f"r{index}",
            "project": "p",
            "name": "n",
            "status": "running",
            "created_at": 1.0,
            "updated_at": 2.0,
            "files": [
                {"path": f"{run_prefix('p', 'n', f'r{index}')}{rest}", "size": 3, "mtime": 1.5}
                for rest in ("events.jsonl", "bad\x1bname")
            ],
        }
        for index in range(n_runs)
    ]


def test_an_unchanged_run_is_reused_and_a_type_change_is_still_refused():
    memo = ValidationMemo()
    doc = _document(_lab())
    first = SyncManifest.from_json(orjson.dumps(doc), memo=memo)
    assert len(memo) == 3
    assert [path for path, _ in first.skipped] == [
        f"{run_prefix('p', 'n', f'r{index}')}bad\x1bname" for index in range(3)
    ]
    doc["experiments"][1]["files"][0]["size"] = 3.0  # equal to 3 in Python, not in JSON
    with pytest.raises(ValueError, match=r"experiments\[1\].*size: expected an integer"):
        SyncManifest.from_json(orjson.dumps(doc), memo=memo)
    doc["experiments"][1]["files"][0]["size"] = True
    with pytest.raises(ValueError, match=r"experiments\[1\].*size: expected an integer"):
        SyncManifest.from_json(orjson.dumps(doc), memo=memo)


def test_a_reused_run_is_a_new_object_each_time():
    memo = ValidationMemo()
    data = orjson.dumps(_document(_lab()))
    first = SyncManifest.from_json(data, memo=memo)
    first.experiments[0].files[0].size = 99
    first.experiments[0].files.clear()
    second = SyncManifest.from_json(data, memo=memo)
    assert second == SyncManifest.from_json(data)
    assert second.experiments[0].files[0] is not first.experiments[0].files


def _runs_path_run(path: str) -> dict:
    prefix = run_prefix("runs", path, "r")
    return {
        "run_id": "r",
        "project": "runs",
        "name": path,
        "path": path,
        "status": "running",
        "created_at": 1.0,
        "updated_at": 2.0,
        "files": [{"path": prefix + "r/events.jsonl", "size": 3, "mtime": 1.5}],
    }


def test_a_path_listed_by_two_runs_is_refused_when_one_was_seen_before():
    # runs/a/r/ and runs/a/r/r/: the second run lies inside the first, so both may list
    # runs/a/r/r/r/events.jsonl; the memo knows the inner run alone
    memo = ValidationMemo()
    outer, inner = _runs_path_run("a"), _runs_path_run("a/r")
    outer["files"][0]["path"] = "runs/a/r/r/r/events.jsonl"
    SyncManifest.from_json(orjson.dumps(_document([outer])), memo=memo)
    SyncManifest.from_json(orjson.dumps(_document([inner])), memo=memo)
    with pytest.raises(ValueError, match=r"experiments\[1\].*files\[0\]\.path.*listed twice"):
        SyncManifest.from_json(orjson.dumps(_document([outer, inner])), memo=memo)
    runs = _lab(2)
    SyncManifest.from_json(orjson.dumps(_document(runs)), memo=memo)
    runs.append(copy.deepcopy(runs[0]))
    with pytest.raises(ValueError, match=r"experiments\[2\].*listed twice"):
        SyncManifest.from_json(orjson.dumps(_document(runs)), memo=memo)


def test_the_memo_keeps_only_the_last_manifest_s_runs():
    memo = ValidationMemo()
    SyncManifest.from_json(orjson.dumps(_document(_lab(3))), memo=memo)
    SyncManifest.from_json(orjson.dumps(_document(_lab(1))), memo=memo)
    assert len(memo) == 1

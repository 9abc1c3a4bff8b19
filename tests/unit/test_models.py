"""The manifest model: encoding, decoding, and the strict validation a client relies on.

A manifest comes from a server we do not control, so every malformed document must end in a
``ValueError`` that names the field and the run it belongs to -- never another exception,
never a silently accepted path outside the run it claims to describe.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.format import names
from runicorn.format.compression import compress, decompress_capped
from runicorn.format.models import read_header, run_digest
from runicorn.manifest import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
)

PREFIX = "proj/exp/runs/20240101_120000_abcdef/"


def _manifest() -> SyncManifest:
    return SyncManifest(
        manifest_type=ManifestType.FULL,
        revision=7,
        snapshot_id="00000000-0000-4000-8000-000000000007",
        generated_at=1_700_000_000.5,
        server_hostname="gpu-01",
        remote_root="/data/runs",
        experiments=[
            ExperimentEntry(
                run_id="20240101_120000_abcdef",
                project="proj",
                name="exp",
                status="running",
                created_at=1_700_000_000.0,
                updated_at=1_700_000_100.25,
                tags=["baseline", "lr-sweep"],
                files=[
                    FileEntry(PREFIX + "events.jsonl", 10, 1_700_000_100.25, 3, True, "ab" * 16),
                    FileEntry(PREFIX + "media/step_1.png", 3, 1_700_000_050.0, 4),
                    FileEntry(PREFIX + "meta.json", 5, 1_700_000_000.0, 1),
                ],
            ),
            ExperimentEntry(
                run_id="20240102_120000_012345",
                project="proj",
                name="other",
                status="finished",
                created_at=1_600_000_000.0,
                updated_at=1_600_000_000.0,
            ),
        ],
    )


def _document() -> dict:
    return orjson.loads(_manifest().to_json())


def _file_doc(doc: dict) -> dict:
    return doc["experiments"][0]["files"][0]


def _reject(doc: object, *fragments: str) -> str:
    """Decode ``doc`` expecting a ValueError whose message holds every fragment."""
    with pytest.raises(ValueError) as caught:
        SyncManifest.from_json(orjson.dumps(doc))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- round trips -------------------------------------------------------------------------


def test_json_round_trip_gives_an_equal_manifest():
    manifest = _manifest()
    assert SyncManifest.from_json(manifest.to_json()) == manifest


def test_gzip_round_trip_gives_an_equal_manifest():
    manifest = _manifest()
    assert SyncManifest.from_gzip(compress(manifest.to_json())) == manifest


def test_json_pieces_concatenate_to_the_document_and_compress_as_it():
    manifest = _manifest()
    pieces = manifest.to_json_pieces()
    assert len(pieces) == 3 and pieces[2] == b"}"
    assert b"".join(pieces) == manifest.to_json() == orjson.dumps(manifest.to_dict())
    assert compress(pieces) == compress(manifest.to_json())


def test_encoding_is_deterministic_and_compression_depends_on_content_only():
    assert _manifest().to_json() == _manifest().to_json()
    assert compress(_manifest().to_json()) == compress(_manifest().to_json())


def test_statistics_are_written_from_the_entries():
    assert _document()["statistics"] == {
        "total_experiments": 2,
        "total_files": 3,
        "total_bytes": 18,
    }


def test_optional_fields_are_omitted_when_absent():
    doc = _document()
    assert "tags" not in doc["experiments"][1]
    assert "tail_hash" not in doc["experiments"][0]["files"][1]


def test_unknown_fields_are_ignored():
    doc = _document()
    doc["future_field"] = {"anything": [1, 2]}
    _file_doc(doc)["future_file_field"] = True
    assert SyncManifest.from_dict(doc) == _manifest()


def test_optional_file_fields_take_their_defaults():
    doc = _document()
    doc["experiments"][0]["files"][1] = {"path": PREFIX + "media/step_1.png", "size": 3, "mtime": 1}
    entry = SyncManifest.from_dict(doc).experiments[0].files[1]
    assert (entry.priority, entry.is_append_only, entry.tail_hash) == (4, False, None)


def test_total_experiments_counts_listed_runs():
    assert _manifest().total_experiments == 2


# --- not JSON, not gzip --------------------------------------------------------------------


def test_bytes_that_are_not_json_are_refused():
    with pytest.raises(ValueError, match="not valid JSON"):
        SyncManifest.from_json(b'{"format_version": "1.0",')


def test_source_name_appears_in_the_message():
    with pytest.raises(ValueError, match=r"sftp://lab/full_manifest\.json"):
        SyncManifest.from_json(b"nope", source="sftp://lab/full_manifest.json")


def test_bytes_that_are_not_gzip_are_refused():
    with pytest.raises(ValueError, match="not valid gzip"):
        SyncManifest.from_gzip(_manifest().to_json())


def test_truncated_gzip_is_refused():
    data = compress(_manifest().to_json())
    with pytest.raises(ValueError, match="truncated"):
        SyncManifest.from_gzip(data[: len(data) // 2])


def test_empty_gzip_input_is_refused():
    with pytest.raises(ValueError, match="truncated"):
        SyncManifest.from_gzip(b"")


def test_trailing_garbage_after_gzip_is_refused():
    with pytest.raises(ValueError, match="trailing data"):
        SyncManifest.from_gzip(compress(_manifest().to_json()) + b"garbage")


def test_gzip_bomb_is_refused_at_the_cap():
    bomb = gzip.compress(b" " * (4 * 1024 * 1024), mtime=0)
    assert len(bomb) < 10_000
    with pytest.raises(ValueError, match="decompresses to more than 1048576 bytes"):
        SyncManifest.from_gzip(bomb, max_decompressed=1024 * 1024)


def test_decompression_stops_near_the_cap_instead_of_inflating_everything():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), mtime=0)
    inflater_output: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def decompress(self, data, max_length=0):
            chunk = self.inner.decompress(data, max_length)
            inflater_output.append(len(chunk))
            return chunk

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zlib, "decompressobj", Counting)
        with pytest.raises(ValueError):
            decompress_capped(bomb, 1000)
    assert sum(inflater_output) <= 1001


def test_a_manifest_exactly_at_the_cap_is_accepted():
    data = _manifest().to_json()
    assert decompress_capped(compress(data), len(data)) == data


# --- header and types ------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [[], "manifest", 3, None])
def test_a_document_that_is_not_an_object_is_refused(doc):
    _reject(doc, "top level", "expected an object")


@pytest.mark.parametrize(
    "field",
    [
        "format_version",
        "manifest_type",
        "revision",
        "snapshot_id",
        "generated_at",
        "server_hostname",
        "remote_root",
        "experiments",
    ],
)
def test_missing_required_header_field_is_named(field):
    doc = _document()
    del doc[field]
    _reject(doc, f"missing required field {field!r}")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("revision", "7", "expected an integer, got str"),
        ("revision", 7.0, "expected an integer, got float"),
        ("revision", True, "expected an integer, got bool"),
        ("revision", -1, "outside the allowed range"),
        ("snapshot_id", 7, "expected a string, got int"),
        ("generated_at", "now", "expected a number, got str"),
        ("server_hostname", None, "expected a string, got NoneType"),
        ("experiments", {}, "expected a list, got dict"),
        ("manifest_type", "partial", "expected 'full' or 'active'"),
        ("format_version", "2.0", "unsupported version"),
        ("tail_hash_algorithm", "sha1", "unsupported algorithm"),
        ("tail_hash_window", 1024, "unsupported window"),
    ],
)
def test_wrong_header_value_is_named(field, value, expected):
    doc = _document()
    doc[field] = value
    _reject(doc, field, expected)


@pytest.mark.parametrize("field", ["run_id", "project", "name", "status", "created_at", "files"])
def test_missing_required_experiment_field_names_the_entry(field):
    doc = _document()
    del doc["experiments"][1][field]
    _reject(doc, "experiments[1]", f"missing required field {field!r}")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("status", 1, "expected a string"),
        ("created_at", "yesterday", "expected a number"),
        ("updated_at", None, "expected a number"),
        ("tags", "baseline", "expected a list of strings"),
        ("tags", ["ok", 3], "expected a list of strings"),
        ("files", {}, "expected a list"),
    ],
)
def test_wrong_experiment_value_names_field_and_run(field, value, expected):
    doc = _document()
    doc["experiments"][0][field] = value
    _reject(doc, "experiments[0]", field, expected)


def test_an_experiment_that_is_not_an_object_is_refused():
    doc = _document()
    doc["experiments"][1] = ["run"]
    _reject(doc, "experiments[1]", "expected an object, got list")


@pytest.mark.parametrize("field", ["path", "size", "mtime"])
def test_missing_required_file_field_names_file_and_run(field):
    doc = _document()
    del _file_doc(doc)[field]
    _reject(doc, "experiments[0]", "files[0]", PREFIX.rstrip("/"), f"field {field!r}")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("size", -1, "outside the allowed range"),
        ("size", 2**63, "outside the allowed range"),
        ("size", 1.5, "expected an integer"),
        ("size", "10", "expected an integer"),
        ("mtime", "x", "expected a number"),
        ("mtime", True, "expected a number"),
        ("priority", 0, "outside the allowed range 1..4"),
        ("priority", 5, "outside the allowed range 1..4"),
        ("is_append_only", 1, "expected true or false"),
        ("tail_hash", "AB" * 16, "32 lowercase hex"),
        ("tail_hash", "ab" * 15, "32 lowercase hex"),
        ("tail_hash", 5, "expected a string"),
        ("path", "", "must not be empty"),
        ("path", 5, "expected a string"),
    ],
)
def test_wrong_file_value_names_field_file_and_run(field, value, expected):
    doc = _document()
    _file_doc(doc)[field] = value
    _reject(doc, f"files[0].{field}", PREFIX.rstrip("/"), expected)


def test_largest_representable_size_is_accepted():
    doc = _document()
    _file_doc(doc)["size"] = 2**63 - 1
    doc["statistics"]["total_bytes"] = 2**63 - 1 + 8
    assert SyncManifest.from_dict(doc).experiments[0].files[0].size == 2**63 - 1


@pytest.mark.parametrize("text", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_mtime_is_refused(text):
    raw = _manifest().to_json().replace(b'"mtime":1700000100.25', b'"mtime":' + text, 1)
    assert raw != _manifest().to_json()
    with pytest.raises(ValueError):
        SyncManifest.from_json(raw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_mtime_in_a_decoded_document_names_the_field(value):
    doc = _document()
    _file_doc(doc)["mtime"] = value
    with pytest.raises(ValueError, match=r"files\[0\]\.mtime: expected a finite number"):
        SyncManifest.from_dict(doc)


# --- untrusted paths (spec 3.9) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (PREFIX + "../../../../etc/passwd", "'..' component"),
        (PREFIX + "media/../meta.json", "'..' component"),
        (PREFIX + "./meta.json", "'.' or '..'"),
        (PREFIX + "media//x.png", "empty"),
        ("/etc/passwd", "is absolute"),
        ("C:/Windows/win.ini", "is absolute"),
        (PREFIX + "meta.json\0.png", "NUL"),
        ("proj/exp/runs/20240102_120000_012345/meta.json", "does not lie under"),
        ("proj/exp/runs/20240101_120000_abcdef", "does not lie under"),
        ("proj/exp/runs/20240101_120000_abcdefX/meta.json", "does not lie under"),
        ("elsewhere.txt", "does not lie under"),
    ],
)
def test_unsafe_path_is_refused_naming_the_file(path, expected):
    doc = _document()
    _file_doc(doc)["path"] = path
    _reject(doc, "files[0].path", expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("project", ".runicorn"),
        ("name", ".state"),
        ("run_id", ".."),
        ("run_id", "a/b"),
        ("name", "x\0y"),
        ("project", ""),
    ],
)
def test_hidden_or_unsafe_run_component_is_refused(field, value):
    doc = _document()
    doc["experiments"][0][field] = value
    _reject(doc, f"experiments[0].{field}")


@pytest.mark.parametrize(
    ("rest", "reason"),
    [
        ("media\\x.png", names.REASON_BACKSLASH),
        ("esc\x1b[2J.png", names.REASON_CONTROL),
        ("rtl\u202egnp.exe", names.REASON_CONTROL),
        ("zero\u200bwidth", names.REASON_CONTROL),
        (".runicorn-tmp-meta.json.x", names.REASON_RESERVED),
        ("/".join(["d"] * 70), names.REASON_TOO_DEEP),
        ("n" * 256, names.REASON_NAME_TOO_LONG),
    ],
)
def test_a_file_the_name_rule_refuses_is_skipped_and_the_rest_is_kept(rest, reason):
    doc = _document()
    _file_doc(doc)["path"] = PREFIX + rest
    manifest = SyncManifest.from_json(orjson.dumps(doc))
    assert manifest.skipped == [(PREFIX + rest, reason)]
    assert manifest.total_files == _manifest().total_files - 1
    assert manifest.protects(PREFIX[:-1])


def test_a_run_the_name_rule_refuses_is_skipped_with_its_files():
    doc = _document()
    doc["experiments"][0]["project"] = "a\\b"
    for entry in doc["experiments"][0]["files"]:
        entry["path"] = entry["path"].replace("proj/", "a\\b/", 1)
    manifest = SyncManifest.from_json(orjson.dumps(doc))
    assert [exp.project for exp in manifest.experiments] == ["proj"]
    assert manifest.skipped == [(PREFIX.replace("proj/", "a\\b/")[:-1], names.REASON_BACKSLASH)]


def test_problems_round_trip_and_protect_what_lies_under_them():
    manifest = _manifest()
    assert manifest.to_dict()["problems"] == []
    manifest.problems = [("proj", "unreadable: Permission denied")]
    decoded = SyncManifest.from_json(manifest.to_json())
    assert decoded.problems == [("proj", "unreadable: Permission denied")]
    assert decoded.protects("proj/exp/runs/r1")
    assert not decoded.protects("project2/exp/runs/r1")


def test_a_manifest_without_problems_says_nothing_about_them():
    doc = _document()
    del doc["problems"]
    assert SyncManifest.from_json(orjson.dumps(doc)).problems is None


@pytest.mark.parametrize("value", [{}, [1], [{"path": "p"}], [{"path": 1, "reason": "r"}]])
def test_a_malformed_problems_list_is_refused(value):
    doc = _document()
    doc["problems"] = value
    _reject(doc, "problems")


def test_hidden_file_inside_a_run_is_allowed():
    """The generator lists every regular file of a run, dotfiles under media/ included."""
    doc = _document()
    _file_doc(doc)["path"] = PREFIX + "media/.thumbs"
    assert SyncManifest.from_dict(doc).experiments[0].files[0].path == PREFIX + "media/.thumbs"


def test_a_path_listed_twice_is_refused():
    doc = _document()
    files = doc["experiments"][0]["files"]
    files.append(dict(files[2]))
    doc["statistics"]["total_files"] += 1
    _reject(doc, "files[3].path", "listed twice")


def test_a_run_listed_twice_is_refused():
    doc = _document()
    doc["experiments"].append(dict(doc["experiments"][1]))
    _reject(doc, "experiments[2]", "proj/other/runs/20240102_120000_012345", "listed twice")


@pytest.mark.parametrize("key", ["total_experiments", "total_files", "total_bytes"])
def test_statistics_that_disagree_with_the_entries_are_refused(key):
    doc = _document()
    doc["statistics"][key] += 1
    _reject(doc, f"statistics.{key}", "truncated or edited")


def test_a_truncated_experiment_list_is_caught_by_the_statistics():
    doc = _document()
    doc["experiments"].pop()
    _reject(doc, "statistics.total_experiments")


def test_statistics_that_are_not_an_object_are_refused():
    doc = _document()
    doc["statistics"] = [1, 2, 3]
    _reject(doc, "statistics", "expected an object")


# --- read_header ---------------------------------------------------------------------------


def test_read_header_finds_the_header_in_our_first_kilobytes():
    data = _manifest().to_json()
    assert read_header(data[:1024]) == {
        "format_version": "1.0",
        "manifest_type": "full",
        "revision": 7,
        "snapshot_id": "00000000-0000-4000-8000-000000000007",
    }


def test_read_header_needs_the_start_of_the_experiments_list():
    data = _manifest().to_json()
    cut = data.index(b'"experiments"')
    assert read_header(data[:cut]) is None


def test_read_header_gives_none_for_foreign_field_order():
    doc = _document()
    foreign = {"experiments": doc.pop("experiments"), **doc}
    assert read_header(orjson.dumps(foreign)) is None


def test_read_header_gives_none_when_a_field_is_missing():
    doc = _document()
    del doc["snapshot_id"]
    assert read_header(orjson.dumps(doc)) is None


def test_read_header_is_not_fooled_by_a_field_name_inside_a_string():
    doc = _document()
    doc["server_hostname"] = '"revision":99'
    assert read_header(orjson.dumps(doc))["revision"] == 7


# --- fuzzing: nothing but ValueError, ever -----------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from([PREFIX, PREFIX + "meta.json", "..", "/", "full", "active", "1.0", "proj"]),
)
_json_value = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = [*_document(), "run_id", "project", "name", "files", "path", "size", "mtime"]


@st.composite
def _mutated_documents(draw) -> dict:
    """A valid manifest with a few fields replaced, deleted or added at random depths."""
    doc = _document()
    targets = [doc, doc["experiments"][0], _file_doc(doc), doc["statistics"], doc["experiments"]]
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(targets))
        if isinstance(target, list):
            target.append(draw(_json_value))
            continue
        key = draw(st.sampled_from(_FIELDS) | st.sampled_from(sorted(target)))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(_json_value)
    return doc


def _only_value_error(call, data) -> None:
    with contextlib.suppress(ValueError):
        call(data)


_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_value_error(data):
    _only_value_error(SyncManifest.from_json, data)
    _only_value_error(SyncManifest.from_gzip, data)


@_fuzz
@given(st.binary(max_size=200))
def test_random_bytes_behind_a_gzip_header_raise_only_value_error(data):
    _only_value_error(SyncManifest.from_gzip, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + data)


@_fuzz
@given(_json_value)
def test_random_json_documents_raise_only_value_error(doc):
    data = orjson.dumps(doc)
    _only_value_error(SyncManifest.from_json, data)
    _only_value_error(SyncManifest.from_gzip, compress(data))


@_fuzz
@given(_mutated_documents())
def test_mutated_manifests_raise_only_value_error(doc):
    _only_value_error(SyncManifest.from_json, orjson.dumps(doc))


@_fuzz
@given(_mutated_documents(), st.integers(0, 2000))
def test_truncated_manifests_raise_only_value_error(doc, cut):
    data = compress(orjson.dumps(doc))
    _only_value_error(SyncManifest.from_gzip, data[:cut])


def test_format_constants_match_the_spec():
    assert ManifestFormat.VERSION == "1.0"
    assert ManifestFormat.TAIL_HASH_WINDOW == 4096
    assert ManifestType.FULL.filename == "full_manifest.json"
    assert ManifestType.ACTIVE.filename == "active_manifest.json"


# --- runs-path runs (runs/<path...>/<run_id>/) ---------------------------------------------

RUN_ID = "20240101_120000_abcdef"


def _runs_path_document(path: str = "cv/yolo") -> dict:
    prefix = f"runs/{path}/{RUN_ID}/" if path else f"runs/{RUN_ID}/"
    manifest = _manifest()
    manifest.experiments = [
        ExperimentEntry(
            run_id=RUN_ID,
            project="runs",
            name=path,
            path=path,
            status="finished",
            created_at=1.0,
            updated_at=2.0,
            files=[FileEntry(prefix + "meta.json", 5, 2.0, 1)],
        )
    ]
    return orjson.loads(manifest.to_json())


@pytest.mark.parametrize("path", ["", "cv", "cv/yolo/ablation-2"])
def test_a_runs_path_run_round_trips_with_its_path(path):
    data = orjson.dumps(_runs_path_document(path))
    manifest = SyncManifest.from_json(data)
    exp = manifest.experiments[0]
    assert (exp.project, exp.name, exp.path) == ("runs", path, path)
    assert exp.prefix == (f"runs/{path}/{RUN_ID}/" if path else f"runs/{RUN_ID}/")
    assert manifest.to_json() == data


def test_path_follows_name_in_the_document_and_is_absent_for_project_name_runs():
    experiment = _runs_path_document()["experiments"][0]
    assert list(experiment)[:5] == ["run_id", "project", "name", "path", "status"]
    assert "path" not in _document()["experiments"][0]


def test_a_run_of_project_runs_without_a_path_is_refused_with_a_hint():
    doc = _runs_path_document()
    del doc["experiments"][0]["path"]
    _reject(doc, "experiments[0]", "runs-path layout", "'path'")


@pytest.mark.parametrize(
    ("field", "value"),
    [("project", "cv"), ("name", "cv/other"), ("name", "cv"), ("path", "cv/other")],
)
def test_project_name_and_path_of_a_runs_path_run_must_agree(field, value):
    doc = _runs_path_document()
    doc["experiments"][0][field] = value
    _reject(doc, "experiments[0]")


@pytest.mark.parametrize(
    "path", ["..", "cv/..", "cv//yolo", "/cv", "cv/", ".recycle", "cv/.x", "a\\b", "a\0b"]
)
def test_unsafe_run_paths_are_refused(path):
    doc = _runs_path_document()
    doc["experiments"][0]["path"] = doc["experiments"][0]["name"] = path
    _reject(doc, "experiments[0]")


@pytest.mark.parametrize("value", [1, None, ["cv"]])
def test_a_path_that_is_not_a_string_is_refused(value):
    doc = _runs_path_document()
    doc["experiments"][0]["path"] = value
    doc["experiments"][0]["project"] = "runs"
    _reject(doc, "experiments[0]")


@pytest.mark.parametrize(
    "file_path",
    [
        f"runs/cv/{RUN_ID}/meta.json",  # another run's directory: one level up
        f"runs/cv/yolo/other/{RUN_ID}/meta.json",
        "runs/cv/yolo/meta.json",
        f"cv/yolo/runs/{RUN_ID}/meta.json",  # the project-name spelling of the same run
        f"runs/cv/yolo/{RUN_ID}/../x",
        f"runs/cv/yolo/{RUN_ID}/",
    ],
)
def test_files_of_a_runs_path_run_must_lie_under_its_directory(file_path):
    doc = _runs_path_document()
    doc["experiments"][0]["files"][0]["path"] = file_path
    _reject(doc, "experiments[0]", "files[0].path")


def test_the_same_run_id_in_both_layouts_is_two_runs():
    doc = _runs_path_document("cv/yolo")
    legacy = dict(doc["experiments"][0], project="cv", name="yolo")
    del legacy["path"]
    legacy["files"] = [dict(legacy["files"][0], path=f"cv/yolo/runs/{RUN_ID}/meta.json")]
    doc["experiments"].append(legacy)
    doc["statistics"]["total_experiments"] = 2
    doc["statistics"]["total_files"] = 2
    doc["statistics"]["total_bytes"] = 10
    manifest = SyncManifest.from_json(orjson.dumps(doc))
    assert [exp.prefix for exp in manifest.experiments] == [
        f"runs/cv/yolo/{RUN_ID}/",
        f"cv/yolo/runs/{RUN_ID}/",
    ]


# --- manifests of 0.5.x generators ---------------------------------------------------------


def test_a_manifest_without_an_algorithm_has_md5_tail_hashes():
    doc = _document()
    del doc["tail_hash_algorithm"]
    assert SyncManifest.from_json(orjson.dumps(doc)).tail_hashes_by == "md5"
    assert _manifest().tail_hashes_by == "blake3-128"


def test_md5_may_also_be_named():
    doc = _document()
    doc["tail_hash_algorithm"] = "md5"
    assert SyncManifest.from_json(orjson.dumps(doc)).tail_hashes_by == "md5"


def test_read_header_finds_the_header_of_an_indented_manifest():
    import json

    doc = _document()
    del doc["tail_hash_algorithm"]
    text = json.dumps(doc, indent=2).encode()
    assert read_header(text[:1024]) == {
        "format_version": "1.0",
        "manifest_type": "full",
        "revision": 7,
        "snapshot_id": "00000000-0000-4000-8000-000000000007",
    }


# --------------------------------------------------------------------------- known runs left out


def _known(manifest: SyncManifest) -> dict[str, bytes]:
    return {exp.prefix: run_digest(orjson.dumps(exp.to_dict())) for exp in manifest.experiments}


def test_runs_listed_exactly_as_known_are_left_out_and_the_rest_is_decoded_as_before():
    manifest = _manifest()
    known = _known(manifest)
    doc = _document()
    doc["experiments"][1]["status"] = "failed"  # the second run changed
    doc["statistics"]["total_experiments"] = 2

    decoded = SyncManifest.from_json(orjson.dumps(doc), known_runs=known)

    assert decoded.unchanged == [PREFIX]
    assert [exp.run_id for exp in decoded.experiments] == ["20240102_120000_012345"]
    assert decoded.experiments[0] == SyncManifest.from_json(orjson.dumps(doc)).experiments[1]
    assert SyncManifest.from_json(orjson.dumps(doc)).unchanged == []


def test_a_run_left_out_still_counts_for_the_statistics_and_for_being_listed_twice():
    known = _known(_manifest())
    doc = _document()
    doc["statistics"]["total_files"] += 1  # a truncated or edited manifest
    with pytest.raises(ValueError, match=r"statistics\.total_files"):
        SyncManifest.from_json(orjson.dumps(doc), known_runs=known)
    doc = _document()
    doc["experiments"].append(doc["experiments"][0])
    with pytest.raises(ValueError, match="listed twice"):
        SyncManifest.from_json(orjson.dumps(doc), known_runs=known)


def test_a_known_run_whose_directory_nests_with_another_run_is_decoded():
    outer = _runs_path_document("cv")
    inner = _runs_path_document(f"cv/{RUN_ID}")  # lies inside the outer run's directory
    outer["experiments"] += inner["experiments"]
    outer.pop("statistics")
    known = _known(SyncManifest.from_json(orjson.dumps(outer)))

    decoded = SyncManifest.from_json(orjson.dumps(outer), known_runs=known)

    assert decoded.unchanged == []
    assert len(decoded.experiments) == 2

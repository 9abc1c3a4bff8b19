"""A large manifest is parsed a few runs at a time, cut where runs meet: the result (and
every refusal) is the one parsing it whole gives, whatever the strings hold."""

from __future__ import annotations

import gzip
import tracemalloc

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.format import compression, models
from runicorn.manifest import ExperimentEntry, FileEntry, ManifestType, SyncManifest

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# names that put the run boundary, brackets or escapes inside strings
TRICKY = ["plain", '},{"run_id":', '"]},{"run_id":"x', "a\\b", "]}", "{", "é☃"]


def _manifest(runs: list[tuple[str, str, int]]) -> SyncManifest:
    experiments = []
    for number, (name, tag, files) in enumerate(runs):
        run_id = f"20240101_120000_{number:06x}"
        prefix = f"proj/exp/runs/{run_id}/"
        experiments.append(
            ExperimentEntry(
                run_id=run_id,
                project="proj",
                name="exp",
                status="finished",
                created_at=1.0,
                updated_at=2.0,
                tags=[tag, name],
                files=[FileEntry(f"{prefix}f{index}.txt", index, 3.0, 4) for index in range(files)],
            )
        )
    return SyncManifest(
        manifest_type=ManifestType.FULL,
        revision=3,
        snapshot_id="00000000-0000-4000-8000-000000000003",
        generated_at=5.0,
        server_hostname="gpu",
        remote_root="/data",
        experiments=experiments,
    )


def _outcome(data: bytes) -> tuple:
    try:
        return ("ok", SyncManifest.from_json(data).to_json())
    except ValueError as error:
        return ("refused", str(error))


runs = st.lists(
    st.tuples(st.sampled_from(TRICKY), st.sampled_from(TRICKY), st.integers(0, 3)),
    min_size=0,
    max_size=12,
)


@SETTINGS
@given(runs=runs, piece=st.sampled_from([1, 40, 200, 10_000]))
def test_parsing_in_pieces_gives_the_whole_documents_manifest(
    monkeypatch: pytest.MonkeyPatch, runs: list, piece: int
) -> None:
    data = _manifest(runs).to_json()
    whole = _outcome(data)
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", piece)
    assert _outcome(data) == whole
    assert whole[0] == "ok"


BROKEN = [
    lambda d: d.replace(b'"size":1,', b'"size":"1",', 1),  # refused by the validator
    lambda d: d.replace(b'"run_id":', b'"run_id" ', 1),  # not JSON
    lambda d: d[:-2] + b"]]}",  # a bracket too many at the end
    lambda d: d.replace(b'},{"run_id":', b'},{"run_id":', 1) + b" ",  # trailing space
    lambda d: d.replace(b',"experiments":', b',"experiments":[],"experiments":', 1),
    # an unknown field whose value holds the boundary one level down: cut wrongly there,
    # a piece does not parse, and the document is parsed whole
    lambda d: d.replace(b'"status":', b'"x":[{"a":1},{"run_id":2}],"status":'),
]


@pytest.mark.parametrize("edit", BROKEN)
def test_broken_documents_are_refused_as_when_parsed_whole(
    monkeypatch: pytest.MonkeyPatch, edit
) -> None:
    data = edit(_manifest([("a", "b", 2)] * 6).to_json())
    whole = _outcome(data)
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", 50)
    assert _outcome(data) == whole


def test_large_manifests_are_cut_into_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _manifest([("a", "b", 3)] * 20).to_json()
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", 300)
    split = models._split_document(data)
    assert split is not None
    header, pieces = split
    assert header["revision"] == 3
    assert len(pieces) > 3
    parsed = list(models._runs(data, pieces))
    assert parsed == orjson.loads(data)["experiments"]


def _outcome_gzip(data: bytes) -> tuple:
    try:
        return ("ok", SyncManifest.from_gzip(gzip.compress(data, mtime=0)).to_json())
    except ValueError as error:
        return ("refused", str(error))


@SETTINGS
@given(
    runs=runs,
    piece=st.sampled_from([1, 40, 200, 10_000]),
    step=st.sampled_from([7, 64, 1000]),
    keep=st.sampled_from([0, 10**9]),
)
def test_a_gzip_manifest_parsed_as_it_inflates_gives_the_whole_documents_manifest(
    monkeypatch: pytest.MonkeyPatch, runs: list, piece: int, step: int, keep: int
) -> None:
    data = _manifest(runs).to_json()
    whole = _outcome(data)
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", piece)
    monkeypatch.setattr(compression, "_STEP_BYTES", step)
    monkeypatch.setattr(compression, "KEEP_BYTES", keep)
    assert _outcome_gzip(data) == whole
    assert whole[0] == "ok"


@pytest.mark.parametrize("keep", [0, 10**9])
@pytest.mark.parametrize("edit", BROKEN)
def test_broken_gzip_documents_are_refused_as_when_parsed_whole(
    monkeypatch: pytest.MonkeyPatch, edit, keep: int
) -> None:
    data = edit(_manifest([("a", "b", 2)] * 6).to_json())
    whole = _outcome(data)
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", 50)
    monkeypatch.setattr(compression, "_STEP_BYTES", 37)
    monkeypatch.setattr(compression, "KEEP_BYTES", keep)
    assert _outcome_gzip(data) == whole


@pytest.mark.parametrize("keep", [0, 10**9])
def test_a_gzip_manifest_is_never_held_whole_while_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """What decoding holds beyond the manifest it returns stays below the text's size
    (about 0.7 of it here, 1.7 when the text was held whole): the text is let go of as it
    is parsed. A bound on allocations, not a time."""
    data = _manifest([("a", "b", 40)] * 800).to_json()
    compressed = gzip.compress(data, mtime=0)
    monkeypatch.setattr(models, "PARSE_PIECE_BYTES", 32 * 1024)
    monkeypatch.setattr(compression, "_STEP_BYTES", 16 * 1024)
    monkeypatch.setattr(compression, "KEEP_BYTES", keep)
    tracemalloc.start()
    try:
        manifest = SyncManifest.from_gzip(compressed)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest.total_files == 32_000
    assert len(data) > 2_000_000
    assert peak - held < len(data)

"""The change journal behind an active manifest's ``changes_since``.

The promise checked here: for every full manifest an active manifest names, the active
manifest lists every run whose entry differs from that full manifest's, whatever the
mtimes say (runs copied in with old mtimes, tags edited). Both backends (``backend``).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from test_generator import HOUR, NOW, _append, _run, _write, lab, make_generator

from runicorn.format.compression import compress
from runicorn.format.models import SyncManifest
from runicorn.generate import journal
from runicorn.generate.journal import JOURNAL_FILENAME
from runicorn.manifest import ManifestType

__all__ = ["lab", "make_generator"]  # the fixtures, shared with the generator's tests


@pytest.fixture(autouse=True)
def no_racy_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trees here are written just before they are scanned: with the 2 s margin every
    run would count as changed at every generation (see the test of the margin itself)."""
    monkeypatch.setattr(journal, "REUSE_MARGIN_NS", 0)


def _ids(manifest: SyncManifest) -> list[str]:
    return [exp.run_id for exp in manifest.experiments]


def _entries_by_run(manifest: SyncManifest) -> dict[str, bytes]:
    return {exp.run_id: orjson.dumps(exp.to_dict()) for exp in manifest.experiments}


def test_an_active_manifest_names_the_full_one_and_lists_what_changed_since(
    lab: Path, make_generator
):
    generator = make_generator(lab)
    full, _ = generator.generate(ManifestType.FULL)
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since == [full.snapshot_id]
    assert _ids(active) == []  # every run is older than the window, and none changed

    # a run copied in with its old mtimes, and an old run whose tags were edited: both
    # outside the activity window, both different from the full manifest
    _run(lab, "proj", "copied", "20231201_000000_000009", mtime=NOW - 30 * 24 * HOUR)
    (lab / ".experiments_metadata.json").write_text(
        '{"20240101_000000_000003": {"tags": ["best"]}}'
    )
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since == [full.snapshot_id]
    assert set(_ids(active)) == {"20231201_000000_000009", "20240101_000000_000003"}

    newest, _ = generator.generate(ManifestType.FULL)
    for exp in active.experiments:  # listed as the full manifest lists them
        assert _entries_by_run(newest)[exp.run_id] == orjson.dumps(exp.to_dict())


def test_every_full_manifest_in_the_window_is_named_and_covered(lab: Path, make_generator):
    generator = make_generator(lab)
    first, _ = generator.generate(ManifestType.FULL)
    run = lab / "proj" / "exp" / "runs" / "20240101_000000_000001"
    _append(run / "logs.txt", "one more line\n")
    os.utime(run / "logs.txt", (NOW - 20 * HOUR, NOW - 20 * HOUR))  # an mtime from the past
    second, _ = generator.generate(ManifestType.FULL)
    assert second.revision == first.revision + 1
    active, _ = generator.generate(ManifestType.ACTIVE)
    # named oldest first; the run changed between the two is listed for the first's sake
    assert active.changes_since == [first.snapshot_id, second.snapshot_id]
    assert _ids(active) == ["20240101_000000_000001"]


def test_a_full_manifest_older_than_the_window_is_no_longer_named(lab: Path, make_generator):
    clock = [NOW]
    generator = make_generator(lab, clock=lambda: clock[0])
    first, _ = generator.generate(ManifestType.FULL)
    _write(lab / "proj" / "exp" / "runs" / "20240101_000000_000002" / "summary.json", "{}", NOW)
    clock[0] = NOW + 2 * HOUR
    second, _ = generator.generate(ManifestType.FULL)
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since == [second.snapshot_id]
    assert first.snapshot_id not in active.changes_since
    assert _ids(active) == []


def test_the_active_manifest_is_republished_when_it_names_a_new_full_one(lab: Path, make_generator):
    generator = make_generator(lab)
    generator.generate(ManifestType.FULL)
    before, _ = generator.generate(ManifestType.ACTIVE)
    again, _ = generator.generate(ManifestType.ACTIVE)
    assert again.revision == before.revision  # nothing new: not republished
    _write(lab / "proj" / "exp" / "runs" / "20240101_000000_000002" / "summary.json", "{}", NOW)
    full, _ = generator.generate(ManifestType.FULL)
    after, _ = generator.generate(ManifestType.ACTIVE)
    assert after.revision == before.revision + 1
    assert after.changes_since is not None and after.changes_since[-1] == full.snapshot_id


def test_a_lost_or_corrupt_journal_names_nothing_until_the_next_full_manifest(
    lab: Path, make_generator
):
    generator = make_generator(lab)
    generator.generate(ManifestType.FULL)
    journal = lab / ".runicorn" / JOURNAL_FILENAME
    journal.write_bytes(b"{not json")
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since is None
    _write(lab / "proj" / "exp" / "runs" / "20240101_000000_000002" / "summary.json", "{}", NOW)
    full, _ = generator.generate(ManifestType.FULL)
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since == [full.snapshot_id]


def test_a_full_manifest_published_by_someone_else_is_never_named(lab: Path, make_generator):
    generator = make_generator(lab)
    ours, _ = generator.generate(ManifestType.FULL)
    output = lab / ".runicorn" / "full_manifest.json"
    foreign = SyncManifest.from_json(output.read_bytes())
    foreign.revision += 1
    foreign.snapshot_id = "published-by-someone-else"
    output.write_bytes(foreign.to_json())
    output.with_name(output.name + ".gz").write_bytes(compress(foreign.to_json()))
    active, _ = generator.generate(ManifestType.ACTIVE)
    # a client that applied the foreign manifest finds it named nowhere: no shortcut
    assert active.changes_since == [ours.snapshot_id]


def test_a_run_written_within_the_margin_of_a_scan_counts_as_changed_again(
    lab: Path, make_generator, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(journal, "REUSE_MARGIN_NS", 3600 * 10**9)
    generator = make_generator(lab)
    full, _ = generator.generate(ManifestType.FULL)
    active, _ = generator.generate(ManifestType.ACTIVE)
    # nothing changed, but every file's ctime is within the margin of the previous scan: a
    # write in the same timestamp tick would have left the stat as it was
    assert active.changes_since == [full.snapshot_id]
    assert len(_ids(active)) == 3


@pytest.mark.parametrize(
    "value",
    [["a", 1], "snapshot", [""], ["x"] * 1025],
    ids=["not-a-string", "not-a-list", "empty-id", "too-many"],
)
def test_a_malformed_changes_since_is_refused(value):
    manifest = SyncManifest(
        manifest_type=ManifestType.ACTIVE,
        revision=1,
        snapshot_id="s",
        generated_at=NOW,
        server_hostname="h",
        remote_root="/r",
    )
    document = manifest.to_dict()
    document["changes_since"] = value
    with pytest.raises(ValueError, match="changes_since"):
        SyncManifest.from_dict(document)


def test_changes_since_survives_the_round_trip_and_precedes_the_experiments():
    manifest = SyncManifest(
        manifest_type=ManifestType.ACTIVE,
        revision=3,
        snapshot_id="s",
        generated_at=NOW,
        server_hostname="h",
        remote_root="/r",
        changes_since=["full-1", "full-2"],
    )
    data = manifest.to_json()
    assert data.index(b'"changes_since"') < data.index(b'"experiments"')
    assert SyncManifest.from_json(data) == manifest


def test_a_generator_keeping_its_tree_keeps_the_same_promise(lab: Path, make_generator):
    generator = make_generator(lab)
    tree = generator.keep_tree()
    full, _ = generator.generate(ManifestType.FULL)
    _run(lab, "proj", "copied", "20231201_000000_000009", mtime=NOW - 30 * 24 * HOUR)
    tree.rescan()  # what polling reports
    active, _ = generator.generate(ManifestType.ACTIVE)
    assert active.changes_since == [full.snapshot_id]
    assert _ids(active) == ["20231201_000000_000009"]
    # a one-shot generation beside it shares the journal and agrees
    other, _ = make_generator(lab).generate(ManifestType.ACTIVE)
    assert _ids(other) == ["20231201_000000_000009"]


def _sig(count: int, ctime: int) -> journal.Signature:
    return (count, count * ctime, ctime)


def test_an_observation_of_reported_runs_marks_exactly_those_that_changed(tmp_path: Path):
    """A publisher's tree reports the runs it rebuilt: the journal compares only those, and
    marks exactly the ones whose signature moved, as comparing every run would."""
    runs = {f"p/e/runs/r{i}/": (f"r{i}", _sig(3, 1_000 + i)) for i in range(6)}

    def every() -> list[tuple[str, str, journal.Signature]]:
        return [(prefix, run_id, sig) for prefix, (run_id, sig) in runs.items()]

    incremental = journal.ChangeJournal(tmp_path / "a")
    compared = journal.ChangeJournal(tmp_path / "b")
    for directory in ("a", "b"):
        (tmp_path / directory).mkdir()
    for one in (incremental, compared):
        first = one.observe(every(), {}, 10**12)
        one.record_full(journal.FullRecord("full-1", 1, first.seq, 100.0), horizon=0.0)
    written = incremental.path.stat().st_mtime_ns, incremental.path.stat().st_ino

    # r1 appended to, r2 rebuilt but its signature unchanged, r6 new
    runs["p/e/runs/r1/"] = ("r1", _sig(3, 5_000))
    runs["p/e/runs/r6/"] = ("r6", _sig(1, 5_000))
    reported = [(p, *runs[p]) for p in ("p/e/runs/r1/", "p/e/runs/r2/", "p/e/runs/r6/")]
    seen = incremental.observe(lambda: [], {}, 2 * 10**12, reported=reported, run_count=7)
    assert seen.changed == {"p/e/runs/r1/": seen.seq, "p/e/runs/r6/": seen.seq}
    assert seen.changed == compared.observe(every(), {}, 2 * 10**12).changed
    # not written until the next full manifest is recorded
    assert (incremental.path.stat().st_mtime_ns, incremental.path.stat().st_ino) == written

    # nothing reported, nothing moved: the same number, nothing new
    again = incremental.observe(lambda: [], {}, 3 * 10**12, reported=[], run_count=7)
    assert (again.seq, again.changed) == (seen.seq, seen.changed)

    # a removed run shows in the count: every run is compared
    del runs["p/e/runs/r4/"]
    after = incremental.observe(every, {}, 4 * 10**12, reported=[], run_count=6)
    assert after.changed == compared.observe(every(), {}, 4 * 10**12).changed
    assert after.seq == seen.seq + 1

    # tags edited: compared for every run as well
    tags = {"r3": ["best"]}
    tagged = incremental.observe(every, tags, 5 * 10**12, reported=[], run_count=6)
    assert tagged.changed["p/e/runs/r3/"] == tagged.seq
    assert tagged.changed == compared.observe(every(), tags, 5 * 10**12).changed

    # the file written at the next full manifest holds what the observations saw
    incremental.record_full(journal.FullRecord("full-2", 2, tagged.seq, 200.0), horizon=0.0)
    fresh = orjson.loads(incremental.path.read_bytes())
    assert fresh["seq"] == tagged.seq
    assert fresh["runs"]["p/e/runs/r1/"][4] == seen.seq

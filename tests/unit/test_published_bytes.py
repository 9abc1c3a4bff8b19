"""The two generation paths publish the same bytes, and the bytes are what the format says.

A one-shot generation scans the whole tree; the publisher keeps a live tree and assembles
its manifests from runs held encoded (:meth:`ManifestGenerator.keep_tree`). Both end in one
publish tail. Here a sample lab goes through training steps (appends, finished runs, new,
removed and soft-deleted runs, new tags), and after each step both paths publish full and
active manifests with the same clock, snapshot ids and hostname. Checked at every
publication, on both backends:

- the two paths' ``.json`` and ``.json.gz`` are identical, byte for byte;
- each ``.json`` is what the format's strict reader accepts and its model encodes again,
  byte for byte (an encoding independent of the generator's), and the ``.json.gz`` holds it;
- the manifest a generation returns equals the one its bytes decode to;
- the publisher's delta names the active publication before it as its base, has the whole
  active manifest's header, and lists exactly the runs whose entry differs from the base's
  (worked out here from the two published documents).

:func:`publish_scenario` also serves a before/after comparison of two code versions: it
returns every published file by name.
"""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import orjson
import pytest

from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import StepInfo, build_sample_lab, training_step
from runicorn.format.delta import delta_filename, read_delta
from runicorn.format.models import ManifestFormat, ManifestType, SyncManifest
from runicorn.format.published import PublishedManifest
from runicorn.generate.generator import ManifestGenerator

NOW = 1_735_689_600.0
"""The lab's clock: its files are far older than the real clock, so every scan settles."""
STEP_SECONDS = 3 * 3600.0
ACTIVE = ManifestType.ACTIVE
FULL = ManifestType.FULL
DELTA = delta_filename(ACTIVE.filename)


def _generator(root: Path, out: Path, backend: Backend, clock: list[float]) -> ManifestGenerator:
    ids = itertools.count(1)
    return ManifestGenerator(
        root,
        out,
        backend=backend,
        clock=lambda: clock[0],
        uuid_factory=lambda: f"snapshot-{next(ids)}",
        hostname="lab",
    )


def _changed_directories(step: StepInfo) -> set[str]:
    """The directories an inotify source would report for ``step`` (relative to the root)."""
    files = [
        *step.appended,
        *step.partial,
        *step.completed,
        *step.rewritten,
        *step.added_files,
        *step.touched_locks,
    ]
    directories = {str(Path(path).parent) for path in files}
    for run in [*step.added, *step.removed, *step.soft_deleted, *step.finished]:
        directories.update((run, str(Path(run).parent)))
    return {"" if directory == "." else directory for directory in directories}


def _retag(root: Path) -> None:
    """Give the first run a tag it did not have: its entry changes, its files do not."""
    path = root / ".experiments_metadata.json"
    document = orjson.loads(path.read_bytes())
    first = sorted(document)[0]
    entry = document[first]
    tags = entry.get("tags", []) if isinstance(entry, dict) else entry
    tags = [*tags, "retagged"]
    document[first] = {**entry, "tags": tags} if isinstance(entry, dict) else tags
    path.write_bytes(orjson.dumps(document))


Publication = tuple[str, ManifestType, SyncManifest, dict[str, bytes]]
"""Which path published, the type, the manifest its generation returned, and the files
published with it (by name)."""


def publish_scenario(work: Path, backend: Backend, runs: int = 40) -> list[Publication]:
    """Build a lab in ``work``, step it, and publish from both paths after every step.

    Each path publishes full then active (the tree path's with its delta), in the same
    order so that the snapshot ids match. Returns every publication."""
    root = work / "lab"
    build_sample_lab(root, runs, seed=7, scale=0.01, now=NOW)
    clock = [NOW]
    scanning = _generator(root, work / "scan", backend, clock)
    live = _generator(root, work / "tree", backend, clock)
    tree = live.keep_tree()
    publications: list[Publication] = []

    def publish(path: str, generator: ManifestGenerator, kind: ManifestType) -> None:
        manifest, output = generator.generate(kind)
        names = [output.name, output.name + ManifestFormat.GZIP_SUFFIX]
        if path == "tree" and kind is ACTIVE and (output.parent / DELTA).exists():
            names.append(DELTA)
        files = {name: (output.parent / name).read_bytes() for name in names}
        publications.append((path, kind, manifest, files))

    for number in range(4):
        if number:
            clock[0] = NOW + number * STEP_SECONDS
            step = training_step(root, seed=number, now=clock[0], partial_line=number == 1)
            if number == 3:
                _retag(root)
                tree.rescan()  # a walk, as after lost events or with polling
            else:
                tree.changed(_changed_directories(step))
        publish("scan", scanning, FULL)
        publish("scan", scanning, ACTIVE)
        publish("tree", live, FULL)
        publish("tree", live, ACTIVE)
    publish("scan", scanning, FULL)  # nothing changed: the fast path returns what is published
    return publications


def _runs_by_key(document: bytes) -> dict[tuple[str, str, str], dict[str, object]]:
    """A published document's runs by (project, name, run id), in manifest order."""
    runs = orjson.loads(document)["experiments"]
    return {(run["project"], run["name"], run["run_id"]): run for run in runs}


def _header(document: bytes) -> dict[str, object]:
    header = orjson.loads(document)
    del header["experiments"], header["statistics"]
    return header


@pytest.fixture
def publications(tmp_path: Path, backend: Backend) -> list[Publication]:
    return publish_scenario(tmp_path, backend)


def test_both_paths_publish_the_same_bytes(publications):
    scan = [(kind, files) for path, kind, _, files in publications[:-1] if path == "scan"]
    tree = [(kind, files) for path, kind, _, files in publications if path == "tree"]
    assert len(scan) == len(tree) == 8
    by_type = {kind: [files for k, files in tree if k is kind] for kind in (FULL, ACTIVE)}
    for kind, files in scan:
        expected = by_type[kind].pop(0)
        for name, data in files.items():
            assert expected[name] == data, (kind, name)
    revisions = [
        orjson.loads(files[ACTIVE.filename])["revision"] for k, files in tree if k is ACTIVE
    ]
    assert revisions == [1, 2, 3, 4]  # every step changed the active manifest


def test_every_publication_is_what_the_format_reads_and_encodes(publications):
    for path, kind, manifest, files in publications:
        document = files[kind.filename]
        assert gzip.decompress(files[kind.filename + ManifestFormat.GZIP_SUFFIX]) == document
        decoded = SyncManifest.from_json(document)
        assert decoded.skipped == [] and decoded.problems == []
        assert orjson.dumps(decoded.to_dict()) == document, (path, kind)
        assert manifest == decoded, (path, kind)
        assert manifest.statistics == decoded.statistics


def test_an_unchanged_tree_returns_the_published_manifest_undecoded(publications):
    *_, (path, kind, manifest, files) = publications
    assert (path, kind) == ("scan", FULL)
    assert isinstance(manifest, PublishedManifest)
    assert manifest.statistics == SyncManifest.from_json(files[FULL.filename]).statistics
    assert not manifest.is_decoded  # the statistics came from the header


def test_each_delta_lists_exactly_what_changed_since_its_base(publications):
    actives = [files for path, kind, _, files in publications if (path, kind) == ("tree", ACTIVE)]
    assert DELTA not in actives[0]  # the first publication has nothing to build on
    for before, after in itertools.pairwise(actives):
        assert DELTA in after
        found = read_delta(after[DELTA], ManifestFormat.MAX_DECOMPRESSED_BYTES)
        assert found is not None
        base_revision, base_snapshot, document = found
        base = orjson.loads(before[ACTIVE.filename])
        assert (base_revision, base_snapshot) == (base["revision"], base["snapshot_id"])
        whole = after[ACTIVE.filename]
        assert _header(document) == _header(whole)
        decoded = SyncManifest.from_json(document)
        assert orjson.dumps(decoded.to_dict()) == document
        previous = _runs_by_key(before[ACTIVE.filename])
        expected = [run for key, run in _runs_by_key(whole).items() if previous.get(key) != run]
        assert orjson.loads(document)["experiments"] == expected
        assert expected  # every step changed some run

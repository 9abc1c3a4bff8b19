"""Hostile manifests planted on a real sshd, end to end through the sync client (issue 5, item 4).

Whatever a server publishes, a sync raises nothing but ``ValueError`` (refused manifest) or
``OSError`` (unreadable one), never writes outside its cache, leaves no temp file behind, and a
refused manifest changes nothing in the cache. The service then falls back to the legacy walk
and still mirrors the server. Cases proven elsewhere (and not repeated here): ``..``, absolute
paths, a hidden project, NaN mtimes, a run listed twice and a wrong ``remote_root`` refused
(test_manifest_sync.py::test_hostile_manifest_is_refused_and_nothing_is_written), a symlinked
project directory (::test_symlinked_directory_in_the_cache_is_never_followed), a small gzip bomb
and a manifest over a tiny cap (::test_gzip_bomb_is_refused, ::test_manifest_file_over_the_cap_is_
refused), decoder fuzzing without I/O (test_models.py), service fallback for ``..`` and absolute
paths (test_service.py).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import itertools
import json
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import orjson
import paramiko
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.lab import (
    Lab,
    assert_cache_equals_server,
    cache_files,
    server_files,
    temp_files,
)
from harness.sshd import SshServer
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import training_step
from runicorn.format.layout import MANIFEST_DIRNAME, run_prefix
from runicorn.format.models import ManifestFormat
from runicorn.remote_storage import MetadataSyncService
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.client import ManifestSyncClient

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=4)]

GIB = 1024**3


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel directory beside the cache: nothing may ever appear or change in it."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "precious.txt").write_bytes(b"do not touch\n")
    return directory


def _document(lab: Lab) -> dict:
    return orjson.loads((lab.manifest_dir / "full_manifest.json").read_bytes())


def _plant(lab: Lab, data: bytes, *, gz: bool = False) -> None:
    """Publish exactly these bytes as the full manifest (and nothing else)."""
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        (lab.manifest_dir / name).unlink(missing_ok=True)
    name = "full_manifest.json.gz" if gz else "full_manifest.json"
    (lab.manifest_dir / name).write_bytes(data)


def _plant_document(lab: Lab, document: dict, *, restat: bool = True) -> None:
    if restat:
        _restat(document)
    _plant(lab, orjson.dumps(document))


def _restat(document: dict) -> None:
    """Make ``statistics`` agree with the (edited) entries, so later checks are reached."""
    files = [f for exp in document["experiments"] for f in exp["files"]]
    document["statistics"] = {
        "total_experiments": len(document["experiments"]),
        "total_files": len(files),
        "total_bytes": sum(f["size"] for f in files),
    }


def _snapshot(root: Path, cache: Path) -> dict[str, object]:
    """Every entry under ``root`` but the cache (and the manifests the test plants on the
    server): type and content, or link target."""
    found: dict[str, object] = {}
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        dirnames[:] = [d for d in dirnames if here / d != cache and d != MANIFEST_DIRNAME]
        for name in [*dirnames, *filenames]:
            path = here / name
            mode = os.lstat(path).st_mode
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                found[key] = ("dir",)
            else:
                found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _run_files(lab: Lab, index: int) -> list[str]:
    run = lab.info.listed_runs[index]
    return sorted(f"{run.rel}/{path}" for path in run.synced_files)


# --------------------------------------------------------------------------- the fuzz test

_HEADER_KEYS = (
    "format_version",
    "manifest_type",
    "revision",
    "snapshot_id",
    "generated_at",
    "server_hostname",
    "remote_root",
    "experiments",
    "statistics",
    "tail_hash_algorithm",
    "tail_hash_window",
)
_RUN_KEYS = ("run_id", "project", "name", "status", "created_at", "updated_at", "files", "tags")
_FILE_KEYS = ("path", "size", "mtime", "priority", "is_append_only", "tail_hash")

# Placeholders: {outside} the sentinel directory, {prefix} the edited run's own path prefix,
# {other} another run's prefix, {cache} the cache directory.
_HOSTILE_TEXT = (
    "",
    ".",
    "..",
    "../..",
    "/",
    "~",
    "\x00",
    "a\\b",
    "C:evil",
    ".runicorn-cache",
    ".runicorn-tmp-0123.part",
    "x" * 300,
    "{outside}",
    "{outside}/pwned",
    "{cache}/../outside/pwned",
    "{prefix}",
    "{prefix}../../../../../outside/pwned",
    "{prefix}media/../../../../../../outside/pwned",
    "{prefix}/meta.json",
    "{prefix}./meta.json",
    "{other}meta.json",
    "{other}",
    "../outside",
    "full",
    "active",
    "2.0",
)

# Paths a validator accepts that still test the writer: temp-name collisions, a file where a
# directory must go (and the reverse), names too long for the file system, deep trees.
_LEGAL_PATHS = (
    "{prefix}meta.json",
    "{prefix}events.jsonl",
    "{prefix}new/deep/file.bin",
    "{prefix}.runicorn-tmp-0123.part",
    "{prefix}media",
    "{prefix}meta.json/inner",
    "{prefix}" + "x" * 300,
    "{prefix}" + "d/" * 40 + "f",
    "{prefix}é/ü.json",
)

# Run components a validator accepts: new runs appear, long or odd names reach the disk.
_LEGAL_COMPONENTS = ("fresh", "x" * 300, "é", "outside", "runs", "a b", "-rf", "~")

_INDEX = st.integers(min_value=0, max_value=64)

_WILD_VALUES = st.one_of(
    st.sampled_from(_HOSTILE_TEXT),
    st.text(max_size=6),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([2**63, -1, 10**400]),
    st.floats(),
    st.none(),
    st.booleans(),
    st.lists(st.sampled_from(_HOSTILE_TEXT), max_size=2),
    st.just({}),
)

_PLAUSIBLE = st.one_of(
    st.tuples(st.just("file"), _INDEX, _INDEX, st.just("path"), st.sampled_from(_LEGAL_PATHS)),
    st.tuples(
        st.just("file"),
        _INDEX,
        _INDEX,
        st.just("size"),
        st.one_of(st.integers(0, 10**6), st.sampled_from([2**63 - 1, 2**40])),
    ),
    st.tuples(st.just("file"), _INDEX, _INDEX, st.just("mtime"), st.floats(0, 4e9)),
    st.tuples(st.just("file"), _INDEX, _INDEX, st.just("is_append_only"), st.booleans()),
    st.tuples(
        st.just("file"),
        _INDEX,
        _INDEX,
        st.just("tail_hash"),
        st.one_of(st.none(), st.text("0123456789abcdef", min_size=32, max_size=32)),
    ),
    st.tuples(
        st.just("rename-run"),
        _INDEX,
        _INDEX,
        st.sampled_from(["project", "name", "run_id"]),
        st.sampled_from(_LEGAL_COMPONENTS),
    ),
    st.tuples(st.just("drop-run"), _INDEX, _INDEX, st.just(""), st.none()),
    st.tuples(st.just("drop-file"), _INDEX, _INDEX, st.just(""), st.none()),
)

_WILD = st.tuples(
    st.sampled_from(["header", "run", "file", "drop-header", "drop-file-key", "copy-file"]),
    _INDEX,
    _INDEX,
    _INDEX,
    _WILD_VALUES,
)

_ENCODING = st.one_of(
    st.tuples(st.sampled_from(["json", "gz"]), st.just(0)),
    st.tuples(
        st.sampled_from(["json-cut", "gz-cut", "gz-flip", "both-differ"]),
        st.integers(min_value=0, max_value=1 << 20),
    ),
)


def _fill(value: Any, places: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, text in places.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [_fill(item, places) for item in value]
    return value


def _prefix_of(run: Any) -> str:
    return run_prefix(*(str(run.get(key)) for key in ("project", "name", "run_id")))


def _mutate(document: dict, mutation: tuple, places: dict[str, str]) -> None:
    kind, a, b, key, value = mutation
    runs = document.get("experiments")
    runs = runs if isinstance(runs, list) and runs else None
    run = runs[a % len(runs)] if runs else None
    other = runs[(a + 1) % len(runs)] if runs else None
    if isinstance(run, dict) and isinstance(other, dict):
        places = {**places, "prefix": _prefix_of(run), "other": _prefix_of(other)}
    value = _fill(copy.deepcopy(value), places)
    files = run.get("files") if isinstance(run, dict) else None
    files = files if isinstance(files, list) and files else None
    entry = files[b % len(files)] if files else None
    if kind == "header":
        document[_HEADER_KEYS[key % len(_HEADER_KEYS)]] = value
    elif kind == "drop-header":
        document.pop(_HEADER_KEYS[key % len(_HEADER_KEYS)], None)
    elif kind == "run" and isinstance(run, dict):
        run[_RUN_KEYS[key % len(_RUN_KEYS)]] = value
    elif kind == "rename-run" and isinstance(run, dict):
        old = _prefix_of(run)
        run[key] = value
        for item in files or []:
            if isinstance(item, dict) and str(item.get("path", "")).startswith(old):
                item["path"] = _prefix_of(run) + item["path"][len(old) :]
    elif kind == "drop-run" and runs:
        runs.pop(a % len(runs))
    elif kind == "drop-file" and files:
        files.pop(b % len(files))
    elif kind == "file" and isinstance(entry, dict):
        entry[key if isinstance(key, str) else _FILE_KEYS[key % len(_FILE_KEYS)]] = value
    elif kind == "drop-file-key" and isinstance(entry, dict):
        entry.pop(_FILE_KEYS[key % len(_FILE_KEYS)], None)
    elif kind == "copy-file" and isinstance(entry, dict) and isinstance(other, dict):
        target = other.get("files")
        if isinstance(target, list):
            target.append(copy.deepcopy(entry))


def _try_restat(document: dict) -> None:
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        _restat(document)


def _encode(document: dict, encoding: tuple[str, int]) -> list[tuple[str, bytes]]:
    kind, number = encoding
    text = json.dumps(document).encode("utf-8", "surrogatepass")  # NaN/Infinity as JSON5 words
    packed = gzip.compress(text, mtime=0)
    if kind == "json":
        return [("full_manifest.json", text)]
    if kind == "gz":
        return [("full_manifest.json.gz", packed)]
    if kind == "json-cut":
        return [("full_manifest.json", text[: number % max(1, len(text))])]
    if kind == "gz-cut":
        return [("full_manifest.json.gz", packed[: number % max(1, len(packed))])]
    if kind == "gz-flip":
        flipped = bytearray(packed)
        flipped[number % len(flipped)] ^= 1 + number % 255
        return [("full_manifest.json.gz", bytes(flipped))]
    # A .gz and a plain .json that disagree: the client must use one of them consistently.
    return [("full_manifest.json.gz", packed), ("full_manifest.json", b"{}")]


_REVISIONS = itertools.count(1)


@pytest.fixture
def fuzz_client(lab: Lab, client_for) -> tuple[ManifestSyncClient, dict]:
    """One client (deleting allowed) that mirrored the lab once, and the lab's valid manifest:
    every example starts from a populated cache, so appends, replacements and deletions are
    all within reach of a mutated manifest."""
    client = client_for(delete=True)
    client.sync()
    return client, _document(lab)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(st.one_of(_PLAUSIBLE, _PLAUSIBLE, _WILD), min_size=1, max_size=4),
    fix_statistics=st.sampled_from([True, True, True, False]),
    encoding=_ENCODING,
)
# found by CI: an mtime near 2**63 seconds made os.utime raise OverflowError mid-sync
@example(
    mutations=[("file", 0, 0, 20, 9_223_372_036_854_775_296)],
    fix_statistics=True,
    encoding=("json", 0),
)
def test_fuzzed_manifests_raise_only_value_or_os_error_and_never_write_outside_the_cache(
    lab: Lab,
    cache: Path,
    outside: Path,
    tmp_path: Path,
    fuzz_client: tuple[ManifestSyncClient, dict],
    mutations: list[tuple],
    fix_statistics: bool,
    encoding: tuple[str, int],
) -> None:
    client, valid = fuzz_client
    document = copy.deepcopy(valid)
    # A new snapshot every time, so the client's no-change check never skips the example.
    document["revision"] += next(_REVISIONS)
    document["snapshot_id"] = f"fuzz-{document['revision']}"
    places = {"outside": str(outside), "cache": str(cache)}
    for mutation in mutations:
        _mutate(document, mutation, places)
    if fix_statistics:
        _try_restat(document)
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        (lab.manifest_dir / name).unlink(missing_ok=True)
    for name, data in _encode(document, encoding):
        (lab.manifest_dir / name).write_bytes(data)
    before_outside = _snapshot(tmp_path, cache)
    before_cache = cache_files(cache)

    try:
        client.sync()
        raised = None
    except (ValueError, OSError) as error:  # the only errors a hostile manifest may cause
        raised = error

    assert _snapshot(tmp_path, cache) == before_outside
    assert temp_files(cache) == []
    if raised is not None:
        assert cache_files(cache) == before_cache, f"refused manifest changed the cache: {raised}"


# --------------------------------------------------------------------------- symlinks in the cache


@pytest.mark.parametrize("depth", [2, 3, 4], ids=["name-dir", "runs-dir", "run-dir"])
def test_symlink_planted_where_a_run_directory_goes_is_not_followed(
    lab: Lab, cache: Path, outside: Path, tmp_path: Path, client_for, depth: int
) -> None:
    victim = lab.info.listed_runs[0]
    link = cache.joinpath(*victim.rel.split("/")[:depth])
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    before = _snapshot(tmp_path, cache)
    behind_link = [
        p for p in server_files(lab.root) if p.split("/")[:depth] == victim.rel.split("/")[:depth]
    ]

    stats = client_for().sync()

    assert _snapshot(tmp_path, cache) == before
    assert sorted(stats["failed_files"]) == sorted(behind_link)
    assert all("symbolic link" in reason for reason in stats["failed_files"].values())
    assert stats["files_synced"] == lab.info.listed_files - len(behind_link)
    assert link.is_symlink()
    assert temp_files(cache) == []


def test_cached_log_swapped_for_a_symlink_is_replaced_not_written_through(
    lab: Lab, cache: Path, outside: Path, tmp_path: Path, client_for
) -> None:
    client = client_for()
    client.sync()
    run = next(r for r in lab.info.listed_runs if r.status == "running")
    cached_log = cache / run.rel / "events.jsonl"
    cached_log.unlink()
    cached_log.symlink_to(outside / "precious.txt")
    training_step(lab.root, seed=11, now=lab.now + 60)
    lab.publish(now=lab.now + 60)
    before = _snapshot(tmp_path, cache)

    stats = client.sync()

    assert _snapshot(tmp_path, cache) == before
    assert stats["failed_count"] == 0
    assert not cached_log.is_symlink()
    assert cached_log.read_bytes() == (lab.root / run.rel / "events.jsonl").read_bytes()


# --------------------------------------------------------------------------- explicit manifests


def test_a_path_claimed_by_two_runs_is_refused(lab: Lab, cache: Path, client_for) -> None:
    document = _document(lab)
    first, second = document["experiments"][:2]
    second["files"].append(dict(first["files"][0]))
    _plant_document(lab, document)

    with pytest.raises(ValueError, match="does not lie under its run directory"):
        client_for().sync()
    assert cache_files(cache) == {}


def test_a_path_listed_twice_in_one_run_is_refused(lab: Lab, cache: Path, client_for) -> None:
    document = _document(lab)
    files = document["experiments"][0]["files"]
    files.append(dict(files[0], size=files[0]["size"] + 1))
    _plant_document(lab, document)

    with pytest.raises(ValueError, match="listed twice"):
        client_for().sync()
    assert cache_files(cache) == {}


def test_a_size_of_two_to_the_63_is_refused(lab: Lab, cache: Path, client_for) -> None:
    document = _document(lab)
    document["experiments"][0]["files"][0]["size"] = 2**63
    _plant_document(lab, document)

    with pytest.raises(ValueError, match="outside the allowed range"):
        client_for().sync()
    assert cache_files(cache) == {}


def test_the_largest_legal_size_fails_only_that_file_and_leaves_no_partial(
    lab: Lab, cache: Path, client_for
) -> None:
    document = _document(lab)
    entry = next(
        f for f in document["experiments"][0]["files"] if f["path"].endswith("summary.json")
    )
    entry["size"] = ManifestFormat.MAX_SIZE
    entry.pop("tail_hash", None)
    _plant_document(lab, document)

    stats = client_for().sync()

    assert list(stats["failed_files"]) == [entry["path"]]
    assert "not enough free space on the cache's disk" in stats["failed_files"][entry["path"]]
    assert not (cache / entry["path"]).exists()
    assert temp_files(cache) == []
    assert stats["files_synced"] == lab.info.listed_files - 1


@pytest.mark.parametrize("gz", [False, True], ids=["json", "json.gz"])
def test_a_sparse_gigabyte_manifest_is_refused_by_its_size_without_being_read(
    lab: Lab, cache: Path, client_for, sshd_server: SshServer, gz: bool
) -> None:
    _plant(lab, b"", gz=gz)
    name = "full_manifest.json.gz" if gz else "full_manifest.json"
    with open(lab.manifest_dir / name, "r+b") as handle:
        handle.truncate(GIB)  # sparse: no gigabyte is written to disk
    client = client_for()  # default cap: 512 MiB
    sshd_server.reset_request_counts()

    with pytest.raises(ValueError, match="larger than"):
        client.sync()

    reads = sshd_server.sftp_request_count()["read"]
    assert reads <= 2, f"{reads} READ requests for a manifest refused by its size"
    assert cache_files(cache) == {}


@pytest.fixture(scope="module")
def gigabyte_of_zeros_gz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid gzip stream (about 1 MB) that inflates to 1 GiB of zeros, built without 1 GiB
    on disk or in memory: one 16 MiB block deflated after a full flush compresses to the same
    bytes every time, so the stream is that piece 64 times between header and trailer."""
    block = bytes(16 * 1024 * 1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(GIB // len(block)):
        crc = zlib.crc32(block, crc)
    path = tmp_path_factory.mktemp("bomb") / "zeros.json.gz"
    with open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header, no name
        for _ in range(GIB // len(block)):
            handle.write(piece)
        handle.write(deflate.flush())
        handle.write(struct.pack("<II", crc, GIB & 0xFFFFFFFF))
    return path


def test_a_gzip_stream_of_a_gigabyte_of_zeros_is_refused_at_the_cap(
    lab: Lab, cache: Path, client_for, gigabyte_of_zeros_gz: Path
) -> None:
    _plant(lab, gigabyte_of_zeros_gz.read_bytes(), gz=True)
    cap = 8 * 1024 * 1024

    with pytest.raises(ValueError, match=f"decompresses to more than {cap} bytes"):
        client_for(max_manifest_bytes=cap).sync()
    assert cache_files(cache) == {}


# --------------------------------------------------------------------------- the service falls back


def _wrong_root(lab: Lab) -> None:
    document = _document(lab)
    document["remote_root"] = str(lab.root.parent / "another-lab")
    _plant_document(lab, document)


def _claimed_twice(lab: Lab) -> None:
    document = _document(lab)
    first, second = document["experiments"][:2]
    second["files"].append(dict(first["files"][0]))
    _plant_document(lab, document)


def _sparse_gigabyte(lab: Lab) -> None:
    _plant(lab, b"", gz=True)
    with open(lab.manifest_dir / "full_manifest.json.gz", "r+b") as handle:
        handle.truncate(GIB)


def _huge_size(lab: Lab) -> None:
    document = _document(lab)
    document["experiments"][0]["files"][0]["size"] = 2**63
    _plant_document(lab, document)


def _symlink_escape(lab: Lab) -> None:
    document = _document(lab)
    prefix = run_prefix(*(document["experiments"][0][k] for k in ("project", "name", "run_id")))
    document["experiments"][0]["files"][0]["path"] = prefix + "../../../../../outside/pwned"
    _plant_document(lab, document)


@pytest.mark.parametrize(
    "plant",
    [_wrong_root, _claimed_twice, _sparse_gigabyte, _huge_size, _symlink_escape],
    ids=["wrong-root", "claimed-by-two-runs", "sparse-gigabyte", "size-2^63", "dotdot-in-run"],
)
def test_service_falls_back_to_the_legacy_walk_and_still_mirrors_the_server(
    lab: Lab,
    cache: Path,
    outside: Path,
    tmp_path: Path,
    sftp: paramiko.SFTPClient,
    backend: Backend,
    plant,
) -> None:
    plant(lab)
    before = _snapshot(tmp_path, cache)
    manager = LocalCacheManager(cache)
    service = MetadataSyncService(
        None, sftp, str(lab.root), manager, manifest_sync_jitter=0.0, backend=backend, delete=True
    )
    try:
        assert service.sync_all()
    finally:
        manager.close()

    assert service.progress.mode == "legacy"
    assert "invalid" in (service.fallback_reason or "")
    assert _snapshot(tmp_path, cache) == before
    assert cache_files(cache) == server_files(lab.root)  # walked mtimes are whole seconds


def test_after_a_refused_manifest_the_next_good_one_syncs_everything(
    lab: Lab, cache: Path, client_for
) -> None:
    good = (lab.manifest_dir / "full_manifest.json.gz").read_bytes()
    _claimed_twice(lab)
    client = client_for()
    with pytest.raises(ValueError):
        client.sync()

    _plant(lab, good, gz=True)
    stats = client.sync()

    assert stats["failed_count"] == 0
    assert_cache_equals_server(lab.root, cache)


def test_a_run_named_too_long_for_a_file_system_is_left_out_and_the_rest_syncs(
    lab: Lab, cache: Path, client_for
) -> None:
    """A name longer than 255 bytes fits no client's file system: the reader leaves the run
    out (``skipped``, by the name rule) instead of failing its files on every sync, and
    never deletes anything over it."""
    valid = _document(lab)
    document = copy.deepcopy(valid)
    run = document["experiments"][0]
    old_prefix = _prefix_of(run)
    run["name"] = "x" * 300
    for entry in run["files"]:
        entry["path"] = _prefix_of(run) + entry["path"][len(old_prefix) :]
    _plant_document(lab, document)
    client = client_for(delete=True)

    first = client.sync()
    valid["revision"] += 1
    valid["snapshot_id"] = "without-the-long-run"
    _plant_document(lab, valid)
    second = client.sync()

    listed = sum(len(exp["files"]) for exp in document["experiments"])
    assert (first["failed_count"], first["files_synced"]) == (0, listed - len(run["files"]))
    assert (second["failed_count"], second["deleted_count"]) == (0, 0)
    assert "x" * 300 not in {r.name for r in LocalCacheManager(cache).list_runs()}
    assert temp_files(cache) == []

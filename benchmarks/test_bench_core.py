"""Benchmarks of the hot paths, per backend, with the baselines in the same run.

Groups: scanning a 1,000-run and a 10,000-run lab (about 10 small files per run, one
``media/`` subdirectory each; warm page cache) against ``os.walk`` + ``os.lstat`` in Python
and ``find -printf``; a full scan + generate of the same labs (``find -printf`` beside it);
diffing 10^5 and 10^6 manifest entries; tail-hashing 10^4 files; decoding (gunzip, parse,
validate) and encoding (JSON per backend, then gzip) the 10,000-run lab's manifest of 100,000
entries; decoding an active manifest of 1,500 of its runs, alone and with the memo of the
previous one; building the file entries of that lab from its scan.
Every benchmark also checks its result, so ``--benchmark-disable`` makes them a test run.
The labs are built here (not by ``runicorn.demo.sample_lab``) so the numbers do not move when
the sample generator changes.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from runicorn._sys.gcpause import paused_gc
from runicorn.format.compression import compress
from runicorn.format.models import ValidationMemo
from runicorn.generate.generator import RUN_METADATA
from runicorn.generate.state import FileMemo
from runicorn.manifest import ManifestGenerator, ManifestType, SyncManifest

EVENT_LINE = b'{"step": 123, "loss": 0.123456, "acc": 0.987654, "time": 1735689600.5}\n'
EVENTS = EVENT_LINE * 110 + b'{"step": 124, "lo'  # ~8 KiB ending in a half-written line
RUN_FILES = {
    "meta.json": b'{"id": "x", "project": "p", "name": "n", "created_at": 1735689600.0}',
    "status.json": b'{"status": "finished", "started_at": 1735689600.0}',
    "summary.json": b'{"best_acc": 0.98}',
    "events.jsonl": EVENTS,
    "logs.txt": b"epoch 1 done\n" * 20,
    "environment.json": b'{"python": "3.11"}',
    "media/step_0.png": b"\x89PNG" + bytes(60),
    "media/step_1.png": b"\x89PNG" + bytes(60),
    "media/step_2.png": b"\x89PNG" + bytes(60),
    "media/step_3.png": b"\x89PNG" + bytes(60),
}
PROJECTS = 10
EXPERIMENTS = 10  # per project


def run_ids(n_runs: int) -> list[str]:
    return [
        f"p{p:02d}/exp{e:02d}/runs/20250101_{r:06d}_{r * 7919 % 16**6:06x}"
        for p in range(PROJECTS)
        for e in range(EXPERIMENTS)
        for r in range(n_runs // (PROJECTS * EXPERIMENTS))
    ]


def build_lab(root: Path, n_runs: int) -> Path:
    for run in run_ids(n_runs):
        run_dir = root / run
        (run_dir / "media").mkdir(parents=True)
        for name, data in RUN_FILES.items():
            with open(run_dir / name, "wb") as handle:
                handle.write(data)
    return root


@pytest.fixture(scope="session")
def labs(tmp_path_factory: pytest.TempPathFactory):
    """Labs by run count, each built once per session when first asked for."""
    built: dict[int, Path] = {}

    def lab(n_runs: int) -> Path:
        if n_runs not in built:
            built[n_runs] = build_lab(tmp_path_factory.mktemp(f"lab{n_runs}"), n_runs)
        return built[n_runs]

    return lab


LAB_SIZES = [1_000, 10_000]


def walk_and_lstat(root: str) -> list[tuple[str, int, int]]:
    """The baseline a Python programmer would write."""
    records = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path, follow_symlinks=False)
            records.append((path, st.st_size, st.st_mtime_ns))
    return records


def find_printf(root: str) -> bytes:
    """The baseline a shell user would write (GNU find, one lstat per entry)."""
    return subprocess.run(
        ["find", root, "-printf", "%P %s %T@\n"], stdout=subprocess.PIPE, check=True
    ).stdout


@pytest.mark.parametrize("n_runs", LAB_SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_scan_lab(benchmark, backend, labs, n_runs, threads):
    root = str(labs(n_runs))
    benchmark.group = f"scan {n_runs:,} runs"
    result = benchmark.pedantic(
        backend.scan_experiments, (root, threads), rounds=5, warmup_rounds=1
    )
    assert result.problems == []
    assert len(result.runs) == n_runs
    assert sum(len(files) for *_, files in result.runs) == n_runs * len(RUN_FILES)


@pytest.mark.parametrize("n_runs", LAB_SIZES)
def test_scan_baseline_os_walk_lstat(benchmark, labs, n_runs):
    root = str(labs(n_runs))
    benchmark.group = f"scan {n_runs:,} runs"
    records = benchmark.pedantic(walk_and_lstat, (root,), rounds=5, warmup_rounds=1)
    assert len(records) == n_runs * len(RUN_FILES)


@pytest.mark.parametrize("n_runs", LAB_SIZES)
@pytest.mark.parametrize("group", ["scan", "scan + generate"])
def test_scan_baseline_find_printf(benchmark, labs, n_runs, group):
    """``find -printf`` in both groups, so each table has its baseline from the same run."""
    root = str(labs(n_runs))
    benchmark.group = f"{group} {n_runs:,} runs"
    listing = benchmark.pedantic(find_printf, (root,), rounds=5, warmup_rounds=1)
    assert listing.count(b".png ") == n_runs * 4


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_runs", LAB_SIZES)
def test_scan_and_generate_lab(benchmark, backend, labs, n_runs, tmp_path_factory):
    """A full generation (``incremental=False``) into a fresh output each round: scan, tail
    hashes, run metadata, model, JSON, gzip, atomic publication."""
    root = labs(n_runs)
    outputs = tmp_path_factory.mktemp(f"generate{n_runs}")
    counter = itertools.count()
    benchmark.group = f"scan + generate {n_runs:,} runs"

    def fresh_generator():
        output = outputs / str(next(counter))
        return (ManifestGenerator(root, output, incremental=False, backend=backend),), {}

    manifest, path = benchmark.pedantic(
        ManifestGenerator.generate, setup=fresh_generator, rounds=3, warmup_rounds=1
    )
    assert manifest.total_experiments == n_runs
    assert manifest.total_files == n_runs * len(RUN_FILES)
    assert sum(entry.tail_hash is not None for entry in manifest.iter_files()) == 2 * n_runs
    assert SyncManifest.from_json(path.read_bytes()).to_json() == path.read_bytes()


@pytest.fixture(scope="session")
def published_manifest(labs, tmp_path_factory) -> tuple[bytes, bytes]:
    """The ``.json`` and ``.json.gz`` of the 10,000-run lab (100,000 entries)."""
    output = tmp_path_factory.mktemp("published") / "full_manifest.json"
    _, path = ManifestGenerator(labs(10_000), output).generate()
    return path.read_bytes(), path.with_name(path.name + ".gz").read_bytes()


# Decoding is one pure-Python module over orjson that both backends share, so it runs once,
# not per backend: a second row would time the same code.
def test_manifest_decode_100k_entries(benchmark, published_manifest):
    """What a client does with a downloaded manifest: gunzip (bounded), parse, validate
    every entry (types, sizes, path rules)."""
    _, packed = published_manifest
    benchmark.group = "manifest encode / decode, 100,000 entries"
    manifest = benchmark.pedantic(SyncManifest.from_gzip, (packed,), rounds=5, warmup_rounds=1)
    assert manifest.total_files == 100_000


ACTIVE_RUNS = 1_500


@pytest.fixture(scope="session")
def active_publications(published_manifest) -> tuple[bytes, bytes]:
    """Two consecutive active manifests of 1,500 runs of the 10,000-run lab (15,000
    entries), as a live client reads them: between the two, five runs appended a line."""
    data, _ = published_manifest
    manifest = SyncManifest.from_json(data)
    manifest.manifest_type = ManifestType.ACTIVE
    manifest.experiments = manifest.experiments[:ACTIVE_RUNS]
    before = manifest.to_json()
    for exp in manifest.experiments[:: ACTIVE_RUNS // 5]:
        entry = next(entry for entry in exp.files if entry.path.endswith("events.jsonl"))
        entry.size += len(EVENT_LINE)
        entry.mtime += 1.0
    return before, manifest.to_json()


def test_active_manifest_decode_1500_runs(benchmark, active_publications):
    """A live client's decode of the next active manifest, every run validated."""
    _, after = active_publications
    benchmark.group = "active manifest decode, 1,500 runs (15,000 entries)"
    manifest = benchmark.pedantic(SyncManifest.from_json, (after,), rounds=10, warmup_rounds=1)
    assert manifest.total_experiments == ACTIVE_RUNS


def test_active_manifest_decode_1500_runs_with_memo(benchmark, active_publications):
    """The same with the memo of the previous active manifest (what ``sync --watch``
    keeps): only the five changed runs are validated again."""
    before, after = active_publications
    benchmark.group = "active manifest decode, 1,500 runs (15,000 entries)"

    def primed() -> tuple[tuple[bytes], dict[str, ValidationMemo]]:
        memo = ValidationMemo()
        SyncManifest.from_json(before, memo=memo)
        return (after,), {"memo": memo}

    manifest = benchmark.pedantic(SyncManifest.from_json, setup=primed, rounds=10)
    assert manifest == SyncManifest.from_json(after)


def test_manifest_json_100k_entries(benchmark, backend, published_manifest):
    """The generator's encoding of the entries: the backend's ``encode_experiments``."""
    data, _ = published_manifest
    manifest = SyncManifest.from_json(data)
    benchmark.group = "manifest encode / decode, 100,000 entries"
    encoded = benchmark.pedantic(
        backend.encode_experiments, (manifest.experiments,), rounds=5, warmup_rounds=1
    )
    assert manifest.to_json(encoded) == data


def test_manifest_gzip_100k_entries(benchmark, published_manifest):
    """What the generator does to publish after the JSON: gzip (shared code, on threads)."""
    data, packed = published_manifest
    benchmark.group = "manifest encode / decode, 100,000 entries"
    assert benchmark.pedantic(compress, (data,), rounds=5, warmup_rounds=1) == packed


def test_build_file_entries_of_100k_files(benchmark, backend, labs):
    """The generator's per-file step between scan and hashing: classify each file, build
    its entry, reuse the memo of an unchanged log (here: every log has one). With the cyclic
    collector paused, as the generator runs it."""
    root = labs(10_000)
    scan = backend.scan_experiments(str(root), 1, ())
    first = backend.build_file_entries(scan.runs, {}, 0, RUN_METADATA)
    memos = {
        entry.path: FileMemo((record[1], record[2], record[3], record[4]), 1, "ab" * 16)
        for entry, record in first.stale
    }
    benchmark.group = "file entries, 100,000 files"

    def build():
        with paused_gc():
            return backend.build_file_entries(scan.runs, memos, 1 << 62, RUN_METADATA)

    built = benchmark.pedantic(build, rounds=5, warmup_rounds=1)
    assert sum(len(run.files) for run in built.runs) == 100_000
    assert len(built.reused) == 20_000 and not built.stale


# --------------------------------------------------------------------------------------


def manifest_paths(n: int) -> list[str]:
    """``n`` sorted manifest paths, created in sorted order (as a decoded manifest is)."""
    names = sorted(RUN_FILES)
    per_experiment = -(-n // (PROJECTS * EXPERIMENTS * len(names)))
    paths = [
        f"p{p:02d}/exp{e:02d}/runs/20250101_{r:06d}_abcdef/{name}"
        for p in range(PROJECTS)
        for e in range(EXPERIMENTS)
        for r in range(per_experiment)
        for name in names
    ]
    return paths[:n]


def manifest_pair(n: int) -> tuple[list[tuple], list[tuple], dict[str, int]]:
    """Remote and local entries as a client holds them after a typical interval: most files
    unchanged, some logs grown, a few files rewritten, new and deleted. The two sides are
    decoded separately in real life, so they share no path, size or mtime objects."""
    remote: list[tuple] = []
    local: list[tuple] = []
    expected = {"new": 0, "grown": 0, "replaced": 0, "unchanged": 0, "vanished": 0}
    for i, (r_path, l_path) in enumerate(zip(manifest_paths(n), manifest_paths(n), strict=True)):
        append_only = r_path.endswith(("events.jsonl", "logs.txt"))
        size = 1000 + i
        mtime = 1735689600.0 + i / 1000
        tail = f"{i:032x}" if append_only else None
        fate = i % 100
        if fate == 0:
            remote.append((r_path, size, mtime, append_only, tail))
            expected["new"] += 1
        elif fate == 1:
            local.append((l_path, size, mtime, tail))
            expected["vanished"] += 1
        elif fate < 10 and append_only:
            remote.append((r_path, size + 100, mtime + 1, True, tail))
            local.append((l_path, size, mtime, f"{i + 1:032x}"))
            expected["grown"] += 1
        elif fate == 10:
            remote.append((r_path, size, mtime + 1, append_only, tail))
            local.append((l_path, size, mtime, None))
            expected["replaced"] += 1
        else:
            remote.append((r_path, size, mtime, append_only, tail))
            local.append((l_path, int(str(size)), float(str(mtime)), tail and str(tail)))
            expected["unchanged"] += 1
    return remote, local, expected


@pytest.fixture(scope="session")
def manifest_pairs():
    built: dict[int, tuple] = {}

    def pair(n: int) -> tuple:
        if n not in built:
            built[n] = manifest_pair(n)
        return built[n]

    return pair


@pytest.mark.parametrize("n_entries", [10**5, 10**6], ids=["1e5", "1e6"])
def test_diff_entries(benchmark, backend, manifest_pairs, n_entries):
    remote, local, expected = manifest_pairs(n_entries)
    benchmark.group = f"diff {n_entries:.0e} entries"
    result = benchmark.pedantic(backend.diff_entries, (remote, local), rounds=5, warmup_rounds=1)
    assert {
        "new": len(result.new),
        "grown": len(result.grown),
        "replaced": len(result.replaced),
        "unchanged": result.unchanged,
        "vanished": len(result.vanished),
    } == expected


# --------------------------------------------------------------------------------------


def test_hash_tails_of_10k_files(benchmark, backend, labs):
    root = labs(10_000)
    requests = [(f"{run}/events.jsonl", len(EVENTS), True) for run in run_ids(10_000)]
    benchmark.group = "tail hash 10,000 files"
    results = benchmark.pedantic(
        backend.hash_tails, (str(root), requests), rounds=5, warmup_rounds=1
    )
    complete = len(EVENTS) - len(b'{"step": 124, "lo')
    assert len(results) == 10_000
    assert {result[0] for result in results} == {complete}
    assert len({result[1] for result in results}) == 1

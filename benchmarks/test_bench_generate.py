"""Benchmarks of manifest generation on a 1,000-run sample lab, per backend, with the
``find -printf`` baseline in the same run.

Group ``generate-1000-runs``: a full generation (``incremental=False``, fresh output each
round), an incremental regeneration with nothing changed, and ``find ROOT -printf '%P %s
%T@\\n'`` over the same tree (warm page cache). The gzip manifest's size is recorded in
``extra_info`` and asserted (<= 1 MB): a size, not a time. Every benchmark checks its
result, so ``pytest benchmarks/test_bench_generate.py --benchmark-disable`` is a quick
correctness run. ``benchmarks/generate_report.py`` makes the same measurements and prints
the table for ``docs/performance.md``.
"""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator, SyncManifest

RUNS = 1_000
SEED = 7
NOW = 1_735_689_600.0
GZIP_LIMIT = 1_000_000
GROUP = "generate-1000-runs"


@pytest.fixture(scope="session")
def sample_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LabInfo]:
    """The 1,000-run lab, built once per session, its metadata read once to warm the cache."""
    root = tmp_path_factory.mktemp("generate-bench") / "lab"
    info = build_sample_lab(root, runs=RUNS, seed=SEED, now=NOW)
    subprocess.run(["find", str(root), "-type", "f", "-exec", "true", "{}", "+"], check=True)
    return root, info


@pytest.fixture(scope="session")
def output_dirs(tmp_path_factory: pytest.TempPathFactory):
    """A fresh, empty output directory per call, outside the lab."""
    base = tmp_path_factory.mktemp("generate-bench-out")
    counter = itertools.count()
    return lambda: base / f"out-{next(counter)}"


def _check_manifest(manifest: SyncManifest, info: LabInfo) -> None:
    assert manifest.total_experiments == len(info.listed_runs)
    assert manifest.total_files == info.listed_files
    assert manifest.total_bytes <= info.listed_bytes


@pytest.mark.benchmark(group=GROUP)
def test_full_generation(benchmark, backend, sample_lab, output_dirs):
    root, info = sample_lab

    def setup():
        generator = ManifestGenerator(root, output_dirs(), incremental=False, backend=backend)
        return (generator,), {}

    def generate(generator: ManifestGenerator):
        manifest, path = generator.generate()
        return manifest, path, generator.last_report

    manifest, path, report = benchmark.pedantic(generate, setup=setup, rounds=7, warmup_rounds=1)
    _check_manifest(manifest, info)
    assert report.published and report.files_reused == 0
    gz_bytes = path.with_name(path.name + ".gz").stat().st_size
    benchmark.extra_info.update(
        json_bytes=path.stat().st_size, gz_bytes=gz_bytes, files=manifest.total_files
    )
    assert gz_bytes <= GZIP_LIMIT


@pytest.mark.benchmark(group=GROUP)
def test_incremental_generation_with_nothing_changed(benchmark, backend, sample_lab, output_dirs):
    root, info = sample_lab
    generator = ManifestGenerator(root, output_dirs(), backend=backend)
    first, path = generator.generate()
    before = path.read_bytes()

    def regenerate():
        manifest, _ = generator.generate()
        return manifest, generator.last_report

    manifest, report = benchmark(regenerate)
    _check_manifest(manifest, info)
    assert (manifest.revision, manifest.snapshot_id) == (first.revision, first.snapshot_id)
    assert not report.published and report.files_hashed == 0
    assert report.files_reused == 2 * len(info.listed_runs)  # events.jsonl + logs.txt
    assert path.read_bytes() == before


@pytest.mark.benchmark(group=GROUP)
def test_find_printf_baseline(benchmark, sample_lab):
    root, info = sample_lab

    def listing() -> bytes:
        command = ["find", str(root), "-printf", r"%P %s %T@\n"]
        return subprocess.run(command, check=True, capture_output=True).stdout

    output = benchmark(listing)
    assert output.count(b"\n") > info.listed_files

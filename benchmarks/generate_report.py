"""Measure manifest generation on a sample lab and print a markdown table.

The same measurements as ``benchmarks/test_bench_generate.py``, for ``docs/performance.md``:
a full generation (``incremental=False``, a fresh output directory each round), an
incremental regeneration with nothing changed, and ``find ROOT -printf '%P %s %T@\\n'`` over
the same tree, all on a warm page cache; medians over ``--rounds`` rounds, per backend.

A second table gives the CPU time of the full generation (user and kernel, all threads) and
the ceiling it puts on the compiled core's speed-up: had the native backend kept every
usable core busy for its whole run, it would still need ``native CPU / cores`` seconds, so
it cannot beat the pure backend by more than ``pure wall / (native CPU / cores)``. The
kernel's share (system calls and page faults, which both backends pay alike) gives a
second, harder ceiling: ``pure wall / (native system CPU / cores)``.

    python benchmarks/generate_report.py                 # 1,000-run lab in a temp dir
    python benchmarks/generate_report.py --runs 200 --rounds 5 --backend python
    python benchmarks/generate_report.py --runs 10000 --scale 0.01 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runicorn import __version__
from runicorn._sys.cpu import usable_cores
from runicorn.core.backend import NATIVE, PYTHON, load_backend, native_available
from runicorn.demo.sample_lab import build_sample_lab
from runicorn.manifest import ManifestGenerator

NOW = 1_735_689_600.0


@dataclass(frozen=True)
class CpuSample:
    """One timed round: wall clock, and the process's CPU time over every thread."""

    wall: float
    user: float
    system: float
    minor_faults: int

    @property
    def cpu(self) -> float:
        return self.user + self.system


def _cpu_samples(
    action: Callable[[], object], rounds: int, setup: Callable[[], None] | None = None
) -> list[CpuSample]:
    """Time ``rounds`` rounds of ``action`` after one uncounted warm-up round, each after
    ``setup`` (untimed): wall clock, CPU time and page faults per round."""
    samples = []
    for _ in range(rounds + 1):  # the first round warms up and is not counted
        if setup:
            setup()
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        action()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        samples.append(
            CpuSample(
                wall=wall,
                user=after.ru_utime - before.ru_utime,
                system=after.ru_stime - before.ru_stime,
                minor_faults=after.ru_minflt - before.ru_minflt,
            )
        )
    return samples[1:]


def _median_of(samples: list[CpuSample], field: str) -> float:
    return statistics.median(getattr(sample, field) for sample in samples)


def _median_seconds(
    action: Callable[[], object], rounds: int, setup: Callable[[], None] | None = None
) -> float:
    return _median_of(_cpu_samples(action, rounds, setup), "wall")


def _find(root: Path) -> None:
    command = ["find", str(root), "-printf", r"%P %s %T@\n"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def measure(root: Path, backend_name: str, rounds: int, scratch: Path) -> dict[str, float]:
    backend = load_backend(backend_name)
    outputs = iter(range(10**9))
    state: dict[str, ManifestGenerator] = {}

    def fresh_full_generator() -> None:
        out = scratch / f"{backend_name}-full-{next(outputs)}"
        state["full"] = ManifestGenerator(root, out, incremental=False, backend=backend)

    full_samples = _cpu_samples(lambda: state["full"].generate(), rounds, fresh_full_generator)
    manifest, path = state["full"].generate()

    incremental_out = scratch / f"{backend_name}-inc"
    incremental_generator = ManifestGenerator(root, incremental_out, backend=backend)
    incremental_generator.generate()
    incremental = _median_seconds(incremental_generator.generate, rounds)
    report = incremental_generator.last_report
    assert report is not None and not report.published and report.files_hashed == 0

    return {
        "full": _median_of(full_samples, "wall"),
        "full_user": _median_of(full_samples, "user"),
        "full_system": _median_of(full_samples, "system"),
        "full_cpu": _median_of(full_samples, "cpu"),
        "full_faults": _median_of(full_samples, "minor_faults"),
        "incremental": incremental,
        "find": _median_seconds(lambda: _find(root), rounds),
        "runs": manifest.total_experiments,
        "files": manifest.total_files,
        "json_bytes": path.stat().st_size,
        "gz_bytes": path.with_name(path.name + ".gz").stat().st_size,
    }


def markdown(results: dict[str, dict[str, float]], lab_runs: int, rounds: int) -> str:
    any_result = next(iter(results.values()))
    lines = [
        f"Manifest generation, sample lab of {lab_runs} runs "
        f"({any_result['runs']} listed, {any_result['files']} files), warm cache, "
        f"median of {rounds} rounds; runicorn {__version__}, Python {platform.python_version()}.",
        "",
        "| backend | full generation | incremental, no change | `find -printf` | "
        "full / find | full / incremental | manifest .json | manifest .json.gz |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['full'] * 1e3:.1f} ms | {r['incremental'] * 1e3:.1f} ms "
            f"| {r['find'] * 1e3:.1f} ms | {r['full'] / r['find']:.1f}x "
            f"| {r['full'] / r['incremental']:.1f}x | {r['json_bytes'] / 1e6:.2f} MB "
            f"| {r['gz_bytes'] / 1e3:.0f} KB |"
        )
    lines += ["", *cpu_markdown(results)]
    return "\n".join(lines)


def _ceiling(pure_wall: float, native_cpu: float, cores: int) -> str:
    """``pure_wall / (native_cpu / cores)``: the most the native run could gain. A tiny lab
    can record no CPU time at all (getrusage counts in clock ticks), and then there is no
    bound to print."""
    if native_cpu <= 0:
        return "an unbounded factor (no CPU time recorded)"
    return f"{pure_wall / (native_cpu / cores):.2f}x"


def cpu_markdown(results: dict[str, dict[str, float]]) -> list[str]:
    """The CPU table of the full generation, and the ceilings it puts on the speed-up."""
    cores = usable_cores()
    lines = [
        f"CPU time of the full generation (medians; all threads; {cores} usable cores):",
        "",
        "| backend | wall | user CPU | system CPU | cores busy | minor page faults |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['full'] * 1e3:.0f} ms | {r['full_user'] * 1e3:.0f} ms "
            f"| {r['full_system'] * 1e3:.0f} ms | {r['full_cpu'] / r['full']:.2f} "
            f"| {r['full_faults']:,.0f} |"
        )
    if NATIVE in results and PYTHON in results:
        native, pure = results[NATIVE], results[PYTHON]
        lines += [
            "",
            f"Speed-up of the native full generation over the pure one: "
            f"{pure['full'] / native['full']:.2f}x measured; at most "
            f"{_ceiling(pure['full'], native['full_cpu'], cores)} with every core busy all "
            f"the time; at most {_ceiling(pure['full'], native['full_system'], cores)} even "
            f"if everything but the kernel's work cost nothing.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the sample lab")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size factor of events, logs and media files"
    )
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per measurement")
    parser.add_argument(
        "--backend",
        choices=[NATIVE, PYTHON, "all"],
        default="all",
        help="which backend to measure (all: every one that imports)",
    )
    args = parser.parse_args(argv)
    if args.backend == "all":
        backends = [NATIVE, PYTHON] if native_available() else [PYTHON]
    else:
        backends = [args.backend]

    workdir = Path(tempfile.mkdtemp(prefix="runicorn-generate-report-"))
    try:
        root = workdir / "lab"
        print(f"building a {args.runs}-run sample lab in {root} ...", file=sys.stderr)
        build_sample_lab(root, runs=args.runs, seed=args.seed, scale=args.scale, now=NOW)
        _find(root)  # warm the page cache
        results = {}
        for name in backends:
            print(f"measuring the {name} backend ...", file=sys.stderr)
            results[name] = measure(root, name, args.rounds, workdir / "out")
        print(markdown(results, args.runs, args.rounds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

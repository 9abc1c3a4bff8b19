"""`runicorn sync` against `rsync -a` on a lab of many runs, the server a local directory.

No network is in these figures: the lab and both destinations are local directories (put
them on tmpfs, ``--workdir /dev/shm/...``), so what is measured is the per-file and per-run
cost of each tool. For one lab of ``--runs N`` runs at ``--scale S`` (built once, or reused
with ``--lab``), three scenarios run for both tools, each a fresh process:

* cold: empty destination;
* no change: run again at once;
* step: ``--step-runs`` running runs append a line to ``events.jsonl`` (and their
  ``logs.txt``), the server's full manifest is regenerated, then the tool syncs.

One tool runs its three scenarios, its destination is removed, then the other's run (each
with its own step of the same runs): a 100,000-run lab and two full copies of it would need
about three million inodes, more than a default tmpfs of 24 GB has.

Each figure is the command's wall time, its CPU time (user + system, of the process and the
children it waited for) and its peak memory (``ru_maxrss`` from ``wait4``). rsync excludes
``*.lock`` and ``.runicorn/`` so both tools move the same files. The table is printed as
Markdown; ``--json`` prints the numbers too.

    python benchmarks/lab_scale.py --runs 10000 --scale 0.01 --workdir /dev/shm/bench
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from runicorn.demo.sample_lab import build_sample_lab

SEED = 7
NOW = 1735689600.0


@dataclass
class Figure:
    """One command's cost."""

    wall: float
    cpu: float
    max_rss_mb: float
    detail: str = ""


def measure(command: list[str]) -> tuple[Figure, str]:
    """Run ``command``; its wall time, CPU time and peak memory (``wait4``), and its stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        child = subprocess.Popen(command, stdout=out_file, stderr=err_file)
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    wall = time.perf_counter() - started
    if child.returncode not in (0, 3):
        raise SystemExit(f"{command[0]} failed ({child.returncode}): {err.decode()[-2000:]}")
    figure = Figure(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    return figure, out.decode()


def runicorn_sync(lab: Path, cache: Path) -> Figure:
    figure, out = measure(
        [sys.executable, "-m", "runicorn", "sync", str(lab), str(cache), "--json"]
    )
    stats = orjson.loads(out)
    figure.detail = "skipped" if stats["skipped"] else f"{stats['files_synced']} files"
    return figure


def rsync(lab: Path, destination: Path) -> Figure:
    figure, out = measure(
        [
            "rsync",
            "-a",
            "--stats",
            "--exclude=*.lock",
            "--exclude=.runicorn/",
            f"{lab}/",
            f"{destination}/",
        ]
    )
    for line in out.splitlines():
        if line.startswith("Number of regular files transferred:"):
            figure.detail = f"{line.split(':')[1].strip().replace(',', '')} files"
    return figure


def running_runs(lab: Path, count: int) -> list[Path]:
    """The first ``count`` running runs (by path), from their status.json."""
    found: list[Path] = []
    for status in sorted(lab.glob("*/*/runs/*/status.json")):
        if b'"running"' in status.read_bytes():
            found.append(status.parent)
            if len(found) == count:
                break
    return found


def step(lab: Path, runs: list[Path], now: float) -> None:
    """Each run appends a complete line to its logs, as a trainer does between two syncs."""
    for run in runs:
        for name, line in (
            ("events.jsonl", b'{"step": 1000000, "loss": 0.125}\n'),
            ("logs.txt", b"step 1000000 loss 0.125\n"),
        ):
            path = run / name
            if path.exists():
                with open(path, "ab") as handle:
                    handle.write(line)
                os.utime(path, (now, now))


def generate(lab: Path) -> float:
    """Regenerate the full manifest in a child process: generating in this one would grow
    it, and the children forked afterwards would report its memory as theirs."""
    figure, _out = measure(
        [sys.executable, "-m", "runicorn", "generate-manifest", "--root", str(lab), "--json"]
    )
    return figure.wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lab_scale.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--scale", type=float, default=0.01)
    parser.add_argument("--step-runs", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/runicorn-lab-scale"))
    parser.add_argument("--lab", type=Path, help="an existing lab with a full manifest")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    lab = args.lab
    if lab is None:
        lab = args.workdir / f"lab-{args.runs}"
        if not lab.exists():
            build_sample_lab(lab, args.runs, seed=SEED, scale=args.scale, now=NOW)
            generate(lab)
            # The lab's runs (about 1 GB at 100,000 runs) are no longer needed here.
            gc.collect()
    stepping = running_runs(lab, args.step_runs)
    names = ("cold", "no change", f"{args.step_runs}-run step")
    figures: dict[str, list[Figure]] = {}
    generation = 0.0
    for tool, destination in (
        (runicorn_sync, args.workdir / "cache"),
        (rsync, args.workdir / "rsync"),
    ):
        shutil.rmtree(destination, ignore_errors=True)
        cold, unchanged = tool(lab, destination), tool(lab, destination)
        step(lab, stepping, time.time())
        generation = generate(lab)
        figures[tool.__name__] = [cold, unchanged, tool(lab, destination)]
        shutil.rmtree(destination)
    rows = dict(
        zip(names, zip(figures["runicorn_sync"], figures["rsync"], strict=True), strict=True)
    )

    print(f"lab: {lab}; the step's manifest generated in {generation:.2f} s")
    print()
    print("| | `runicorn sync` | `rsync -a` |")
    print("|---|---|---|")
    for name, (ours, theirs) in rows.items():
        print(
            f"| {name} | {ours.wall:.2f} s ({ours.cpu:.2f} s CPU), {ours.max_rss_mb:.0f} MB"
            f" | {theirs.wall:.2f} s ({theirs.cpu:.2f} s CPU), {theirs.max_rss_mb:.0f} MB |"
        )
    if args.json:
        document = {
            name: {"runicorn": asdict(ours), "rsync": asdict(theirs)}
            for name, (ours, theirs) in rows.items()
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Several servers and part of a lab: `runicorn sync --all` and `--project`, measured.

Two figures, each a ratio against a baseline measured in the same run (the machine may be
shared, so absolute seconds say little):

* **--all against the slowest alone.** Three sample labs of different sizes, each served by
  its own throw-away sshd behind its own emulated WAN link (``harness.wan_proxy``, each in a
  process of its own: fixed delay each way, bandwidth cap). Each remote of a remotes file is
  synced alone, cold, then all three with ``runicorn sync --all``, cold. Ratio: the
  ``--all`` wall time over the slowest remote's alone (target: at most 1.2). SSH
  compression is off unless ``--compress``: the three servers share this machine's cores,
  and their zlib would make that CPU, not the links, what ``--all`` waits for.
* **--project of one project out of five.** A 500-run lab of five projects behind one sshd:
  a full cold sync, then for each project a cold ``--project`` sync. Ratio: bytes the
  project's sync read from the server (its ``bytes_downloaded``, the manifest included) over
  the full sync's (target: at most 0.25), with each project's share of the lab's files.

Every sync is a fresh ``python -m runicorn`` process with its own SSH connections; each
figure is the median of ``--repeat`` rounds.

    python benchmarks/multi_remote.py --repeat 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import orjson

import _harness_path  # (tests/ on sys.path, for harness)
from harness.sshd import SshServer
from runicorn.demo.sample_lab import build_sample_lab
from runicorn.manifest import ManifestGenerator

ALL_RUNS = (60, 90, 120)
"""Runs of the three labs of the --all figure: three servers of different sizes."""


_LINK = """
import sys
sys.path.insert(1, sys.argv[1])
from harness.wan_proxy import WanProxy
bandwidth = float(sys.argv[4]) or None
with WanProxy("127.0.0.1", int(sys.argv[2]), delay_ms=float(sys.argv[3]),
              bandwidth_bps=bandwidth) as proxy:
    print(proxy.port, flush=True)
    sys.stdin.read()  # until the benchmark closes it
"""


@contextmanager
def _link(target_port: int, delay_ms: float, bandwidth_bps: float | None) -> Iterator[int]:
    """An emulated link to ``target_port`` in a process of its own (three links in one
    process would share its GIL and slow each other down: not what three servers do)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _LINK,
            _harness_path.TESTS_DIR,
            str(target_port),
            str(delay_ms),
            str(bandwidth_bps or 0),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield int(child.stdout.readline())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


@contextmanager
def _served(
    labs: dict[str, Path], workdir: Path, delay_ms: float, bandwidth_bps: float | None
) -> Iterator[Path]:
    """Each lab behind its own sshd (and WAN link); the ssh config with an alias for each."""
    with ExitStack() as stack:
        blocks: list[str] = []
        known: list[str] = []
        for alias in labs:
            server = stack.enter_context(SshServer())
            port = server.port
            if bandwidth_bps is not None or delay_ms:
                port = stack.enter_context(_link(server.port, delay_ms, bandwidth_bps))
            via = ("127.0.0.1", port)
            known.append(server.known_hosts_line_at(via))
            blocks.append(
                server.ssh_config_block(alias, via=via, known_hosts=workdir / "known_hosts")
            )
        (workdir / "known_hosts").write_text("\n".join(known) + "\n")
        config = workdir / "ssh_config"
        config.write_text("\n".join(blocks))
        yield config


def _runicorn(*args: str) -> tuple[float, dict]:
    """Run ``runicorn ARGS --json``; its wall time and its JSON document (with the CPU
    seconds it used, user + system, under ``"_cpu"``)."""
    command = [sys.executable, "-m", "runicorn", *args, "--jitter", "0", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} exited {done.returncode}:\n{done.stderr}")
    return elapsed, {**orjson.loads(done.stdout), "_cpu": cpu}


def _remotes_file(labs: dict[str, Path], workdir: Path, caches: Path, compress: bool) -> Path:
    path = workdir / "remotes.toml"
    setting = "true" if compress else "false"
    body = "".join(
        f'[remotes.{alias}]\nurl = "{alias}:{root}"\ncompress = {setting}\n\n'
        for alias, root in labs.items()
    )
    path.write_text(f'cache_root = "{caches}"\n\n{body}')
    return path


def measure_all(
    workdir: Path, scale: float, delay_ms: float, mbit: float, repeat: int, compress: bool
) -> dict[str, tuple[float, float, int]]:
    """Median wall seconds, CPU seconds and bytes read of each remote alone and of --all,
    cold each time."""
    labs: dict[str, Path] = {}
    for index, runs in enumerate(ALL_RUNS):
        root = workdir / f"server{index + 1}"
        build_sample_lab(root, runs, seed=100 + index, scale=scale)
        ManifestGenerator(root).generate()
        labs[f"srv{index + 1}"] = root
    caches = workdir / "caches"
    remotes = _remotes_file(labs, workdir, caches, compress)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in [*labs, "all"]}
    with _served(labs, workdir, delay_ms, mbit * 1e6) as ssh_config:
        common = ("--config", str(remotes), "--ssh-config", str(ssh_config))
        for _round in range(repeat):
            for alias in labs:
                shutil.rmtree(caches, ignore_errors=True)
                seconds, stats = _runicorn("sync", alias, *common)
                runs[alias].append((seconds, stats["_cpu"], int(stats["bytes_downloaded"])))
            shutil.rmtree(caches, ignore_errors=True)
            seconds, document = _runicorn("sync", "--all", *common)
            assert document["exit_code"] == 0, document
            moved = sum(int(r["bytes_downloaded"]) for r in document["remotes"])
            runs["all"].append((seconds, document["_cpu"], moved))
    return {
        name: (
            statistics.median(wall for wall, _cpu, _bytes in values),
            statistics.median(cpu for _wall, cpu, _bytes in values),
            int(statistics.median(moved for _wall, _cpu, moved in values)),
        )
        for name, values in runs.items()
    }


def measure_projects(
    workdir: Path, runs: int, scale: float, repeat: int
) -> dict[str, tuple[float, float]]:
    """Median bytes read by a full cold sync and by a cold --project sync of each project,
    with the bytes of run files each set out to fetch (the rest is the manifest)."""
    root = workdir / "lab500"
    info = build_sample_lab(root, runs, seed=runs, scale=scale, projects=5)
    ManifestGenerator(root).generate()
    projects = sorted({run.project for run in info.listed_runs})
    cache = workdir / "cache500"
    results: dict[str, list[tuple[float, float]]] = {"full": [], **{p: [] for p in projects}}
    with _served({"lab": root}, workdir, 0.0, None) as ssh_config:
        source = f"lab:{root}"
        for _round in range(repeat):
            for what in ["full", *projects]:
                shutil.rmtree(cache, ignore_errors=True)
                selection = [] if what == "full" else ["--project", what]
                _seconds, stats = _runicorn(
                    "sync", source, str(cache), "--ssh-config", str(ssh_config), *selection
                )
                results[what].append(
                    (float(stats["bytes_downloaded"]), float(stats["bytes_total"]))
                )
    return {
        what: (
            statistics.median(read for read, _files in values),
            statistics.median(files for _read, files in values),
        )
        for what, values in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="multi_remote.py", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round trip of each link")
    parser.add_argument("--mbit", type=float, default=20.0, help="bandwidth of each link")
    parser.add_argument("--scale", type=float, default=0.5, help="file sizes of the --all labs")
    parser.add_argument("--runs", type=int, default=500, help="runs of the --project lab")
    parser.add_argument(
        "--project-scale", type=float, default=1.0, help="file sizes of the --project lab"
    )
    parser.add_argument(
        "--compress",
        action="store_true",
        help="SSH compression on (off by default: the three servers share this machine's "
        "cores, so their zlib would make the CPU, not the links, what --all waits for)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--skip-all", action="store_true", help="only the --project figure")
    parser.add_argument("--skip-projects", action="store_true", help="only the --all figure")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runicorn-multi-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_all:
            figures = measure_all(
                workdir / "all", args.scale, args.rtt_ms / 2, args.mbit, args.repeat, args.compress
            )
            slowest = max(wall for name, (wall, _c, _b) in figures.items() if name != "all")
            print(
                f"## runicorn sync --all over three servers ({args.rtt_ms:g} ms RTT, "
                f"{args.mbit:g} Mbit/s each; runs {', '.join(map(str, ALL_RUNS))}, "
                f"scale {args.scale:g}, SSH compression {'on' if args.compress else 'off'})\n"
            )
            print("| sync | seconds | CPU seconds | bytes read |\n|---|---|---|---|")
            for name, (wall, cpu, moved) in figures.items():
                label = "--all" if name == "all" else f"{name} alone"
                print(f"| {label} | {wall:.2f} | {cpu:.2f} | {moved:,} |")
            ratio = figures["all"][0] / slowest
            print(f"\n--all / slowest alone: {ratio:.2f}x (target <= 1.2x)\n")
        if not args.skip_projects:
            sizes = measure_projects(
                workdir / "projects", args.runs, args.project_scale, args.repeat
            )
            full, full_files = sizes.pop("full")
            print(
                f"## --project on the {args.runs}-run lab of five projects "
                f"(scale {args.project_scale:g})\n"
            )
            print(
                "| sync | bytes read (median) | of the full sync's | the project's share of "
                "the lab's run files | manifest and overhead |\n|---|---|---|---|---|"
            )
            print(f"| full | {full:,.0f} | 100 % | 100 % | {full - full_files:,.0f} |")
            for project, (size, files) in sizes.items():
                print(
                    f"| --project {project} | {size:,.0f} | {size / full:.1%} | "
                    f"{files / full_files:.1%} | {size - files:,.0f} |"
                )
            reads = [size for size, _files in sizes.values()]
            print(
                f"\nmean project / full: {statistics.mean(reads) / full:.1%}; largest project / "
                f"full: {max(reads) / full:.1%} (target <= 25 %)"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

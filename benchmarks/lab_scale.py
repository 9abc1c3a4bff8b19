"""`runicorn sync` against `rsync -a` on a lab of many runs, over a local directory or SSH.

By default no network is in these figures: the lab and both destinations are local
directories (put them on tmpfs, ``--workdir /dev/shm/...``), so what is measured is the
per-file and per-run cost of each tool. With ``--wan`` both tools reach the lab through a
throw-away sshd on 127.0.0.1 behind the WAN emulator (``harness.wan_proxy``: ``--rtt-ms``,
``--mbit``, 50 ms / 100 Mbit/s by default), as ``benchmarks/wan_sync.py`` does, and the
server's SFTP request count (sftp-server's log) is reported for runicorn. For one lab of
``--runs N`` runs at ``--scale S`` (built once, or reused with ``--lab``), three scenarios
run for both tools, each a fresh process:

* cold: empty destination;
* no change: run again at once;
* step: ``--step-runs`` running runs append a line to ``events.jsonl`` (and their
  ``logs.txt``), the server regenerates its full manifest and then its active one (as cron
  or a publisher does), then the tool syncs.

One tool runs its three scenarios, its destination is removed, then the other's run (each
with its own step of the same runs): a 100,000-run lab and two full copies of it would need
about three million inodes, more than a default tmpfs of 24 GB has.

Each figure is the command's wall time, its CPU time (user + system, of the process and the
children it waited for) and its peak memory (``ru_maxrss`` from ``wait4``). rsync excludes
``*.lock`` and ``.runicorn/`` so both tools move the same files. The table is printed as
Markdown; ``--json`` prints the numbers too.

The package is compiled to bytecode first (``compileall``), as an installed wheel is: from
an editable install under ``PYTHONDONTWRITEBYTECODE`` every ``runicorn`` process would
otherwise compile each module it imports, a start-up cost no installed copy has.
``--no-bytecode`` measures that case instead.

    python benchmarks/lab_scale.py --runs 10000 --scale 0.01 --workdir /dev/shm/bench
    python benchmarks/lab_scale.py --runs 10000 --scale 0.01 --workdir /dev/shm/bench --wan

At 100,000 runs a cold sync over the emulated link takes a quarter of an hour or more per
tool; ``--cold-unthrottled`` runs the cold syncs through the emulator with its delay and cap
off (the same address, so runicorn's cache takes it for the same server), and only no change
and the step at its 50 ms / 100 Mbit/s.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
import runicorn
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.demo.sample_lab import build_sample_lab
from wan_sync import write_client_config

ALIAS = "labscale"

SEED = 7
NOW = 1735689600.0


@dataclass
class Figure:
    """One command's cost."""

    wall: float
    cpu: float
    max_rss_mb: float
    detail: str = ""
    requests: int | None = None
    """SFTP requests the server answered (``--wan``, runicorn only)."""


@dataclass
class Link:
    """How the tools reach the lab: directly, or over SSH through the WAN emulator."""

    config: Path | None = None
    server: SshServer | None = None
    proxy: WanProxy | None = None
    """``--cold-unthrottled``: the emulator the cold syncs pass through at loopback speed."""

    def cold(self) -> contextlib.AbstractContextManager[None]:
        return self.proxy.unthrottled() if self.proxy is not None else contextlib.nullcontext()

    def source(self, lab: Path) -> str:
        return str(lab) if self.config is None else f"{ALIAS}:{lab}"


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


def runicorn_sync(lab: Path, cache: Path, link: Link) -> Figure:
    command = [sys.executable, "-m", "runicorn", "sync", link.source(lab), str(cache), "--json"]
    if link.config is not None:
        command += ["--ssh-config", str(link.config), "--jitter", "0"]
    if link.server is not None:
        link.server.reset_request_counts()
    figure, out = measure(command)
    if link.server is not None:
        figure.requests = link.server.sftp_request_count(wait_for_close=True).total
    stats = orjson.loads(out)
    figure.detail = "skipped" if stats["skipped"] else f"{stats['files_synced']} files"
    if "delta_from" in stats:
        figure.detail += f", active manifest in place of the full one ({stats['reason']})"
    return figure


def rsync(lab: Path, destination: Path, link: Link) -> Figure:
    remote = [] if link.config is None else ["-e", f"ssh -F {link.config}"]
    figure, out = measure(
        [
            "rsync",
            "-a",
            "--stats",
            "--exclude=*.lock",
            "--exclude=.runicorn/",
            *remote,
            f"{link.source(lab)}/",
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
    """Regenerate the full manifest, then the active one (which then names the new full
    one), each in a child process: generating in this one would grow it, and the children
    forked afterwards would report its memory as theirs. Returns the seconds of both."""
    seconds = 0.0
    for kind in ("--full", "--active"):
        figure, _out = measure(
            [
                sys.executable,
                "-m",
                "runicorn",
                "generate-manifest",
                "--root",
                str(lab),
                kind,
                "--json",
            ]
        )
        seconds += figure.wall
    return seconds


def set_aside(destination: Path, keep: bool) -> None:
    """Remove a tool's destination, or with ``keep`` rename it to ``NAME.done`` for the
    caller to remove after the run (a million files take minutes to delete on a busy disk:
    time nobody measures, spent holding the benchmark lock)."""
    if keep:
        destination.rename(destination.with_name(destination.name + ".done"))
    else:
        shutil.rmtree(destination)


def run_scenarios(
    lab: Path,
    workdir: Path,
    stepping: list[Path],
    link: Link,
    *,
    cold_only: bool = False,
    keep: bool = False,
    rsync_first: bool = False,
) -> tuple[dict[str, list[Figure]], float]:
    """Cold, no change and step for each tool, one tool after the other (only cold with
    ``cold_only``: the lab is only read, so it may be a hard-linked copy of another)."""
    figures: dict[str, list[Figure]] = {}
    generation = 0.0
    tools: list[tuple[Callable[[Path, Path, Link], Figure], Path]] = [
        (runicorn_sync, workdir / "cache"),
        (rsync, workdir / "rsync"),
    ]
    if rsync_first:
        tools.reverse()
    for tool, destination in tools:
        shutil.rmtree(destination, ignore_errors=True)
        if cold_only:
            figures[tool.__name__] = [tool(lab, destination, link)]
            set_aside(destination, keep)
            continue
        with link.cold():
            cold = tool(lab, destination, link)
        unchanged = tool(lab, destination, link)
        step(lab, stepping, time.time())
        generation = generate(lab)
        figures[tool.__name__] = [cold, unchanged, tool(lab, destination, link)]
        set_aside(destination, keep)
    return figures, generation


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
    parser.add_argument("--wan", action="store_true", help="over SSH through the WAN emulator")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="--wan: round trip")
    parser.add_argument("--mbit", type=float, default=100.0, help="--wan: bandwidth cap")
    parser.add_argument(
        "--cold-unthrottled",
        action="store_true",
        help="--wan: the cold syncs through the emulator without its delay and cap (the same "
        "server to both tools), for a lab whose cold sync over the link would take too long",
    )
    parser.add_argument(
        "--cold-only",
        action="store_true",
        help="only the cold scenario; the lab is never written (a hard-linked copy will do)",
    )
    parser.add_argument(
        "--keep-destinations",
        action="store_true",
        help="leave each destination as WORKDIR/cache.done and WORKDIR/rsync.done instead "
        "of deleting it (remove them after the run; they must not exist before it)",
    )
    parser.add_argument(
        "--rsync-first",
        action="store_true",
        help="run rsync's scenarios before runicorn's (the tool that goes second finds the "
        "first one's writes still being written back, and on ext4 without a journal new "
        "files cost more for a few minutes after many were deleted)",
    )
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="do not compile the package first (an editable install's start-up)",
    )
    args = parser.parse_args(argv)

    if args.keep_destinations:
        for name in ("cache.done", "rsync.done"):
            if (args.workdir / name).exists():
                parser.error(f"{args.workdir / name} exists: remove it first")
    load_at_start = os.getloadavg()[0]
    if not args.no_bytecode:
        compileall.compile_dir(Path(runicorn.__file__).parent, quiet=1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    lab = args.lab
    if lab is None:
        lab = args.workdir / f"lab-{args.runs}"
        if not lab.exists():
            build_sample_lab(lab, args.runs, seed=SEED, scale=args.scale, now=NOW)
            generate(lab)
            # The lab's runs (about 1 GB at 100,000 runs) are no longer needed here.
            gc.collect()
        elif not (lab / ".runicorn" / "active_manifest.json.gz").exists():
            generate(lab)  # a lab built before active manifests named the full ones
    stepping = [] if args.cold_only else running_runs(lab, args.step_runs)
    names = ("cold",) if args.cold_only else ("cold", "no change", f"{args.step_runs}-run step")
    if args.wan:
        with (
            SshServer(count_requests=True) as server,
            WanProxy(
                "127.0.0.1", server.port, delay_ms=args.rtt_ms / 2, bandwidth_bps=args.mbit * 1e6
            ) as proxy,
        ):
            config = write_client_config(server, proxy.port, args.workdir, alias=ALIAS)
            link = Link(config, server, proxy if args.cold_unthrottled else None)
            figures, generation = run_scenarios(
                lab,
                args.workdir,
                stepping,
                link,
                cold_only=args.cold_only,
                keep=args.keep_destinations,
                rsync_first=args.rsync_first,
            )
        where = f"over SSH, {args.rtt_ms:g} ms RTT, {args.mbit:g} Mbit/s (WAN emulator)"
        if args.cold_unthrottled:
            where += "; the cold syncs unthrottled (not WAN figures)"
    else:
        figures, generation = run_scenarios(
            lab,
            args.workdir,
            stepping,
            Link(),
            cold_only=args.cold_only,
            keep=args.keep_destinations,
            rsync_first=args.rsync_first,
        )
        where = "local directory"
    rows = dict(
        zip(names, zip(figures["runicorn_sync"], figures["rsync"], strict=True), strict=True)
    )

    print(
        f"lab: {lab}, {where}; load average {load_at_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end"
    )
    print(
        "runicorn started from sources compiled on the fly (editable install)"
        if args.no_bytecode
        else "runicorn started from compiled bytecode (as an installed package)"
    )
    if not args.cold_only:
        print(f"the step's manifests generated in {generation:.2f} s")
    print()
    print("| | `runicorn sync` | `rsync -a` | ratio |" + (" SFTP requests |" if args.wan else ""))
    print("|---|---|---|---|" + ("---|" if args.wan else ""))
    for name, (ours, theirs) in rows.items():
        print(
            f"| {name} | {ours.wall:.2f} s ({ours.cpu:.2f} s CPU), {ours.max_rss_mb:.0f} MB"
            f" | {theirs.wall:.2f} s ({theirs.cpu:.2f} s CPU), {theirs.max_rss_mb:.0f} MB"
            f" | {ours.wall / theirs.wall:.2f}x |" + (f" {ours.requests} |" if args.wan else "")
        )
    for name, (ours, _theirs) in rows.items():
        print(f"- runicorn {name}: {ours.detail}")
    if args.json:
        document = {
            name: {"runicorn": asdict(ours), "rsync": asdict(theirs)}
            for name, (ours, theirs) in rows.items()
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

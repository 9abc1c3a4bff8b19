"""Live sync latency: a line written on the server, in the laptop's cache how much later?

A sample lab of small runs is served by a throw-away sshd behind the WAN emulator (fixed delay
each way, bandwidth cap). Two phases run one after the other in the same invocation, so the
figures share the machine's load:

* **runicorn**: the publisher (``runicorn generate-manifest --root ROOT --watch``) and the
  client (``runicorn sync HOST:ROOT CACHE --watch``) run as child processes. Complete lines are
  appended at random moments (exponential gaps) to running runs' ``events.jsonl`` and new run
  directories (meta, status, events) are created; a poller stats the cached copies every few
  milliseconds and records when each write has arrived. Then, with nothing written, the SFTP
  requests the server logged (``sftp-server -l DEBUG3``, counted on the server) and the CPU of
  the publisher and the client over an idle period; then the publisher's CPU while
  ``--writers`` runs each append ``--rate`` lines a second (benchmarks/publisher_cpu.py).
* **rsync**: ``rsync -a`` over ssh through the same emulated link, in a loop (the next pass
  starts when one ends), with the same kind of writes and the same poller on its mirror.

For each runicorn write the poller also notes when the publisher republished the active
manifest after it, which splits the latency into the publisher's share and the client's.

    python benchmarks/live_latency.py                      # 10,000 runs, the documented run
    python benchmarks/live_latency.py --runs 100000 --scale 0.01
    python benchmarks/live_latency.py --quick --json        # 1,000 runs, few samples
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from publisher_cpu import Publisher, cpu_seconds, peak_rss_mb, running_runs, write_load
from runicorn.demo.sample_lab import EVENTS, META, STATUS, build_sample_lab
from runicorn.format.models import ManifestType
from wan_sync import ALIAS, write_client_config

POLL_SECONDS = 0.005
"""How often the poller stats every file it waits for (a stat costs microseconds)."""
ARRIVAL_TIMEOUT = 120.0
"""A write not in the cache after this long counts as lost."""
RSYNC_EXCLUDES = ["--exclude=*.lock", "--exclude=.runicorn/"]
TITLES = {
    "runicorn": "runicorn",
    "runicorn_polling": "runicorn, polling",
    "rsync": "rsync -a loop",
}


@dataclass
class Write:
    """One write on the server and when its copy arrived at the destination."""

    kind: str  # "append" or "new run"
    rel: str  # the written file, relative to the root
    size: int  # the destination file's size once the write is there
    tail: bytes  # the bytes that end the file then
    written: float  # time.monotonic() after the write was flushed and closed
    seen: float | None = None
    published: float | None = None  # runicorn: the next active publication after it

    @property
    def latency(self) -> float | None:
        return None if self.seen is None else self.seen - self.written


@dataclass
class Phase:
    """What one tool did with one schedule of writes."""

    tool: str
    writes: list[Write] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def latencies(self, kind: str) -> list[float]:
        return sorted(w.latency for w in self.writes if w.kind == kind and w.latency is not None)

    def lost(self) -> int:
        return sum(w.seen is None for w in self.writes)


# -- watching the destination -------------------------------------------------------------------


class ArrivalPoller:
    """Stats each pending write's destination file until it holds the write.

    A thread of its own; ``publications`` is an optional file (the server's active manifest)
    whose changes are timed as well, so a write's latency can be split at the publication.
    """

    def __init__(self, destination: Path, publications: Sequence[Path] = ()) -> None:
        self.destination = destination
        self.publications = list(publications)
        self.published: list[float] = []
        self._pending: list[Write] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arrival-poller", daemon=True)
        self._thread.start()

    def add(self, write: Write) -> None:
        with self._lock:
            self._pending.append(write)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        marks = []
        for path in self.publications:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                marks.append((0, 0, 0))
            else:
                marks.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(marks)

    def _run(self) -> None:
        last = self._signature()
        while not self._stop.wait(POLL_SECONDS):
            now = time.monotonic()
            if self.publications:
                mark = self._signature()
                if mark != last:
                    last = mark
                    self.published.append(now)
            with self._lock:
                pending = list(self._pending)
            arrived = [w for w in pending if self._arrived(w)]
            if arrived:
                with self._lock:
                    for write in arrived:
                        write.seen = now
                        self._pending.remove(write)

    def _arrived(self, write: Write) -> bool:
        path = self.destination / write.rel
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < write.size:
                    return False
                return os.pread(handle.fileno(), len(write.tail), write.size - len(write.tail)) == (
                    write.tail
                )
        except (FileNotFoundError, NotADirectoryError):
            return False

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)


# -- writing on the server ------------------------------------------------------------------------


class Writer:
    """Appends lines to running runs and creates new runs, at random moments."""

    def __init__(self, root: Path, runs: list[Path], seed: int) -> None:
        self.root = root
        self.runs = runs
        self.rng = random.Random(seed)
        self.step = 10_000_000

    def append(self) -> Write:
        run = self.rng.choice(self.runs)
        path = run / EVENTS
        self.step += 1
        line = (
            f'{{"step": {self.step}, "time": {time.time():.3f}, "loss": {self.rng.random():.6f}}}\n'
        )
        with open(path, "ab") as handle:
            if handle.tell() and not _ends_with_newline(path):
                line = "\n" + line  # complete a fragment, so that our line is a whole one
            handle.write(line.encode())
            handle.flush()
            size = handle.tell()
        written = time.monotonic()
        return Write("append", str(path.relative_to(self.root)), size, line.encode()[-64:], written)

    def new_run(self) -> Write:
        experiment = self.rng.choice(self.runs).parent  # <project>/<name>/runs
        now = time.time()
        run_id = (
            time.strftime("%Y%m%d_%H%M%S", time.gmtime(now)) + f"_{self.rng.getrandbits(24):06x}"
        )
        run = experiment / run_id
        run.mkdir()
        project, name = experiment.parent.parent.name, experiment.parent.name
        meta = {"id": run_id, "project": project, "name": name, "created_at": round(now, 3)}
        (run / META).write_text(json.dumps(meta, indent=2))
        (run / STATUS).write_text(
            json.dumps({"status": "running", "started_at": round(now, 3), "ended_at": None})
        )
        line = f'{{"step": 1, "time": {now:.3f}, "loss": {self.rng.random():.6f}}}\n'.encode()
        (run / EVENTS).write_bytes(line)
        written = time.monotonic()
        return Write(
            "new run", str((run / EVENTS).relative_to(self.root)), len(line), line, written
        )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _schedule(appends: int, new_runs: int, seed: int) -> list[str]:
    kinds = ["append"] * appends + ["new run"] * new_runs
    random.Random(seed).shuffle(kinds)
    return kinds


def run_writes(
    writer: Writer, poller: ArrivalPoller, kinds: list[str], mean_gap: float, seed: int
) -> list[Write]:
    """Each write after an exponential gap (random moments against any tool's own timer)."""
    rng = random.Random(seed)
    writes = []
    for kind in kinds:
        time.sleep(min(4 * mean_gap, rng.expovariate(1 / mean_gap)))
        write = writer.append() if kind == "append" else writer.new_run()
        poller.add(write)
        writes.append(write)
    poller.wait_all(ARRIVAL_TIMEOUT)
    return writes


# -- the two tools ---------------------------------------------------------------------------


def _wait_in_sync(root: Path, destination: Path, runs: list[Path], timeout: float) -> None:
    """Until the destination holds every complete line of each run's events.jsonl."""
    deadline = time.monotonic() + timeout
    for run in runs:
        rel = (run / EVENTS).relative_to(root)
        data = (root / rel).read_bytes()
        want = data[: data.rfind(b"\n") + 1]
        while True:
            try:
                if (destination / rel).read_bytes()[: len(want)] == want:
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{destination / rel} did not catch up within {timeout:.0f} s")
            time.sleep(0.1)


def _wait_first_pass(client: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until the client has printed its first pass (``--json``: a line that is an object):
    writes timed while the cold sync still runs would measure the cold sync."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(b"{") for line in log.read_bytes().splitlines()):
        if client.poll() is not None:
            raise RuntimeError(f"the sync client exited {client.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client's first pass did not end within {timeout:.0f} s")
        time.sleep(0.2)


def _stop_child(process: subprocess.Popen[bytes], name: str) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise RuntimeError(f"{name} ignored SIGTERM for 60 s") from None
    return process.returncode


def runicorn_phase(
    args: argparse.Namespace,
    root: Path,
    work: Path,
    server: SshServer,
    config: Path,
    writable: list[Path],
    *,
    push: bool = True,
) -> Phase:
    """The publisher and ``sync --watch``; ``push=False`` makes the client poll."""
    phase = Phase("runicorn" if push else "runicorn, polling")
    cache = work / ("cache" if push else "cache-polling")
    env = {**os.environ, "RUNICORN_WATCH_PUSH": "1" if push else "0"}
    publisher = Publisher(root, list(args.publisher_arg))
    try:
        started = time.monotonic()
        phase.extra["publisher_source"] = publisher.wait_for(r"watching|polling").strip()
        publisher.wait_for(r"up to date", timeout=args.timeout)
        phase.extra["publisher_ready_s"] = time.monotonic() - started

        log = open(cache.with_suffix(".log"), "wb")  # noqa: SIM115 (open for the child's lifetime)
        command = [
            sys.executable,
            "-m",
            "runicorn",
            "sync",
            f"{ALIAS}:{root}",
            str(cache),
            "--ssh-config",
            str(config),
            "--watch",
            "--json",
            *args.client_arg,
        ]
        started = time.monotonic()
        client = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_first_pass(client, cache.with_suffix(".log"), args.timeout)
            phase.extra["first_sync_s"] = time.monotonic() - started
            _wait_in_sync(root, cache, writable, args.timeout)

            output = root / ".runicorn"
            active = [
                output / ManifestType.ACTIVE.filename,
                output / (ManifestType.ACTIVE.filename + ".gz"),
            ]
            poller = ArrivalPoller(cache, active)
            writer = Writer(root, writable, args.seed)
            kinds = _schedule(args.samples, args.new_runs, args.seed)
            try:
                phase.writes = run_writes(writer, poller, kinds, args.gap, args.seed)
            finally:
                poller.stop()
            for write in phase.writes:
                write.published = next((t for t in poller.published if t >= write.written), None)

            time.sleep(args.settle)
            server.reset_request_counts()
            cpu_before = cpu_seconds(publisher.process.pid), cpu_seconds(client.pid)
            publications = publisher.published
            time.sleep(args.idle)
            counts = server.sftp_request_count()
            cpu_after = cpu_seconds(publisher.process.pid), cpu_seconds(client.pid)
            phase.extra["idle_s"] = args.idle
            phase.extra["idle_requests"] = counts.total
            phase.extra["idle_requests_by_type"] = dict(counts.by_type)
            phase.extra["idle_requests_per_s"] = counts.total / args.idle
            phase.extra["idle_publications"] = publisher.published - publications
            phase.extra["publisher_idle_pct"] = 100 * (cpu_after[0] - cpu_before[0]) / args.idle
            phase.extra["client_idle_pct"] = 100 * (cpu_after[1] - cpu_before[1]) / args.idle

            loaded = running_runs(root, args.writers)
            cpu_before = cpu_seconds(publisher.process.pid), cpu_seconds(client.pid)
            publications = publisher.published
            wall = time.monotonic()
            lines = write_load(loaded, args.rate, args.load)
            wall = time.monotonic() - wall
            cpu_after = cpu_seconds(publisher.process.pid), cpu_seconds(client.pid)
            phase.extra["load"] = f"{len(loaded)} runs x {args.rate:g} lines/s, {lines} lines"
            phase.extra["load_publications"] = publisher.published - publications
            phase.extra["publisher_load_pct"] = 100 * (cpu_after[0] - cpu_before[0]) / wall
            phase.extra["client_load_pct"] = 100 * (cpu_after[1] - cpu_before[1]) / wall
            phase.extra["publisher_peak_rss_mb"] = peak_rss_mb(publisher.process.pid)
        finally:
            phase.extra["client_exit"] = _stop_child(client, "the sync client")
            log.close()
    finally:
        phase.extra["publisher_exit"] = publisher.stop()
        (work / ("publisher.log" if push else "publisher-polling.log")).write_text(
            "".join(f"{line}\n" for line in publisher.log)
        )
    return phase


class RsyncLoop:
    """``rsync -a`` again and again (``while true; do rsync …; done``) in a thread."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.passes: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rsync-loop", daemon=True)

    def once(self) -> float:
        started = time.monotonic()
        done = subprocess.run(self.command, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 24):  # 24: files vanished during the transfer
            raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr[-2000:]}")
        return time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(600)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.passes.append(self.once())
            except RuntimeError:
                self.failures += 1
                time.sleep(1)


def rsync_phase(
    args: argparse.Namespace, root: Path, work: Path, config: Path, writable: list[Path]
) -> Phase:
    phase = Phase("rsync")
    mirror = work / "rsync"
    loop = RsyncLoop(
        ["rsync", "-a", *RSYNC_EXCLUDES, "-e", f"ssh -F {config}", f"{ALIAS}:{root}/", f"{mirror}/"]
    )
    phase.extra["first_sync_s"] = loop.once()
    loop.start()
    poller = ArrivalPoller(mirror)
    writer = Writer(root, writable, args.seed + 1)
    kinds = _schedule(args.rsync_samples, args.new_runs, args.seed + 1)
    try:
        phase.writes = run_writes(writer, poller, kinds, args.gap, args.seed + 1)
    finally:
        poller.stop()
        loop.stop()
    phase.extra["passes"] = len(loop.passes)
    phase.extra["pass_median_s"] = statistics.median(loop.passes) if loop.passes else math.nan
    phase.extra["pass_failures"] = loop.failures
    return phase


# -- report -----------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: every figure is a measured latency)."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summary(phase: Phase) -> dict[str, Any]:
    appends, new_runs = phase.latencies("append"), phase.latencies("new run")
    result: dict[str, Any] = {
        "append_samples": len(appends),
        "append_p50": _quantile(appends, 0.5),
        "append_p95": _quantile(appends, 0.95),
        "append_max": max(appends, default=math.nan),
        "new_run_samples": len(new_runs),
        "new_run_median": _quantile(new_runs, 0.5),
        "new_run_max": max(new_runs, default=math.nan),
        "lost": phase.lost(),
    }
    publisher_share = [
        w.published - w.written
        for w in phase.writes
        if w.kind == "append"
        and w.published is not None
        and w.seen is not None
        and w.published <= w.seen
    ]
    if publisher_share:
        publisher_share.sort()
        client_share = sorted(
            w.seen - w.published
            for w in phase.writes
            if w.kind == "append"
            and w.published is not None
            and w.seen is not None
            and w.published <= w.seen
        )
        result["append_publisher_p50"] = _quantile(publisher_share, 0.5)
        result["append_client_p50"] = _quantile(client_share, 0.5)
        result["append_client_p95"] = _quantile(client_share, 0.95)
    result.update(phase.extra)
    return result


def _fmt(value: Any, unit: str = "s") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "/s":
        return f"{value:.2f} /s"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.2f} s"


def table(columns: dict[str, dict[str, Any]]) -> str:
    """One row per figure, one column per tool (``{tool: summary}``), then the target."""
    rows = [
        ("appended line, p50", "append_p50", "s", "<= 0.75 s"),
        ("appended line, p95", "append_p95", "s", "<= 1.5 s (100k runs: <= 2 s)"),
        ("appended line, max", "append_max", "s", ""),
        ("  publisher's share, p50", "append_publisher_p50", "s", ""),
        ("  client's share, p50", "append_client_p50", "s", ""),
        ("  client's share, p95", "append_client_p95", "s", ""),
        ("new run, median", "new_run_median", "s", ""),
        ("new run, max", "new_run_max", "s", "<= 3 s"),
        ("first (cold) sync", "first_sync_s", "s", ""),
        ("rsync pass, median", "pass_median_s", "s", ""),
        ("idle SFTP requests", "idle_requests_per_s", "/s", "<= 2 /s"),
        ("publisher CPU, idle", "publisher_idle_pct", "%", "<= 2 %"),
        ("publisher CPU, load", "publisher_load_pct", "%", "<= 25 %"),
        ("client CPU, idle", "client_idle_pct", "%", ""),
        ("publisher peak RSS", "publisher_peak_rss_mb", "MB", ""),
    ]
    lines = [
        "| | " + " | ".join(columns) + " | target |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for label, key, unit, target in rows:
        if not any(key in summary for summary in columns.values()):
            continue
        cells = " | ".join(_fmt(summary.get(key), unit) for summary in columns.values())
        lines.append(f"| {label} | {cells} | {target} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="runs in the lab (10000)")
    parser.add_argument("--scale", type=float, default=0.01, help="file-size scale of the lab")
    parser.add_argument(
        "--quick", action="store_true", help="1,000 runs, few samples, short idle and load periods"
    )
    parser.add_argument("--samples", type=int, default=None, help="appends timed (runicorn)")
    parser.add_argument("--rsync-samples", type=int, default=None, help="appends timed (rsync)")
    parser.add_argument("--new-runs", type=int, default=None, help="new runs timed, per tool")
    parser.add_argument(
        "--gap", type=float, default=None, help="mean seconds between two writes (exponential)"
    )
    parser.add_argument("--idle", type=float, default=None, help="idle seconds measured")
    parser.add_argument("--load", type=float, default=None, help="loaded seconds measured")
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds after the last write before the idle period",
    )
    parser.add_argument("--writers", type=int, default=100, help="runs appending under load")
    parser.add_argument("--rate", type=float, default=10.0, help="lines a second per run, load")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-rsync", action="store_true", help="skip the rsync phase")
    parser.add_argument(
        "--also-poll",
        action="store_true",
        help="a second runicorn phase with the push channel off (RUNICORN_WATCH_PUSH=0)",
    )
    parser.add_argument(
        "--publisher-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to generate-manifest --watch (repeatable)",
    )
    parser.add_argument(
        "--client-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to sync --watch, e.g. --client-arg=--interval=1 (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds allowed for the publisher's start and the first syncs",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --workdir: keep the lab and the caches a previous run left there (no build, "
        "an incremental first sync); for iterating, not for the documented figures",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "runs": 1000 if quick else 10_000,
        "samples": 12 if quick else 60,
        "rsync_samples": 6 if quick else 30,
        "new_runs": 2 if quick else 5,
        "gap": 0.4 if quick else 0.8,
        "idle": 4.0 if quick else 60.0,
        "load": 3.0 if quick else 30.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.settle == 3.0:
        args.settle = 1.0
    return args


def reused_running_runs(root: Path) -> list[Path]:
    """The running runs of a lab a previous invocation built (``status.json`` says so), their
    files' times moved to now, so that the active window selects them as it did in a fresh
    lab."""
    runs = []
    now = time.time()
    for status in sorted(root.glob(f"*/*/runs/*/{STATUS}")):
        run = status.parent
        if b'"running"' not in status.read_bytes() or (run / ".deleted").exists():
            continue
        runs.append(run)
        for path in run.iterdir():
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
    return runs


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    base = Path(tempfile.mkdtemp(prefix="runicorn-live-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.no_rsync and shutil.which("rsync") is None:
        sys.exit("rsync is not installed (apt-get install rsync); or pass --no-rsync")
    from runicorn.core.backend import active_backend

    report: dict[str, Any] = {
        "runs": args.runs,
        "scale": args.scale,
        "rtt_ms": args.rtt_ms,
        "mbit": args.mbit,
        "backend": active_backend().name,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
    }
    with _workdir(args.workdir) as work:
        root = work / "lab"
        started = time.monotonic()
        if args.reuse and args.workdir is not None and root.is_dir():
            writable = reused_running_runs(root)
            report["lab"] = {"reused": str(root), "running_runs": len(writable)}
            files, size = None, None
        else:
            info = build_sample_lab(root, args.runs, seed=args.seed, scale=args.scale)
            writable = [run.path for run in info.running_runs]
            report["lab"] = {"files": info.total_files, "bytes": info.total_bytes}
            report["lab"]["running_runs"] = len(writable)
            files, size = info.total_files, info.total_bytes
        report["lab"]["build_s"] = time.monotonic() - started
        with (
            SshServer(count_requests=True) as server,
            WanProxy(
                "127.0.0.1", server.port, delay_ms=args.rtt_ms / 2, bandwidth_bps=args.mbit * 1e6
            ) as proxy,
        ):
            config = write_client_config(server, proxy.port, work)
            setup = (root, work, server, config, writable)
            columns = {"runicorn": summary(runicorn_phase(args, *setup))}
            if args.also_poll:
                columns["runicorn_polling"] = summary(runicorn_phase(args, *setup, push=False))
            if not args.no_rsync:
                columns["rsync"] = summary(rsync_phase(args, root, work, config, writable))
            report.update(columns)
        report["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(
            f"{args.runs} runs (scale {args.scale:g}: {files or '?'} files, "
            f"{(size or 0) / 1e6:.1f} MB), {args.rtt_ms:g} ms RTT, {args.mbit:g} Mbit/s; "
            f"backend {report['backend']}; load average {report['loadavg_start']:.1f} at start, "
            f"{report['loadavg_end']:.1f} at end ({report['cpus']} CPUs)\n"
        )
        print(table({TITLES[key]: result for key, result in columns.items()}))
        ours = columns["runicorn"]
        counts = ", ".join(
            f"{TITLES[tool]} {result['append_samples']} + {result['new_run_samples']} new runs "
            f"({result['lost']} lost)"
            for tool, result in columns.items()
        )
        print(
            f"\nwrites timed: {counts}; idle {args.idle:g} s: {ours['idle_requests']} requests "
            f"{ours['idle_requests_by_type']}, {ours['idle_publications']} publications; "
            f"load: {ours['load']}, {ours['load_publications']} publications; "
            f"{ours['publisher_source']}"
        )
    return report


if __name__ == "__main__":
    main()

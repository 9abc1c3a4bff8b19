"""`runicorn sync` against `rsync -a` and `rsync -az` over emulated links, side by side.

For each lab size: a sample lab is built and its manifest generated; a throw-away sshd serves
it on 127.0.0.1 behind a :class:`WanProxy` (fixed delay each way, optional bandwidth cap: the
kernel here has no netem). Each link profile (``--profiles``: ``wan`` is ``--rtt-ms`` /
``--mbit``, 50 ms / 100 Mbit/s by default; ``lan`` is 2 ms RTT without a cap) runs three
scenarios for every tool, each a fresh process and a fresh SSH connection, wall time measured
around the whole command:

* cold: empty destination;
* no change: run again at once;
* training step: the lab trains (appends, rewrites, new and deleted runs), the manifest is
  regenerated, then every tool syncs.

The tools: ``rsync -a``, ``rsync -az`` and ``runicorn sync`` with its default flags (automatic
compression, the file stream for a first sync), with ``--compress``, with ``--no-compress``
and with ``--no-stream``; with ``--stream-python PATH`` also with its default flags and
``--stream-python PATH`` (``runicorn -P``): the stream run by that interpreter on the server,
which compresses with zstd when it can import it (this benchmark's own venv python stands for
a runicorn environment on a lab server), while the default ``python3`` here has only zlib.
The server account has this environment's ``runicorn`` in its ``~/.local/bin``, as a lab
server that publishes manifests has it installed, so the default stream swaps ``python3``
for that command's interpreter (zstd); ``--no-server-runicorn`` leaves it out, and
``--stream-python python3`` names the plain ``python3`` (no swap: zlib) in the ``-P`` column.
``--repeat N`` runs the
scenarios N times (each round into fresh destinations, after its own training step) and
reports the median of each number.

Bytes are what the proxy carried towards the client; SFTP requests are counted by the server
(sftp-server's own log), not trusted from the client. Server CPU is what sshd's children (the
session processes, sftp-server, rsync's server side, zlib included) used, read from sshd's
``cutime``/``cstime`` once they have exited. rsync excludes ``*.lock`` and ``.runicorn/`` so
every tool moves the same files. ``--media-only`` keeps only each run's ``meta.json``,
``status.json`` and ``media/`` (PNG, JPEG: already compressed) to show what compression
costs where it cannot win.

    python benchmarks/wan_sync.py --runs 100 500 1000 --profiles wan lan \
        --stream-python "$PWD/.venv/bin/python"
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _harness_path  # noqa: F401  (tests/ on sys.path, for harness)
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.demo.sample_lab import build_sample_lab, training_step
from runicorn.manifest import ManifestGenerator

ALIAS = "wanlab"
SCENARIOS = ("cold", "no change", "training step")
RUNICORN_FLAGS = {
    "runicorn": [],
    "runicorn -z": ["--compress"],
    "runicorn -Z": ["--no-compress"],
    "runicorn -S": ["--no-stream"],
}
"""``runicorn -Z`` is short for ``runicorn sync --no-compress`` in the tables, ``runicorn -S``
for ``runicorn sync --no-stream`` (SFTP only: what the default was before the file stream)."""
STREAM_PYTHON_TOOL = "runicorn -P"
"""``runicorn sync --stream-python PATH`` (with ``--stream-python`` given to this script)."""


def runicorn_flags(stream_python: str | None) -> dict[str, list[str]]:
    """The runicorn columns: the fixed ones, and ``-P`` when a server interpreter is given."""
    flags = dict(RUNICORN_FLAGS)
    if stream_python:
        flags[STREAM_PYTHON_TOOL] = ["--stream-python", stream_python]
    return flags


def tools_of(flags: dict[str, list[str]], skip: frozenset[str] = frozenset()) -> tuple[str, ...]:
    return tuple(t for t in ("rsync -a", "rsync -az", *flags) if t not in skip)


KEPT_TOOLS = ("rsync -az", "runicorn")
"""The columns every table needs (its ratios): ``--skip`` cannot leave them out."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Profile:
    name: str
    rtt_ms: float
    bandwidth_bps: float | None

    def __str__(self) -> str:
        cap = (
            "no bandwidth cap"
            if self.bandwidth_bps is None
            else (f"{self.bandwidth_bps / 1e6:.0f} Mbit/s")
        )
        return f"{self.name}: {self.rtt_ms:g} ms RTT, {cap}"


@dataclass
class Measurement:
    tool: str
    scenario: str
    seconds: float
    bytes_down: int
    requests: int | None
    server_cpu: float
    detail: str = ""


def write_client_config(
    server: SshServer, proxy_port: int, directory: Path, alias: str = ALIAS
) -> Path:
    """An ssh_config (and a known_hosts beside it) that reaches the server, as ``alias``,
    through the proxy's port."""
    return server.write_ssh_config(directory / "ssh_config", alias, via=("127.0.0.1", proxy_port))


def default_server_runicorn() -> Path | None:
    """This environment's ``runicorn`` command, which stands for the one a lab server has
    installed for ``runicorn generate-manifest`` (None if there is none)."""
    command = Path(sys.executable).parent / "runicorn"
    return command if command.is_file() else None


def install_server_runicorn(server: SshServer, command: Path) -> None:
    """Put ``command`` in the server account's ``~/.local/bin``, where pip and pipx install
    it (and where a non-interactive SSH session's ``PATH`` does not look): the file stream
    finds its interpreter there."""
    target = server.directory / "home" / ".local" / "bin" / "runicorn"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(command)


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()


def _server_cpu(server: SshServer) -> float:
    """CPU seconds of sshd's exited (reaped) descendants: ``cutime`` + ``cstime``."""
    assert server.pid is not None
    fields = _stat_fields(server.pid)  # fields[0] is the state (field 3 of stat)
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS


def _wait_sessions_gone(server: SshServer, timeout: float = 15.0) -> None:
    """Until sshd has reaped every session of the last command, so its CPU is counted."""
    assert server.pid is not None
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
    deadline = time.monotonic() + timeout
    while children.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.02)


def _measure(
    tool: str, scenario: str, command: list[str], proxy: WanProxy, server: SshServer
) -> Measurement:
    _wait_sessions_gone(server)
    # The last tool's files still dirty in the page cache would be written out on this
    # one's time: by runicorn's syncfs at the end of a sync, or by throttled writes.
    os.sync()
    proxy.reset_counters()
    server.reset_request_counts()
    cpu_before = _server_cpu(server)
    seconds, stdout = _timed(command)
    requests = None
    if tool.startswith("runicorn"):
        requests = server.sftp_request_count(wait_for_close=True).total
    _wait_sessions_gone(server)
    server_cpu = _server_cpu(server) - cpu_before
    detail = ""
    if tool.startswith("runicorn") and stdout.strip().startswith("{"):
        import orjson

        stats = orjson.loads(stdout)
        compression = stats.get("compression") or {}
        detail = (
            f"files {stats.get('files_synced')}, incr {stats.get('incremental_count')}, "
            f"full {stats.get('full_count')}, skipped {stats.get('skipped')}, "
            f"compression {'on' if compression.get('active') else 'off'} "
            f"({compression.get('reason')}, {compression.get('rtt_ms')} ms, "
            f"by {compression.get('carrier', 'ssh')})"
        )
    return Measurement(tool, scenario, seconds, proxy.bytes_down, requests, server_cpu, detail)


def _keep_media_only(lab: Path) -> tuple[int, int]:
    """Leave each run's meta.json, status.json and media/ (the already-compressed files);
    return the files and bytes left."""
    files = size = 0
    for path in sorted(lab.rglob("*"), reverse=True):
        if not path.is_file() or ".runicorn" in path.parts or path.suffix == ".lock":
            continue
        if path.name in ("meta.json", "status.json") or "media" in path.parts:
            files += 1
            size += path.stat().st_size
            continue
        path.unlink()
    return files, size


def run_lab(
    runs: int,
    scale: float,
    profiles: list[Profile],
    workdir: Path,
    repeat: int = 1,
    media_only: bool = False,
    flags: dict[str, list[str]] | None = None,
    server_runicorn: Path | None = None,
    skip: frozenset[str] = frozenset(),
):
    lab = workdir / f"lab{runs}"
    info = build_sample_lab(lab, runs, seed=runs, scale=scale)
    if media_only:
        info.total_files, info.total_bytes = _keep_media_only(lab)
    ManifestGenerator(lab).generate()
    results: dict[str, list[Measurement]] = {}
    with SshServer(count_requests=True) as server:
        if server_runicorn is not None:
            install_server_runicorn(server, server_runicorn)
        for index, profile in enumerate(profiles):
            with WanProxy(
                "127.0.0.1",
                server.port,
                delay_ms=profile.rtt_ms / 2,
                bandwidth_bps=profile.bandwidth_bps,
            ) as proxy:
                directory = workdir / profile.name
                directory.mkdir()
                config = write_client_config(server, proxy.port, directory)
                measured: list[Measurement] = []
                for round_number in range(repeat):
                    seed = runs + 100 * index + round_number
                    measured += _round(
                        seed,
                        lab,
                        directory / f"round{round_number}",
                        config,
                        proxy,
                        server,
                        train=not media_only,
                        flags=flags or RUNICORN_FLAGS,
                        skip=skip,
                    )
                results[profile.name] = measured
    return info, results


def _round(
    seed: int,
    lab: Path,
    directory: Path,
    config: Path,
    proxy: WanProxy,
    server: SshServer,
    *,
    train: bool,
    flags: dict[str, list[str]],
    skip: frozenset[str] = frozenset(),
) -> list[Measurement]:
    """The scenarios once, for every tool, into fresh destinations."""
    directory.mkdir(parents=True)
    commands: dict[str, list[str]] = {}
    for tool, tool_flags in flags.items():
        commands[tool] = [
            sys.executable,
            "-m",
            "runicorn",
            "sync",
            f"{ALIAS}:{lab}",
            str(directory / tool.replace(" ", "_")),
            "--ssh-config",
            str(config),
            "--jitter",
            "0",
            "--json",
            *tool_flags,
        ]
    for tool, options in (("rsync -a", ["-a"]), ("rsync -az", ["-az"])):
        commands[tool] = [
            "rsync",
            *options,
            "--exclude=*.lock",
            "--exclude=.runicorn/",
            "-e",
            f"ssh -F {config}",
            f"{ALIAS}:{lab}/",
            f"{directory / tool.replace(' ', '_')}/",
        ]
    results: list[Measurement] = []
    for scenario in SCENARIOS if train else SCENARIOS[:2]:
        if scenario == "training step":
            training_step(lab, seed=seed + 1, now=time.time())
            ManifestGenerator(lab).generate()
        for tool in tools_of(flags, skip):
            results.append(_measure(tool, scenario, commands[tool], proxy, server))
    return results


def _median(measurements: list[Measurement]) -> Measurement:
    """One row from several rounds: the median of each number (the first round's detail)."""
    first = measurements[0]
    requests = [m.requests for m in measurements if m.requests is not None]
    return Measurement(
        first.tool,
        first.scenario,
        statistics.median(m.seconds for m in measurements),
        int(statistics.median(m.bytes_down for m in measurements)),
        int(statistics.median(requests)) if requests else None,
        statistics.median(m.server_cpu for m in measurements),
        first.detail,
    )


def _table(runs: int, info, profile: Profile, results: list[Measurement]) -> str:
    tools = tuple(dict.fromkeys(m.tool for m in results))
    with_p = STREAM_PYTHON_TOOL in tools
    rounds: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        rounds.setdefault((m.tool, m.scenario), []).append(m)
    by_key = {key: _median(ms) for key, ms in rounds.items()}
    scenarios = [s for s in SCENARIOS if ("runicorn", s) in by_key]
    repeat = len(rounds[("runicorn", "cold")])
    rounds_note = f" (median of {repeat} rounds)" if repeat > 1 else ""
    lines = [
        f"\n### {runs} runs, {profile}: {info.total_files} files, "
        f"{info.total_bytes / 1e6:.1f} MB{rounds_note}\n",
        "Seconds (ratio of runicorn's default to rsync -az; -Z is --no-compress, "
        "-S --no-stream" + (", -P --stream-python" if with_p else "") + "):\n",
        "| scenario | "
        + " | ".join(tools)
        + " | runicorn / rsync -az"
        + (" | runicorn -P / rsync -az" if with_p else "")
        + " | SFTP requests |",
        "|---" * (len(tools) + 3 + with_p) + "|",
    ]
    for scenario in scenarios:
        row = [by_key[(tool, scenario)] for tool in tools]
        ours, theirs = by_key[("runicorn", scenario)], by_key[("rsync -az", scenario)]
        ratio_p = ""
        if with_p:
            ratio_p = f" | {by_key[(STREAM_PYTHON_TOOL, scenario)].seconds / theirs.seconds:.2f}x"
        lines.append(
            f"| {scenario} | "
            + " | ".join(f"{m.seconds:.2f}" for m in row)
            + f" | {ours.seconds / theirs.seconds:.2f}x{ratio_p} | {ours.requests} |"
        )
    lines += [
        "\nMB towards the client / server CPU seconds (sshd's children):\n",
        "| scenario | " + " | ".join(tools) + " |",
        "|---" * (len(tools) + 1) + "|",
    ]
    for scenario in scenarios:
        row = [by_key[(tool, scenario)] for tool in tools]
        lines.append(
            f"| {scenario} | "
            + " | ".join(f"{m.bytes_down / 1e6:.2f} / {m.server_cpu:.2f}" for m in row)
            + " |"
        )
    lines.append("")
    lines.extend(f"- {m.tool} {m.scenario}: {m.detail}" for m in by_key.values() if m.detail)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument(
        "--scale", type=float, default=2.9, help="file-size scale (2.9: ~48 MB/100 runs)"
    )
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=("wan", "lan"),
        default=["wan", "lan"],
        help="wan: --rtt-ms / --mbit; lan: 2 ms RTT, no bandwidth cap",
    )
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="the wan profile's RTT")
    parser.add_argument("--mbit", type=float, default=100.0, help="the wan profile's cap")
    parser.add_argument("--media-only", action="store_true", help="only meta, status, media/")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--stream-python",
        default=None,
        metavar="PATH",
        help="also run runicorn with --stream-python PATH (runicorn -P): e.g. this venv's "
        "python, which has zstandard",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of the scenarios; medians reported"
    )
    parser.add_argument(
        "--no-server-runicorn",
        action="store_true",
        help="leave runicorn out of the server account's ~/.local/bin: the default stream "
        "then runs the server's plain python3 (zlib here)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="TOOL",
        help="leave out a column (e.g. 'rsync -a', 'runicorn -S'), for shorter runs; "
        f"not {' or '.join(KEPT_TOOLS)}",
    )
    args = parser.parse_args()
    skip = frozenset(args.skip)
    if skip & set(KEPT_TOOLS):
        parser.error(f"--skip cannot leave out {' or '.join(KEPT_TOOLS)}: the ratios need them")
    server_runicorn = None if args.no_server_runicorn else default_server_runicorn()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed (apt-get install rsync)")
    known = {
        "wan": Profile("wan", args.rtt_ms, args.mbit * 1e6),
        "lan": Profile("lan", 2.0, None),
    }
    profiles = [known[name] for name in dict.fromkeys(args.profiles)]
    # An installed wheel has its bytecode; an editable install under PYTHONDONTWRITEBYTECODE
    # would compile every imported module in every timed command.
    import runicorn

    compileall.compile_dir(Path(runicorn.__file__).parent, quiet=2)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="runicorn-wan-"))
    from runicorn.core.backend import active_backend

    print(
        "; ".join(str(p) for p in profiles)
        + f"; python {sys.version.split()[0]}; backend {active_backend().name}"
        + "; runicorn's sources precompiled, as installed"
        + ("; media only" if args.media_only else "")
        + (f"; -P is --stream-python {args.stream_python}" if args.stream_python else "")
        + (
            f"; the server account has {server_runicorn} as ~/.local/bin/runicorn"
            if server_runicorn
            else "; no runicorn on the server account"
        )
    )
    try:
        for runs in args.runs:
            workdir = base / f"r{runs}"
            workdir.mkdir(parents=True)
            info, results = run_lab(
                runs,
                args.scale,
                profiles,
                workdir,
                max(1, args.repeat),
                args.media_only,
                runicorn_flags(args.stream_python),
                server_runicorn,
                skip,
            )
            for profile in profiles:
                print(_table(runs, info, profile, results[profile.name]), flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

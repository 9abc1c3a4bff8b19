"""`runicorn sync` against `rsync -a` over an emulated WAN link, side by side.

For each lab size: a sample lab is built and its manifest generated; a throw-away sshd serves
it on 127.0.0.1 behind a :class:`WanProxy` (fixed delay each way, bandwidth cap: the kernel
here has no netem). Three scenarios run for both tools, each a fresh process and a fresh SSH
connection, wall time measured around the whole command:

* cold: empty destination;
* no change: run again at once;
* training step: the lab trains (appends, rewrites, new and deleted runs), the manifest is
  regenerated, then both sync.

``--repeat N`` runs the three scenarios N times (each round into fresh destinations, after
its own training step) and reports the median of each number.

Bytes are what the proxy carried towards the client; SFTP requests are counted by the server
(sftp-server's own log), not trusted from the client. rsync excludes ``*.lock`` and
``.runicorn/`` so both tools move the same files.

    python benchmarks/wan_sync.py --runs 100 500 --rtt-ms 50 --mbit 100 --repeat 3
"""

from __future__ import annotations

import argparse
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


@dataclass
class Measurement:
    tool: str
    scenario: str
    seconds: float
    bytes_down: int
    requests: int | None
    detail: str = ""


def write_client_config(server: SshServer, proxy_port: int, directory: Path) -> Path:
    """An ssh_config and known_hosts that reach the server through the proxy's port."""
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{proxy_port} {server.host_public_key}\n")
    config = directory / "ssh_config"
    config.write_text(
        "\n".join(
            [
                f"Host {ALIAS}",
                "    HostName 127.0.0.1",
                f"    Port {proxy_port}",
                f"    User {server.username}",
                f"    IdentityFile {server.client_key_path}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {known_hosts}",
                "    StrictHostKeyChecking yes",
                "",
            ]
        )
    )
    return config


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def _measure(
    tool: str, scenario: str, command: list[str], proxy: WanProxy, server: SshServer
) -> Measurement:
    proxy.reset_counters()
    server.reset_request_counts()
    seconds, stdout = _timed(command)
    requests = None
    if tool == "runicorn":
        requests = server.sftp_request_count(wait_for_close=True).total
    detail = ""
    if tool == "runicorn" and stdout.strip().startswith("{"):
        import orjson

        stats = orjson.loads(stdout)
        detail = (
            f"files {stats.get('files_synced')}, incr {stats.get('incremental_count')}, "
            f"full {stats.get('full_count')}, skipped {stats.get('skipped')}"
        )
    return Measurement(tool, scenario, seconds, proxy.bytes_down, requests, detail)


def run_lab(
    runs: int, scale: float, delay_ms: float, bandwidth_bps: float, workdir: Path, repeat: int = 1
):
    lab = workdir / f"lab{runs}"
    info = build_sample_lab(lab, runs, seed=runs, scale=scale)
    ManifestGenerator(lab).generate()
    results: list[Measurement] = []
    with (
        SshServer(count_requests=True) as server,
        WanProxy("127.0.0.1", server.port, delay_ms=delay_ms, bandwidth_bps=bandwidth_bps) as proxy,
    ):
        config = write_client_config(server, proxy.port, workdir)
        for round_number in range(repeat):
            cache = workdir / f"cache{runs}-{round_number}"
            mirror = workdir / f"rsync{runs}-{round_number}"
            results += _round(runs + round_number, lab, cache, mirror, config, proxy, server)
    return info, results


def _round(
    seed: int,
    lab: Path,
    cache: Path,
    mirror: Path,
    config: Path,
    proxy: WanProxy,
    server: SshServer,
) -> list[Measurement]:
    """The three scenarios once, for both tools, into fresh destinations."""
    results: list[Measurement] = []
    runicorn = [
        sys.executable,
        "-m",
        "runicorn",
        "sync",
        f"{ALIAS}:{lab}",
        str(cache),
        "--ssh-config",
        str(config),
        "--jitter",
        "0",
        "--json",
    ]
    rsync = [
        "rsync",
        "-a",
        "--exclude=*.lock",
        "--exclude=.runicorn/",
        "-e",
        f"ssh -F {config}",
        f"{ALIAS}:{lab}/",
        f"{mirror}/",
    ]
    for scenario in ("cold", "no change", "training step"):
        if scenario == "training step":
            training_step(lab, seed=seed + 1, now=time.time())
            ManifestGenerator(lab).generate()
        results.append(_measure("runicorn", scenario, runicorn, proxy, server))
        results.append(_measure("rsync", scenario, rsync, proxy, server))
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
        first.detail,
    )


def _table(runs: int, info, results: list[Measurement]) -> str:
    lines = [
        f"\n### {runs} runs: {info.total_files} files, {info.total_bytes / 1e6:.1f} MB\n",
        "| scenario | runicorn s | rsync s | ratio | runicorn bytes | rsync bytes "
        "| SFTP requests |",
        "|---|---|---|---|---|---|---|",
    ]
    rounds: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        rounds.setdefault((m.tool, m.scenario), []).append(m)
    by_key = {key: _median(ms) for key, ms in rounds.items()}
    repeat = len(rounds[("runicorn", "cold")])
    if repeat > 1:
        lines[0] = lines[0].rstrip("\n") + f" (median of {repeat} rounds)\n"
    for scenario in ("cold", "no change", "training step"):
        ours, theirs = by_key[("runicorn", scenario)], by_key[("rsync", scenario)]
        lines.append(
            f"| {scenario} | {ours.seconds:.2f} | {theirs.seconds:.2f} | "
            f"{ours.seconds / theirs.seconds:.2f}x | {ours.bytes_down:,} | "
            f"{theirs.bytes_down:,} | {ours.requests} |"
        )
    lines.append("")
    lines.extend(f"- runicorn {m.scenario}: {m.detail}" for m in by_key.values() if m.detail)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[100, 500])
    parser.add_argument(
        "--scale", type=float, default=2.9, help="file-size scale (2.9: ~48 MB/100 runs)"
    )
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of the three scenarios; medians reported"
    )
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed (apt-get install rsync)")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="runicorn-wan-"))
    from runicorn.core.backend import active_backend

    print(
        f"WAN: {args.rtt_ms:.0f} ms RTT, {args.mbit:.0f} Mbit/s; "
        f"python {sys.version.split()[0]}; backend {active_backend().name}"
    )
    try:
        for runs in args.runs:
            workdir = base / f"r{runs}"
            workdir.mkdir(parents=True)
            info, results = run_lab(
                runs, args.scale, args.rtt_ms / 2, args.mbit * 1e6, workdir, max(1, args.repeat)
            )
            print(_table(runs, info, results), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``runicorn sync --watch`` when the link dies: it says so, reconnects with backoff on a new
SSH connection, and keeps the cache fresh afterwards, on both backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.child_lines import ChildLines
from harness.lab import Lab, assert_cache_equals_server
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.manifest import ManifestType

pytestmark = [pytest.mark.sshd, pytest.mark.lab(runs=6, scale=0.02)]

DEADLINE_SECONDS = 60.0


def _config_through(proxy: WanProxy, sshd_server: SshServer, tmp_path: Path) -> Path:
    """An ssh_config alias reaching the server through the proxy, trusting its key there."""
    return sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver", via=proxy.address)


def test_a_dropped_connection_is_reported_and_reestablished(
    lab: Lab, sshd_server: SshServer, tmp_path: Path, backend
):
    lab.publish(ManifestType.ACTIVE)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    with WanProxy(sshd_server.port) as proxy:
        config = _config_through(proxy, sshd_server, tmp_path)
        command = [sys.executable, "-m", "runicorn", "sync", f"labserver:{lab.root}", str(cache)]
        command += ["--ssh-config", str(config), "--watch", "--json", "--timeout", "2"]
        command += ["--interval", "0.05", "--full-interval", "0.5"]
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            out = ChildLines(child.stdout, DEADLINE_SECONDS)
            err = ChildLines(child.stderr, DEADLINE_SECONDS)
            try:
                out.expect(lambda line: line.startswith("{"))  # the cold sync
                proxy.close_all()
                err.expect(lambda line: "sync failed" in line and "retrying in" in line)
                err.expect(lambda line: "reconnected to labserver" in line)
                run = next(r for r in lab.info.listed_runs if r.status == "running")
                with open(run.path / "events.jsonl", "a") as handle:
                    handle.write('{"step": 31337}\n')
                lab.publish(ManifestType.ACTIVE, now=lab.now + 60)
                out.expect(lambda line: line.startswith("{") and '"files_synced":1,' in line)
                child.send_signal(signal.SIGTERM)
                child.wait(DEADLINE_SECONDS)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                out.join()
                err.join()
    assert child.returncode == 0, err.seen
    assert_cache_equals_server(lab.root, cache)

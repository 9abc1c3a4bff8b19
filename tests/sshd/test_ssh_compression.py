"""SSH compression over a real sshd: on, off and automatic give the same cache, the choice is
reported, the ssh config and the option are obeyed, and a re-key really turns it off (or on).
A first sync offers SSH no compression: its file stream compresses, with no re-key."""

from __future__ import annotations

import filecmp
import io
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from harness.lab import assert_cache_equals_server
from harness.sshd import SshServer
from harness.wan_proxy import WanProxy
from runicorn.cli import main
from runicorn.cli import sync as cli_sync
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator
from runicorn.transport import ssh as ssh_module
from runicorn.transport.link import AUTO_MIN_RTT, LinkMeasurement
from runicorn.transport.openssh_shortcuts import ENV_VAR, ClientTransport
from runicorn.transport.ssh import compression_choice, take_compression_back

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("cli_backend")]

NOW = 1_700_000_000.0


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> LabInfo:
    info = build_sample_lab(tmp_path / "lab", runs=6, seed=19, now=NOW)
    ManifestGenerator(info.root, backend=backend).generate()
    return info


def _config(server: SshServer, path: Path, *, port: int | None = None, extra: str = "") -> Path:
    """An ssh_config for alias ``labserver``, through ``port`` (a proxy) when given."""
    server.write_ssh_config(path, "labserver")
    text = path.read_text()
    if port is not None:
        known_hosts = path.with_name(path.name + ".known_hosts")
        known_hosts.write_text(f"[127.0.0.1]:{port} {server.host_public_key}\n")
        text = text.replace(f"Port {server.port}", f"Port {port}")
        text = text.replace(str(server.known_hosts_path), str(known_hosts))
    path.write_text(text + extra)
    return path


def _sync(lab: LabInfo, config: Path, cache: Path, *flags: str) -> dict:
    result: Result = CliRunner().invoke(
        main,
        [
            "sync",
            f"labserver:{lab.root}",
            str(cache),
            "--ssh-config",
            str(config),
            "--json",
            *flags,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    document: dict = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert document["failed_count"] == 0
    return document


def _same_tree(left: Path, right: Path) -> None:
    files = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file())
    runs = [f for f in files if "runs" in f.parts]
    assert runs
    _, mismatch, errors = filecmp.cmpfiles(left, right, [str(f) for f in runs], shallow=False)
    assert (mismatch, errors) == ([], [])


def test_on_off_and_automatic_give_byte_identical_caches(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path
) -> None:
    config = _config(sshd_server, tmp_path / "ssh_config")
    caches = {flag: tmp_path / f"cache{flag}" for flag in ("--compress", "--no-compress", "")}
    reports = {
        flag: _sync(lab, config, cache, *([flag] if flag else [])) for flag, cache in caches.items()
    }
    on, off, auto = (reports[flag]["compression"] for flag in caches)
    assert on["enabled"] and on["active"] and on["reason"] == "option"
    # A first sync leaves compression to the file stream: SSH never compresses.
    assert on["carrier"] == "stream" and on["negotiated"] == "none"
    assert off == {**off, "enabled": False, "active": False, "negotiated": "none"}
    assert auto["reason"] == "automatic" and auto["rtt_method"] == "handshake"
    # Whatever the busy machine measured, the choice follows it and the server agreed.
    assert auto["enabled"] == (auto["rtt_ms"] >= AUTO_MIN_RTT * 1000)
    assert auto["active"] == auto["enabled"]
    for cache in caches.values():
        assert_cache_equals_server(lab.root, cache)
    _same_tree(caches["--compress"], caches["--no-compress"])
    _same_tree(caches["--compress"], caches[""])


def test_a_long_link_is_compressed_by_default(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path
) -> None:
    # 2 x 10 ms of delay: every round trip takes at least 20 ms, above the threshold.
    with WanProxy("127.0.0.1", sshd_server.port, delay_ms=10) as proxy:
        config = _config(sshd_server, tmp_path / "ssh_config", port=proxy.port)
        report = _sync(lab, config, tmp_path / "cache")
    assert report["compression"]["enabled"] and report["compression"]["active"]
    assert report["compression"]["rtt_ms"] >= 20
    assert_cache_equals_server(lab.root, tmp_path / "cache")


@pytest.mark.parametrize(("word", "enabled"), [("yes", True), ("no", False)])
def test_the_ssh_config_decides_unless_the_option_says_otherwise(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path, word: str, enabled: bool
) -> None:
    config = _config(sshd_server, tmp_path / "ssh_config", extra=f"    Compression {word}\n")
    from_config = _sync(lab, config, tmp_path / "cache")["compression"]
    assert (from_config["enabled"], from_config["reason"]) == (enabled, "ssh_config")
    flag = "--no-compress" if enabled else "-z"
    overridden = _sync(lab, config, tmp_path / "cache", flag)["compression"]
    assert (overridden["enabled"], overridden["reason"]) == (not enabled, "option")
    assert overridden["active"] is (not enabled)


def test_a_rekey_turns_compression_off_for_both_directions(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    payload = (b'{"step": 1, "loss": 0.25}\n' * 40_000) + bytes(range(256)) * 64
    source = tmp_path / "events.jsonl"
    source.write_bytes(payload)
    client = sshd_server.runicorn_connect(compress=True)
    try:
        transport = client.get_transport()
        assert transport is not None
        choice = compression_choice(client)
        assert choice is not None and choice.active
        # What the automatic choice does on a fast link, forced here whatever was measured.
        off = ssh_module._settle_compression(transport, False, None, None)
        assert (off.enabled, off.negotiated) == (False, "none")
        assert transport.local_compression == "none"
        sftp = client.open_sftp()
        with sftp.open(str(source)) as remote:
            remote.prefetch(len(payload))
            assert remote.read() == payload
        sftp.putfo(io.BytesIO(payload), str(tmp_path / "uploaded"))
        assert (tmp_path / "uploaded").read_bytes() == payload
        sftp.close()
    finally:
        client.close()


def test_without_the_private_hooks_the_automatic_choice_uses_the_tcp_connect(
    sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    client = sshd_server.runicorn_connect()
    try:
        choice = compression_choice(client)
        assert choice is not None and choice.reason == "automatic"
        assert choice.link is not None and choice.link.method == "tcp connect"
        assert choice.active == choice.enabled == (choice.link.rtt >= AUTO_MIN_RTT)
        _, stdout, _ = client.exec_command("echo ok", timeout=10)
        assert stdout.read().strip() == b"ok"
    finally:
        client.close()


def test_a_stretched_key_exchange_is_checked_by_keepalives(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key exchange that a stall stretched to 200 ms on a loopback link: automatic "on",
    # then the keepalive probes measure the link again, on a thread, while files move.
    stretched = LinkMeasurement(0.2, "handshake")
    monkeypatch.setattr(ssh_module, "_measure_link", lambda transport, tcp_rtt: stretched)
    payload = b'{"step": 2, "acc": 0.75}\n' * 50_000
    source = tmp_path / "logs.txt"
    source.write_bytes(payload)
    client = sshd_server.runicorn_connect()
    try:
        sftp = client.open_sftp()
        for _ in range(3):  # reads before, during and after a re-key all arrive intact
            with sftp.open(str(source)) as remote:
                remote.prefetch(len(payload))
                assert remote.read() == payload
        choice = compression_choice(client)
        assert choice is not None and choice.reason == "automatic" and choice.link is not None
        assert choice.link.rtt <= stretched.rtt
        assert choice.enabled == (choice.link.rtt >= AUTO_MIN_RTT)
        assert choice.active == choice.enabled
        assert choice.negotiated == ("zlib@openssh.com" if choice.enabled else "none")
        sftp.close()
    finally:
        client.close()


@pytest.fixture
def rekeys(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each key re-exchange a connection asked for: whether it asked for compression."""
    asked: list[bool] = []
    renegotiate = ClientTransport.renegotiate_keys

    def record(self: ClientTransport) -> None:
        asked.append("zlib@openssh.com" in self.preferred_compression)
        renegotiate(self)

    monkeypatch.setattr(ClientTransport, "renegotiate_keys", record)
    return asked


def test_a_first_sync_gives_the_stream_compression_without_a_rekey(
    lab: LabInfo,
    sshd_server: SshServer,
    tmp_path: Path,
    rekeys: list[bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with WanProxy("127.0.0.1", sshd_server.port, delay_ms=10) as proxy:
        config = _config(sshd_server, tmp_path / "ssh_config", port=proxy.port)
        first = _sync(lab, config, tmp_path / "planned")["compression"]
        planned_rekeys = list(rekeys)
        # The same first sync with SSH compression offered, then handed over by a re-key.
        monkeypatch.setattr(cli_sync, "_streams_first_sync", lambda cache, options: False)
        handed = _sync(lab, config, tmp_path / "handed")["compression"]
    assert planned_rekeys == []
    assert rekeys == [False]
    for report in (first, handed):
        assert report["enabled"] and report["active"] and report["reason"] == "automatic"
        assert (report["carrier"], report["negotiated"]) == ("stream", "none")
    assert_cache_equals_server(lab.root, tmp_path / "planned")
    _same_tree(tmp_path / "planned", tmp_path / "handed")


def test_compression_meant_for_the_stream_goes_to_ssh_when_the_stream_cannot_run(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path, rekeys: list[bool]
) -> None:
    config = _config(sshd_server, tmp_path / "ssh_config")
    flags = ("--compress", "--stream-python", "no-such-python3")
    report = _sync(lab, config, tmp_path / "cache", *flags)["compression"]
    assert rekeys == [True]
    assert report["enabled"] and report["active"] and report["reason"] == "option"
    assert (report["carrier"], report["negotiated"]) == ("ssh", "zlib@openssh.com")
    assert_cache_equals_server(lab.root, tmp_path / "cache")


@pytest.mark.parametrize("compress", [True, False])
def test_a_connection_for_the_stream_agrees_no_compression_and_can_take_it_back(
    sshd_server: SshServer, tmp_path: Path, compress: bool
) -> None:
    payload = (b'{"step": 3, "loss": 0.125}\n' * 30_000) + bytes(range(256)) * 64
    source = tmp_path / "events.jsonl"
    source.write_bytes(payload)
    client = sshd_server.runicorn_connect(compress=compress, carrier="stream")
    try:
        transport = client.get_transport()
        assert transport is not None
        assert (transport.local_compression, transport.remote_compression) == ("none", "none")
        choice = compression_choice(client)
        assert choice is not None and (choice.enabled, choice.reason) == (compress, "option")
        assert choice.carrier == ("stream" if compress else "ssh")
        assert take_compression_back(transport) is compress
        expected = "zlib@openssh.com" if compress else "none"
        assert (transport.local_compression, transport.remote_compression) == (
            expected,
            expected,
        )
        back = compression_choice(client)
        assert back is not None and (back.carrier, back.negotiated) == ("ssh", expected)
        sftp = client.open_sftp()
        with sftp.open(str(source)) as remote:
            remote.prefetch(len(payload))
            assert remote.read() == payload
        sftp.close()
    finally:
        client.close()

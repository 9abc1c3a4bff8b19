"""``runicorn sync`` and ``runicorn demo`` end to end: against a real sshd through an ssh
config, and against a local directory, with the documented exit codes."""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from harness.lab import assert_cache_equals_server
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab, training_step
from runicorn.manifest import ManifestGenerator, ManifestType
from runicorn.sync import service as service_module

pytestmark = pytest.mark.usefixtures("cli_backend")

NOW = 1_700_000_000.0


@pytest.fixture
def lab(tmp_path: Path, backend: Backend) -> LabInfo:
    info = build_sample_lab(tmp_path / "lab", runs=8, seed=21, now=NOW)
    ManifestGenerator(info.root, backend=backend).generate()
    return info


@pytest.fixture
def ssh_config(sshd_server: SshServer, tmp_path: Path) -> Path:
    return sshd_server.write_ssh_config(tmp_path / "ssh_config", "labserver")


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _alias_sync_args(lab: LabInfo, ssh_config: Path, cache: Path) -> list[str]:
    """``runicorn sync labserver:<lab> <cache> --ssh-config <config>``: the lab over ssh."""
    return ["sync", f"labserver:{lab.root}", str(cache), "--ssh-config", str(ssh_config)]


def _stats(result: Result) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return orjson.loads(lines[0])


@pytest.mark.sshd
def test_sync_over_ssh_through_a_config_alias_prints_json_stats(
    lab: LabInfo, ssh_config: Path, tmp_path: Path
) -> None:
    result = _run(
        *_alias_sync_args(lab, ssh_config, tmp_path / "cache"),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    stats = _stats(result)
    assert stats["files_synced"] == lab.listed_files
    assert stats["failed_count"] == 0
    assert stats["mode"] == "manifest"
    assert stats["exit_code"] == 0


@pytest.mark.sshd
def test_second_sync_is_skipped_and_exits_zero(
    lab: LabInfo, ssh_config: Path, tmp_path: Path
) -> None:
    args = _alias_sync_args(lab, ssh_config, tmp_path / "cache")
    assert _run(*args).exit_code == 0
    result = _run(*args, "--json")
    assert result.exit_code == 0
    assert _stats(result)["skipped"] is True


@pytest.mark.sshd
def test_a_no_change_sync_is_four_sftp_requests_riding_on_the_session_start(
    lab: LabInfo, ssh_config: Path, sshd_server: SshServer, tmp_path: Path
) -> None:
    args = _alias_sync_args(lab, ssh_config, tmp_path / "cache")
    assert _run(*args).exit_code == 0
    # The first sync's last CLOSE may still be on its way to the server when it returns.
    sshd_server.reset_request_counts(after_sessions_end=True)
    result = _run(*args, "--json")
    assert _stats(result)["skipped"] is True
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    # OPEN + READ + CLOSE of the full manifest (its handle guessed right: one READ) and the
    # OPEN of the active manifest, which this lab does not have.
    assert counts.by_type == {"open": 2, "read": 1, "close": 1}


@pytest.mark.sshd
def test_a_no_change_sync_with_an_active_manifest_is_four_sftp_requests(
    lab: LabInfo, ssh_config: Path, sshd_server: SshServer, tmp_path: Path, backend: Backend
) -> None:
    ManifestGenerator(lab.root, backend=backend).generate(ManifestType.ACTIVE)
    # published a while ago, as a cron job or publisher leaves them: a stamp taken within
    # the mtime's second is not kept (another manifest could follow within that second)
    for manifest in (lab.root / ".runicorn").glob("*_manifest.json*"):
        os.utime(manifest, (time.time() - 120, time.time() - 120))
    args = _alias_sync_args(lab, ssh_config, tmp_path / "cache")
    assert _run(*args).exit_code == 0  # the full manifest, and the active one adopted
    sshd_server.reset_request_counts(after_sessions_end=True)
    result = _run(*args, "--json")
    assert _stats(result)["skipped"] is True
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    # the active manifest's first bytes (its handle guessed: OPEN, READ, CLOSE) and the
    # full manifest's size and mtime, as recorded: its header is not read
    assert counts.by_type == {"open": 1, "read": 1, "close": 1, "stat": 1}


@pytest.mark.sshd
def test_a_training_step_reads_each_manifest_once(
    lab: LabInfo, ssh_config: Path, sshd_server: SshServer, tmp_path: Path, backend: Backend
) -> None:
    def age_manifests(seconds: float) -> None:
        for manifest in (lab.root / ".runicorn").glob("*_manifest.json*"):
            os.utime(manifest, (time.time() - seconds, time.time() - seconds))

    age_manifests(120)  # a stamp is kept for the no-change check
    args = _alias_sync_args(lab, ssh_config, tmp_path / "cache")
    assert _run(*args).exit_code == 0
    training_step(lab.root, seed=22, now=NOW + 60)
    ManifestGenerator(lab.root, backend=backend).generate()
    age_manifests(60)
    sshd_server.reset_request_counts(after_sessions_end=True)
    stats = _stats(_run(*args, "--json"))
    assert stats["files_synced"] > 0
    counts = sshd_server.sftp_request_count(wait_for_close=True)
    # the first round trip's STAT of the full manifest and OPEN of the active one (this lab
    # has none), the full manifest's OPEN, and one OPEN per file: the active manifest is not
    # asked for again after the full one was applied
    assert counts.by_type["open"] == stats["files_synced"] + 2
    assert counts.by_type["stat"] == 1
    assert stats["failed_count"] == 0


@pytest.mark.sshd
def test_a_root_relative_to_the_login_directory_is_resolved_by_the_server(
    lab: LabInfo, ssh_config: Path, tmp_path: Path
) -> None:
    login_directory = Path(os.path.expanduser("~"))
    relative = os.path.relpath(lab.root, login_directory)
    cache = tmp_path / "cache"
    result = _run("sync", f"labserver:{relative}", str(cache), "--ssh-config", str(ssh_config))
    assert result.exit_code == 0, result.output
    document = _stats(
        _run("sync", f"labserver:{relative}", str(cache), "--ssh-config", str(ssh_config), "--json")
    )
    assert document["skipped"] is True
    assert document["source"] == f"labserver:{lab.root}"


@pytest.mark.sshd
def test_sync_with_explicit_port_identity_and_known_hosts(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path
) -> None:
    result = _run(
        "sync",
        f"{sshd_server.username}@127.0.0.1:{lab.root}",
        str(tmp_path / "cache"),
        "--port",
        str(sshd_server.port),
        "-i",
        str(sshd_server.client_key_path),
        "--known-hosts",
        str(sshd_server.known_hosts_path),
        "--ssh-config",
        str(tmp_path / "no_config"),
    )
    assert result.exit_code == 0, result.stderr
    assert f"synced {lab.listed_files} files" in result.stdout


@pytest.mark.sshd
def test_legacy_flag_walks_the_tree(lab: LabInfo, ssh_config: Path, tmp_path: Path) -> None:
    result = _run(
        *_alias_sync_args(lab, ssh_config, tmp_path / "cache"),
        "--legacy",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    stats = _stats(result)
    assert stats["mode"] == "legacy"
    assert stats["files_synced"] == lab.listed_files


@pytest.mark.sshd
def test_unknown_host_key_exits_4_with_how_to_trust_it(
    lab: LabInfo, sshd_server: SshServer, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cache = tmp_path / "cache"
    result = _run(
        "sync",
        f"{sshd_server.username}@127.0.0.1:{lab.root}",
        str(cache),
        "--port",
        str(sshd_server.port),
        "-i",
        str(sshd_server.client_key_path),
        "--known-hosts",
        str(empty),
        "--ssh-config",
        str(tmp_path / "no_config"),
        "--json",
    )
    assert result.exit_code == 4
    assert "ssh-keyscan" in result.stderr
    assert "SHA256:" in result.stderr
    assert _stats(result)["exit_code"] == 4
    assert not cache.exists()


@pytest.mark.sshd
def test_changed_host_key_exits_4(lab: LabInfo, sshd_server: SshServer, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    impostor = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    impostor_line = f"[127.0.0.1]:{sshd_server.port} {impostor.decode()}\n"
    known = tmp_path / "known_hosts"
    known.write_text(impostor_line)
    result = _run(
        "sync",
        f"{sshd_server.username}@127.0.0.1:{lab.root}",
        str(tmp_path / "cache"),
        "--port",
        str(sshd_server.port),
        "-i",
        str(sshd_server.client_key_path),
        "--known-hosts",
        str(known),
        "--ssh-config",
        str(tmp_path / "no_config"),
    )
    assert result.exit_code == 4
    assert "HAS CHANGED" in result.stderr


@pytest.mark.sshd
def test_partial_sync_exits_3_and_the_next_sync_retries(
    lab: LabInfo, ssh_config: Path, tmp_path: Path
) -> None:
    # A file turns into a directory between the manifest and the download.
    victim = next(p for p in lab.listed_runs[0].path.iterdir() if p.name == "summary.json")
    saved = victim.read_bytes()
    victim.unlink()
    victim.mkdir()
    args = _alias_sync_args(lab, ssh_config, tmp_path / "cache")
    result = _run(*args, "--json")
    assert result.exit_code == 3, result.stderr
    stats = _stats(result)
    assert stats["failed_count"] == 1
    assert stats["files_synced"] == lab.listed_files - 1

    victim.rmdir()
    victim.write_bytes(saved)
    os.utime(victim, (NOW - 7200, NOW - 7200))
    ManifestGenerator(lab.root).generate()
    assert _run(*args).exit_code == 0


@pytest.mark.sshd
def test_connection_refused_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run(
        "sync",
        f"127.0.0.1:{tmp_path}",
        str(tmp_path / "cache"),
        "--port",
        str(port),
        "--ssh-config",
        str(tmp_path / "no_config"),
        "--timeout",
        "5",
    )
    assert result.exit_code == 1
    assert "cannot connect" in result.stderr


def test_local_directory_syncs_through_the_same_engine(lab: LabInfo, tmp_path: Path) -> None:
    result = _run("sync", str(lab.root), str(tmp_path / "cache"), "--json")
    assert result.exit_code == 0, result.stderr
    stats = _stats(result)
    assert stats["files_synced"] == lab.listed_files
    assert stats["mode"] == "manifest"


def test_verify_checks_every_cached_file_and_fetches_what_is_damaged(
    lab: LabInfo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert _run("sync", str(lab.root), str(cache)).exit_code == 0
    victim = next(cache.rglob("summary.json"))
    victim.write_bytes(b"{}")

    quick = _stats(_run("sync", str(lab.root), str(cache), "--json"))
    verified = _stats(_run("sync", str(lab.root), str(cache), "--json", "--verify"))

    assert quick["skipped"] is True and "verified" not in quick
    assert (verified["files_synced"], verified["verified"]) == (1, True)
    assert_cache_equals_server(lab.root, cache)


def test_local_directory_without_manifest_uses_the_legacy_walk(
    lab: LabInfo, tmp_path: Path
) -> None:
    shutil.rmtree(lab.root / ".runicorn")
    result = _run("sync", str(lab.root), str(tmp_path / "cache"), "--json")
    assert result.exit_code == 0, result.stderr
    assert _stats(result)["mode"] == "legacy"


def test_missing_local_directory_exits_1(tmp_path: Path) -> None:
    result = _run("sync", str(tmp_path / "nowhere"), str(tmp_path / "cache"))
    assert result.exit_code == 1
    assert "not a directory" in result.stderr


def test_allow_mass_delete_without_delete_is_a_usage_error(tmp_path: Path) -> None:
    result = _run("sync", str(tmp_path), str(tmp_path / "cache"), "--allow-mass-delete")
    assert result.exit_code == 2


def test_dry_run_writes_nothing(lab: LabInfo, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = _run("sync", str(lab.root), str(cache), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert not cache.exists() or not any(
        p.is_file() for p in cache.rglob("*") if ".runicorn-cache" not in p.parts
    )


def test_demo_runs_and_exits_zero() -> None:
    result = _run("demo", "--runs", "4")
    assert result.exit_code == 0, result.stderr
    assert "Second sync" in result.stdout
    assert "appended in place" in result.stdout


def test_demo_keeps_its_lab_and_cache_when_asked(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = _run("demo", "--runs", "3", "--keep", str(keep))
    assert result.exit_code == 0, result.stderr
    assert (keep / "lab").is_dir()
    assert (keep / "cache").is_dir()


def test_demo_on_the_sdk_06_layout(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = _run("demo", "--runs", "3", "--layout", "runs-path", "--keep", str(keep))
    assert result.exit_code == 0, result.stderr
    assert "Second sync" in result.stdout
    assert (keep / "lab" / "runicorn.db").is_file()
    cached = [p.relative_to(keep / "cache").parts[0] for p in (keep / "cache").rglob("*.json")]
    assert cached and set(cached) - {".runicorn-cache"} == {"runs"}


def test_interrupt_exits_130_with_a_resume_hint(
    lab: LabInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self, *, wait: bool = False) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(service_module.MetadataSyncService, "sync_all", interrupted)
    result = _run("sync", str(lab.root), str(tmp_path / "cache"))
    assert result.exit_code == 130
    assert "next sync resumes" in result.stderr


def test_plain_output_is_one_summary_line(lab: LabInfo, tmp_path: Path) -> None:
    result = _run("sync", str(lab.root), str(tmp_path / "cache"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert f"synced {lab.listed_files} files" in result.stdout


def test_dry_run_summary_says_nothing_was_written(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    build_sample_lab(lab, 3, seed=1, scale=0.02)
    ManifestGenerator(lab).generate()
    result = CliRunner().invoke(main, ["sync", str(lab), str(tmp_path / "cache"), "--dry-run"])
    assert result.exit_code == 0
    assert "dry run, nothing written; would fetch" in result.output
    assert not (tmp_path / "cache").exists()


def test_sigterm_exits_143_with_a_message(tmp_path: Path, monkeypatch) -> None:
    import runicorn.cli.sync as cli_sync

    def terminated(*_args, **_kwargs):
        raise SystemExit(143)

    monkeypatch.setattr(cli_sync, "_sync_local", terminated)
    lab = tmp_path / "lab"
    lab.mkdir()
    result = CliRunner().invoke(main, ["sync", str(lab), str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 143
    assert '"exit_code":143' in result.output


@pytest.mark.sshd
@pytest.mark.parametrize("workers", ["1", "8"])
def test_a_low_open_file_limit_slows_the_sync_down_instead_of_failing_files(
    lab: LabInfo, ssh_config: Path, tmp_path: Path, workers: str
) -> None:
    """With 128 files in flight per channel a default ``ulimit -n`` of 1024 runs out at 8
    workers; the transfer keeps its open files within what the limit leaves."""
    open_now = len(os.listdir("/proc/self/fd"))
    assert lab.listed_files > 24  # more files than the limit below leaves room for
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 24, hard))
    try:
        result = _run(
            *_alias_sync_args(lab, ssh_config, tmp_path / "cache"),
            "--workers",
            workers,
            "--json",
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result.exit_code == 0, result.stderr[-2000:]
    stats = _stats(result)
    assert (stats["files_synced"], stats["failed_count"]) == (lab.listed_files, 0)
    assert_cache_equals_server(lab.root, tmp_path / "cache")

"""``runicorn doctor`` over a real sshd: a ready server, a missing manifest, a changed host
key, a root the account may not list, and the cache's owner and lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paramiko
import pytest
from click.testing import CliRunner, Result

from harness.sshd import SshServer
from runicorn._sys.atomic import exclusive_lock
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.cache.manager import LOCK_NAME

pytestmark = pytest.mark.sshd


@pytest.fixture
def lab(tmp_path: Path) -> LabInfo:
    return build_sample_lab(tmp_path / "lab", runs=6, seed=5, scale=0.05)


def _doctor(server: SshServer, tmp_path: Path, lab: LabInfo, *args: str) -> tuple[Result, dict]:
    config = server.write_ssh_config(tmp_path / "ssh_config", "labserver")
    result = CliRunner().invoke(
        main,
        ["doctor", f"labserver:{lab.root}", *args, "--ssh-config", str(config), "--json"],
        catch_exceptions=False,
    )
    return result, orjson.loads(result.stdout)


def _outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {check["check"]: check["outcome"] for check in report["checks"]}


def _check(report: dict[str, Any], name: str) -> dict[str, str]:
    return next(check for check in report["checks"] if check["check"] == name)


def test_a_ready_server_and_cache_pass_every_check(
    sshd_server: SshServer, lab: LabInfo, tmp_path: Path, backend: Backend
) -> None:
    manifest, _ = ManifestGenerator(lab.root, backend=backend).generate()
    cache = tmp_path / "cache"
    result, report = _doctor(sshd_server, tmp_path, lab, str(cache))
    assert result.exit_code == 0, result.stdout
    assert report["exit_code"] == 0
    assert _outcomes(report) == {
        name: "ok"
        for name in (
            "host key",
            "login",
            "remote root",
            "manifest",
            "manifest age",
            "generator",
            "clock",
            "cache",
            "free space",
            "cache lock",
        )
    }
    assert (
        f"revision {manifest.revision}: {len(lab.listed_runs)} runs"
        in _check(report, "manifest")["detail"]
    )
    assert "within" in _check(report, "clock")["detail"]  # measured with `date +%s`
    assert "ssh-ed25519 SHA256:" in _check(report, "host key")["detail"]
    assert not cache.exists()  # the checks wrote nothing


def test_a_held_lock_is_a_warning_and_another_servers_cache_a_failure(
    sshd_server: SshServer, lab: LabInfo, tmp_path: Path, backend: Backend
) -> None:
    ManifestGenerator(lab.root, backend=backend).generate()
    cache = LocalCacheManager(tmp_path / "cache")
    cache.claim(f"sftp://someone@127.0.0.1:{sshd_server.port}{lab.root}")
    with exclusive_lock(cache.state_dir / LOCK_NAME):
        result, report = _doctor(sshd_server, tmp_path, lab, str(tmp_path / "cache"))
    assert result.exit_code == 0, result.stdout
    lock = _check(report, "cache lock")
    assert lock["outcome"] == "warn" and "a sync holds" in lock["detail"]
    other = LocalCacheManager(tmp_path / "other")
    other.claim("sftp://a@elsewhere:22/data")
    result, report = _doctor(sshd_server, tmp_path, lab, str(tmp_path / "other"))
    assert result.exit_code == 1
    owner = _check(report, "cache")
    assert owner["outcome"] == "fail" and "mirrors sftp://a@elsewhere:22/data" in owner["detail"]


def test_a_missing_manifest_fails_and_says_how_to_publish_one(
    sshd_server: SshServer, lab: LabInfo, tmp_path: Path
) -> None:
    result, report = _doctor(sshd_server, tmp_path, lab)
    assert result.exit_code == 1
    manifest = _check(report, "manifest")
    assert manifest["outcome"] == "fail"
    assert "no full manifest" in manifest["detail"]
    assert f"generate-manifest --root {lab.root}" in manifest["detail"]
    assert "--watch" in manifest["advice"]
    assert _outcomes(report)["remote root"] == "ok"


def test_a_changed_host_key_fails_with_exit_code_4(
    sshd_server: SshServer, lab: LabInfo, tmp_path: Path
) -> None:
    impostor = paramiko.Ed25519Key.from_private_key_file(str(_impostor_key(tmp_path)))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 {impostor.get_base64()}\n")
    result, report = _doctor(sshd_server, tmp_path, lab, "--known-hosts", str(known))
    assert result.exit_code == 4
    host_key = _check(report, "host key")
    assert host_key["outcome"] == "fail" and "HAS CHANGED" in host_key["detail"]
    outcomes = _outcomes(report)
    assert outcomes["login"] == outcomes["remote root"] == outcomes["manifest"] == "skip"


def test_a_root_the_account_may_not_list_fails_and_the_clock_falls_back(
    sshd_factory: Callable[..., SshServer], lab: LabInfo, tmp_path: Path
) -> None:
    # An sftp-only account whose server refuses to list directories: every command runs
    # internal-sftp instead (so `date` gives no clock), and opendir is denied.
    server = sshd_factory(extra_config=["ForceCommand internal-sftp -P opendir"])
    result, report = _doctor(server, tmp_path, lab)
    assert result.exit_code == 1
    root = _check(report, "remote root")
    assert root["outcome"] == "fail" and "is not readable" in root["detail"]
    assert "chmod" in root["advice"]
    outcomes = _outcomes(report)
    assert outcomes["login"] == "ok" and outcomes["manifest"] == "skip"
    assert outcomes["clock"] == "skip"  # no command, no manifest: nothing to compare


def _impostor_key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "impostor"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return path

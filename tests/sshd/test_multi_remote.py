"""Several servers (issue 21, item 1) against real sshd instances, on both backends:
``runicorn sync NAME`` and ``runicorn sync --all`` from a config file, the worst exit code,
and a cache that refuses a second server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import paramiko
import pytest
from click.testing import CliRunner, Result

from harness.lab import assert_cache_equals_server, cache_files, make_client
from harness.sshd import SshServer
from runicorn.cli import main
from runicorn.core.backend import Backend
from runicorn.demo.sample_lab import LabInfo, build_sample_lab
from runicorn.manifest import ManifestGenerator
from runicorn.sync.cache import CacheOwnerError, LocalCacheManager

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("cli_backend")]

NOW = 1_700_000_000.0


def _lab(root: Path, seed: int, backend: Backend) -> LabInfo:
    info = build_sample_lab(root, runs=6, seed=seed, scale=0.05, now=NOW)
    ManifestGenerator(info.root, backend=backend).generate()
    return info


@pytest.fixture
def servers(
    tmp_path: Path, sshd_factory: Callable[..., SshServer], backend: Backend
) -> tuple[Path, list[tuple[str, LabInfo]]]:
    """Three sshd instances, a lab on each, and one ssh config with an alias for each."""
    blocks: list[str] = []
    labs: list[tuple[str, LabInfo]] = []
    for index in range(3):
        alias = f"gpu{index + 1}"
        server = sshd_factory()
        blocks.append(server.ssh_config_block(alias))
        labs.append((alias, _lab(tmp_path / f"lab{index + 1}", 30 + index, backend)))
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("\n".join(blocks), encoding="utf-8")
    return ssh_config, labs


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "runicorn.toml"
    path.write_text(f'cache_root = "{tmp_path / "caches"}"\n\n{body}', encoding="utf-8")
    return path


def _remotes(labs: list[tuple[str, LabInfo]]) -> str:
    return "".join(f'[remotes.{alias}]\nurl = "{alias}:{info.root}"\n\n' for alias, info in labs)


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_sync_all_mirrors_every_remote_into_its_own_cache(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path
) -> None:
    ssh_config, labs = servers
    config = _config(tmp_path, _remotes(labs))

    result = _run("sync", "--all", "--config", str(config), "--ssh-config", str(ssh_config))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["gpu1", "gpu2", "gpu3"]
    assert all("synced" in line for line in lines)
    assert "3 of 3 remotes up to date" in result.stderr
    for alias, info in labs:
        assert_cache_equals_server(info.root, tmp_path / "caches" / alias)


def test_sync_all_json_and_the_worst_exit_code(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path
) -> None:
    ssh_config, labs = servers
    body = _remotes(labs) + f'[remotes.gone]\nurl = "{tmp_path / "no-such-dir"}"\n'
    config = _config(tmp_path, body)

    result = _run(
        "sync", "--all", "--config", str(config), "--ssh-config", str(ssh_config), "--json"
    )

    assert result.exit_code == 1
    document = orjson.loads(result.stdout)
    assert document["exit_code"] == 1
    by_name = {entry["remote"]: entry for entry in document["remotes"]}
    assert sorted(by_name) == ["gone", "gpu1", "gpu2", "gpu3"]
    assert by_name["gone"]["exit_code"] == 1
    assert "is not a directory" in by_name["gone"]["error"]
    for alias, info in labs:
        assert by_name[alias]["exit_code"] == 0
        assert by_name[alias]["files_synced"] == info.listed_files
        assert_cache_equals_server(info.root, tmp_path / "caches" / alias)
    assert "gone: " in result.stderr


def test_sync_all_filters_per_remote(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path
) -> None:
    ssh_config, labs = servers
    alias, info = labs[0]
    project = info.listed_runs[0].project
    body = f'[remotes.{alias}]\nurl = "{alias}:{info.root}"\nprojects = ["{project}"]\n\n'
    body += _remotes(labs[1:])
    config = _config(tmp_path, body)

    result = _run(
        "sync", "--all", "--config", str(config), "--ssh-config", str(ssh_config), "--json"
    )

    assert result.exit_code == 0, result.stderr
    by_name = {entry["remote"]: entry for entry in orjson.loads(result.stdout)["remotes"]}
    others = sum(1 for run in info.listed_runs if run.project != project)
    assert by_name[alias]["runs_filtered_out"] == others > 0
    cached = {path.split("/", 1)[0] for path in cache_files(tmp_path / "caches" / alias)}
    assert cached == {project}


def test_sync_name_syncs_one_remote_and_options_win(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path
) -> None:
    ssh_config, labs = servers
    config = _config(tmp_path, _remotes(labs))
    alias, info = labs[1]

    result = _run("sync", alias, "--config", str(config), "--ssh-config", str(ssh_config))

    assert result.exit_code == 0, result.stderr
    assert_cache_equals_server(info.root, tmp_path / "caches" / alias)
    assert not (tmp_path / "caches" / "gpu1").exists()

    # a CACHE_DIR and --project given on the command line win over the file
    project = info.listed_runs[0].project
    elsewhere = tmp_path / "elsewhere"
    result = _run(
        "sync",
        alias,
        str(elsewhere),
        "--config",
        str(config),
        "--ssh-config",
        str(ssh_config),
        "--project",
        project,
    )
    assert result.exit_code == 0, result.stderr
    assert {path.split("/", 1)[0] for path in cache_files(elsewhere)} == {project}


def test_the_config_file_comes_from_the_environment(
    servers: tuple[Path, list[tuple[str, LabInfo]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ssh_config, labs = servers
    monkeypatch.setenv("RUNICORN_CONFIG", str(_config(tmp_path, _remotes(labs[:1]))))
    result = _run("sync", "gpu1", "--ssh-config", str(ssh_config))
    assert result.exit_code == 0, result.stderr
    assert_cache_equals_server(labs[0][1].root, tmp_path / "caches" / "gpu1")


def test_config_mistakes_are_clear(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('[remotes.a]\nurl = "h:/x"\nwrokers = 2\n', encoding="utf-8")
    result = _run("sync", "a", "--config", str(broken))
    assert result.exit_code == 1
    assert f"{broken}, line 3: unknown setting 'wrokers'" in result.stderr

    good = _config(tmp_path, '[remotes.a]\nurl = "h:/x"\n')
    result = _run("sync", "b", "--config", str(good))
    assert result.exit_code == 2
    assert "no remote named 'b'" in result.stderr and "known: a" in result.stderr

    result = _run("sync", "--all", "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr

    shared = _config(
        tmp_path,
        f'[remotes.a]\nurl = "h:/x"\ncache = "{tmp_path}/c"\n\n'
        f'[remotes.b]\nurl = "k:/y"\ncache = "{tmp_path}/c"\n',
    )
    result = _run("sync", "--all", "--config", str(shared))
    assert result.exit_code == 1
    assert "share the cache directory" in result.stderr


def test_usage_errors_of_the_new_forms(tmp_path: Path) -> None:
    assert _run("sync").exit_code == 2
    assert _run("sync", "--all", "h:/x").exit_code == 2
    assert _run("sync", "--all", "--watch").exit_code == 2
    assert _run("sync", "host:/x").exit_code == 2  # HOST:PATH needs a CACHE_DIR


# ------------------------------------------------------------------- a cache mirrors one server


def test_a_cache_refuses_a_second_server(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path
) -> None:
    ssh_config, labs = servers
    cache = tmp_path / "one-cache"
    first = _run("sync", f"gpu1:{labs[0][1].root}", str(cache), "--ssh-config", str(ssh_config))
    assert first.exit_code == 0, first.stderr
    before = cache_files(cache)

    second = _run(
        "sync", f"gpu2:{labs[1][1].root}", str(cache), "--ssh-config", str(ssh_config), "--json"
    )

    assert second.exit_code == 1
    assert "mirrors sftp://" in second.stderr
    assert "Sync into another cache directory" in second.stderr
    assert "falling back" not in second.stderr  # never tried again by the legacy walk
    assert cache_files(cache) == before
    # the same server and root again is fine
    again = _run("sync", f"gpu1:{labs[0][1].root}", str(cache), "--ssh-config", str(ssh_config))
    assert again.exit_code == 0, again.stderr


def test_another_root_on_the_same_server_is_another_remote(
    sftp: paramiko.SFTPClient, tmp_path: Path, backend: Backend
) -> None:
    one = _lab(tmp_path / "one", 40, backend)
    two = _lab(tmp_path / "two", 41, backend)
    cache = tmp_path / "cache"
    client = make_client(sftp, one.root, cache, backend)
    try:
        client.sync()
    finally:
        client.close()
    before = cache_files(cache)

    for dry_run in (True, False):
        client = make_client(sftp, two.root, cache, backend, dry_run=dry_run)
        try:
            with pytest.raises(CacheOwnerError, match=f"mirrors sftp://.*{one.root}"):
                client.sync()
        finally:
            client.close()
    assert cache_files(cache) == before
    assert LocalCacheManager(cache).mirrored_remote().endswith(str(one.root))


def test_a_cache_made_before_the_identity_file_adopts_its_one_remote(
    sftp: paramiko.SFTPClient, tmp_path: Path, backend: Backend
) -> None:
    one = _lab(tmp_path / "one", 42, backend)
    cache = tmp_path / "cache"
    client = make_client(sftp, one.root, cache, backend)
    try:
        client.sync()
    finally:
        client.close()
    manager = LocalCacheManager(cache)
    recorded = manager.mirrored_remote()
    manager.identity_path.unlink()  # as an older runicorn left it

    client = make_client(sftp, one.root, cache, backend)
    try:
        assert client.sync()["skipped"] is True
    finally:
        client.close()
    assert manager.mirrored_remote() == recorded


@pytest.mark.parametrize(("setting", "enabled"), [("true", True), ("false", False)])
def test_the_files_compress_setting_reaches_the_connection(
    servers: tuple[Path, list[tuple[str, LabInfo]]], tmp_path: Path, setting: str, enabled: bool
) -> None:
    ssh_config, labs = servers
    alias, info = labs[0]
    config = _config(
        tmp_path, f'[remotes.{alias}]\nurl = "{alias}:{info.root}"\ncompress = {setting}\n'
    )
    result = _run("sync", alias, "--config", str(config), "--ssh-config", str(ssh_config), "--json")
    assert result.exit_code == 0, result.stderr
    compression = orjson.loads(result.stdout)["compression"]
    assert (compression["enabled"], compression["reason"]) == (enabled, "option")

    # the command line wins over the file
    flag = "--no-compress" if enabled else "--compress"
    result = _run(
        "sync", alias, "--config", str(config), "--ssh-config", str(ssh_config), flag, "--json"
    )
    assert orjson.loads(result.stdout)["compression"]["enabled"] is not enabled

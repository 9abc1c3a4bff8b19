"""The shipped systemd units (the publisher's, the client's user-level one): filled in,
valid for systemd, and starting this installation's ``runicorn``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runicorn._sys.systemd import fill_unit
from runicorn.cli import main
from runicorn.generate.service_unit import publisher_unit, runicorn_command, systemd_quote
from runicorn.sync.service_unit import client_unit


def _values(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#")


def test_the_unit_runs_the_publisher_on_the_root_as_the_user():
    values = _values(publisher_unit(Path("/data/experiments"), "mluser"))
    assert values["User"] == values["Group"] == "mluser"
    assert values["ExecStart"] == " ".join(
        [*runicorn_command(), "generate-manifest --root /data/experiments --watch"]
    )
    assert values["Restart"] == "on-failure"
    assert values["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_command_is_the_console_script_of_this_environment():
    assert runicorn_command() == [str(Path(sys.executable).with_name("runicorn"))]


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("/data/lab", "/data/lab"),
        ("/data/my lab", '"/data/my lab"'),
        ("/data/100%", "/data/100%%"),
        ("/data/$HOME", "/data/$$HOME"),
        ('/data/a"b', '"/data/a\\"b"'),
    ],
)
def test_exec_start_words_are_quoted_for_systemd(word, quoted):
    assert systemd_quote(word) == quoted


@pytest.mark.parametrize("user", ["", "two words", "a%b"])
def test_an_invalid_user_is_refused(user):
    with pytest.raises(ValueError, match="not a valid user"):
        publisher_unit(Path("/data"), user)


def test_the_command_prints_the_unit_with_options_passed_on(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "units",
            "publisher",
            "--root",
            str(tmp_path),
            "--user",
            "mluser",
            "--group",
            "lab",
            "--runicorn",
            "/opt/runicorn/bin/runicorn",
            "--full-interval",
            "30",
            "--poll",
        ],
    )
    assert result.exit_code == 0, result.output
    values = _values(result.output)
    assert values["Group"] == "lab"
    assert values["ExecStart"] == (
        f"/opt/runicorn/bin/runicorn generate-manifest --root {tmp_path} --watch "
        "--full-interval 30 --poll"
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
@pytest.mark.parametrize("root", ["/data/experiments", "/data/my lab 100%"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, root):
    unit = tmp_path / "runicorn-publisher.service"
    unit.write_text(publisher_unit(Path(root), "root"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_client_unit_watches_the_source_into_the_cache():
    values = _values(client_unit("lab:/data/experiments", Path("/home/me/cache")))
    assert values["ExecStart"] == " ".join(
        [*runicorn_command(), "sync lab:/data/experiments /home/me/cache --watch"]
    )
    assert (values["Restart"], values["RestartPreventExitStatus"]) == ("on-failure", "2 4")
    assert values["WantedBy"] == "default.target"  # a user unit: no User=, no multi-user
    assert "User" not in values


def test_the_client_unit_holds_an_absolute_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    values = _values(client_unit("me@lab:/data", Path("~/runicorn cache 100%")))
    assert values["ExecStart"].endswith(
        f'sync me@lab:/data "{tmp_path}/runicorn cache 100%%" --watch'
    )


@pytest.mark.parametrize("source", ["", "lab:/data\nExecStartPre=/bin/false"])
def test_a_source_that_cannot_be_one_word_is_refused(source):
    with pytest.raises(ValueError, match="cannot be written into a unit"):
        client_unit(source, Path("/cache"))


def test_units_client_prints_the_unit_with_options_passed_on(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(
        main,
        [
            "units",
            "client",
            "lab:/data/experiments",
            str(tmp_path / "cache"),
            "--runicorn",
            "/opt/runicorn/bin/runicorn",
            "--identity",
            "~/.ssh/id_lab",
            "--port",
            "2222",
            "--interval",
            "1",
            "--delete",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _values(result.output)["ExecStart"] == (
        f"/opt/runicorn/bin/runicorn sync lab:/data/experiments {tmp_path}/cache --watch "
        f"--port 2222 --identity {tmp_path}/.ssh/id_lab --interval 1 --delete"
    )


def test_a_template_placeholder_without_a_value_is_refused():
    missing = "@CACHE_COMMENT@, @EXEC_START@, @REMOTE_COMMENT@"
    with pytest.raises(ValueError, match=f"runicorn-sync.service: no value for {missing}"):
        fill_unit("runicorn.sync", "runicorn-sync.service", {})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
@pytest.mark.parametrize("cache", ["/home/me/cache", "/home/me/my cache 100%"])
def test_systemd_analyze_verify_accepts_the_client_unit(tmp_path, cache):
    unit = tmp_path / "runicorn-sync.service"
    unit.write_text(client_unit("me@lab:/data/my runs", Path(cache)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")

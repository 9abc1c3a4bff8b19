"""The remotes file (runicorn.cli.config): where it is on each platform, what it accepts, and
errors that name the file and the line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runicorn.cli import config as config_module
from runicorn.cli._sync_many import Invocation, resolve, worst
from runicorn.cli.config import ConfigError, default_cache_root, default_config_path, load_config
from runicorn.sync.selection import RunSelection

GOOD = """\
# two servers
cache_root = "caches"

[remotes.gpu1]
url = "alice@gpu1:/data/experiments"
projects = ["vision", "nlp"]
exclude = "vision/*_ablation"
since = "30d"
compress = "auto"
workers = 4
stream_python = "~/venvs/runicorn/bin/python"

[remotes."nfs-2"]
url = "/mnt/lab2"
cache = "~/lab2-cache"
compress = false
port = 2222
identity = ["~/.ssh/lab"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_file_names_its_remotes_with_their_settings(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert sorted(config.remotes) == ["gpu1", "nfs-2"]
    gpu1 = config.get("gpu1")
    assert gpu1.url == "alice@gpu1:/data/experiments"
    assert gpu1.cache == tmp_path / "caches" / "gpu1"  # relative to the file
    assert gpu1.projects == ("vision", "nlp")
    assert gpu1.exclude == ("vision/*_ablation",)
    assert gpu1.since == "30d"
    assert (gpu1.compress, gpu1.workers) == ("auto", 4)
    assert gpu1.stream_python == "~/venvs/runicorn/bin/python"  # the server's ~, kept as is
    nfs = config.get("nfs-2")
    assert nfs.cache == Path("~/lab2-cache").expanduser()
    assert (nfs.compress, nfs.port, nfs.identity) == (False, 2222, ("~/.ssh/lab",))


def test_without_cache_root_each_remote_gets_one_under_the_platform_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    config = load_config(_write(tmp_path, '[remotes.a]\nurl = "h:/x"\n'))
    assert config.get("a").cache == tmp_path / "xdg-cache" / "runicorn" / "a"


@pytest.mark.parametrize(
    ("platform", "env", "config_dir", "cache_dir"),
    [
        ("linux", {}, ".config/runicorn", ".cache/runicorn"),
        ("linux", {"XDG_CONFIG_HOME": "relative"}, ".config/runicorn", ".cache/runicorn"),
        ("darwin", {}, "Library/Application Support/runicorn", "Library/Caches/runicorn"),
        ("win32", {}, "AppData/Roaming/runicorn", "AppData/Local/runicorn/cache"),
    ],
)
def test_the_platform_directories(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    platform: str,
    env: dict[str, str],
    config_dir: str,
    cache_dir: str,
) -> None:
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "APPDATA", "LOCALAPPDATA", "RUNICORN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    monkeypatch.setattr(sys, "platform", platform)
    assert default_config_path() == tmp_path / config_dir / "config.toml"
    assert default_cache_root() == tmp_path / cache_dir


def test_windows_takes_appdata_and_localappdata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("APPDATA", str(tmp_path / "roam"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    monkeypatch.delenv("RUNICORN_CONFIG", raising=False)
    assert default_config_path() == tmp_path / "roam" / "runicorn" / "config.toml"
    assert default_cache_root() == tmp_path / "local" / "runicorn" / "cache"


def test_the_environment_variable_points_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNICORN_CONFIG", str(tmp_path / "mine.toml"))
    assert default_config_path() == tmp_path / "mine.toml"
    monkeypatch.setenv("RUNICORN_CONFIG", "0")
    assert default_config_path() != tmp_path / "mine.toml"


def test_a_missing_file_is_empty_unless_named(tmp_path: Path) -> None:
    config = load_config(tmp_path / "none.toml")
    assert config.remotes == {} and not config.exists
    with pytest.raises(ConfigError, match=r"no config file at .*none\.toml"):
        config.get("gpu1")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", required=True)


def test_an_unknown_remote_names_the_known_ones(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"no remote named 'gpu9' .*known: gpu1, nfs-2"):
        config.get("gpu9")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[remotes.a]\nurl = "h:/x"\nworkers = 4\nwrokers = 5\n', 4, "unknown setting 'wrokers'"),
        ('cache_root = "c"\ncolour = 1\n', 2, "unknown setting 'colour'"),
        ('[remotes.a]\nurl = "h:/x"\n\n[remotes.b]\nport = 22\n', 4, "has no url"),
        ('[remotes.a]\nurl = "h:/x"\ncompress = "yes"\n', 3, 'true, false or "auto"'),
        ('[remotes.a]\nurl = "h:/x"\nworkers = 0\n', 3, "from 1 to 64"),
        ('[remotes.a]\nurl = "h:/x"\nworkers = true\n', 3, "from 1 to 64"),
        ('[remotes.a]\nurl = "h:/x"\nsince = "3 fortnights"\n', 3, "not a duration"),
        ('[remotes.a]\nurl = "h:/x"\ninclude = ["/abs"]\n', 3, "bad glob"),
        ('[remotes.a]\nurl = "h:/x"\nprojects = "a/b"\n', 3, "one visible name"),
        ('[remotes.a]\nurl = "h:/x"\nprojects = [1]\n', 3, "list of strings"),
        ("[remotes.a]\n# note\nurl = 5\n", 3, "url must be a string"),
        ('[remotes."a:b"]\nurl = "h:/x"\n', 1, "remote name 'a:b'"),
        ("remotes = 3\n", 1, "remotes must be tables"),
        ('[remotes]\na = "h:/x"\n', 2, "must be a table"),
        ('[remotes.a]\nurl = "h:/x"\ncache = ""\n', 3, "cache must be a directory"),
        ('[remotes.a]\nurl = "h:/x"\nstream_python = ""\n', 3, "a Python on the server"),
        ('[remotes.a]\nurl = "h:/x"\nstream_python = ["p"]\n', 3, "a Python on the server"),
    ],
)
def test_errors_name_the_file_and_the_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}, line {line}: ")
    assert message in str(caught.value)


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[remotes.a]\nurl = "h:/x"\nworkers = = 3\n')
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 3"):
        load_config(path)


def test_text_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[remotes.a]\nurl = "h:/\xff"\n')
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8"):
        load_config(path)


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    remote = load_config(_write(tmp_path, GOOD)).get("gpu1")
    from_file = resolve(remote, Invocation(None, (), None, RunSelection()))
    assert from_file.workers == 4
    assert from_file.selection == RunSelection.of(
        ["vision", "nlp"], None, ["vision/*_ablation"], "30d"
    )
    assert from_file.compress is None  # "auto": the command's default
    assert from_file.stream_python == "~/venvs/runicorn/bin/python"

    given = resolve(remote, Invocation(2200, ("k",), 8, RunSelection(projects=("rl",))))
    assert (given.port, given.identities, given.workers) == (2200, ("k",), 8)
    assert given.selection == RunSelection(projects=("rl",))  # replaces the file's, whole
    python = Invocation(None, (), None, RunSelection(), stream_python="/opt/py/bin/python3")
    assert resolve(remote, python).stream_python == "/opt/py/bin/python3"


def test_the_worst_exit_code_wins() -> None:
    assert worst([]) == 0
    assert worst([0, 0]) == 0
    assert worst([0, 3, 0]) == 3
    assert worst([3, 1, 0]) == 1
    assert worst([1, 4, 3]) == 4
    assert worst([4, 130]) == 130


def test_tomli_is_only_needed_before_python_3_11() -> None:
    assert config_module.tomllib.__name__ == ("tomllib" if sys.version_info >= (3, 11) else "tomli")

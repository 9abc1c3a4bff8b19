"""The remotes file: named lab servers for ``runicorn sync NAME`` and ``runicorn sync --all``.

A TOML file in the platform's config directory (``--config`` or ``RUNICORN_CONFIG`` point
elsewhere)::

    cache_root = "~/lab-caches"          # optional; each remote's cache is <cache_root>/<name>

    [remotes.gpu1]
    url = "alice@gpu1.lab.example:/data/experiments"   # as `runicorn sync` takes it
    projects = ["vision"]                # optional: part of the lab (see --project …)
    exclude = ["vision/*_ablation"]
    since = "30d"
    compress = "auto"                    # true, false or "auto"
    workers = 4
    stream_python = "~/runicorn-venv/bin/python"   # the server's Python for the file stream

    [remotes.nfs]
    url = "/mnt/lab2/experiments"        # a local directory (an NFS mount)
    cache = "~/lab2-cache"               # overrides <cache_root>/<name>

Every error names the file and the line. See docs/reference/config.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the standard library reads TOML from 3.11 on; tomli is the same parser before it
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "CONFIG_ENV",
    "ConfigError",
    "RemoteConfig",
    "RemotesFile",
    "default_cache_root",
    "default_config_path",
    "load_config",
]

CONFIG_ENV = "RUNICORN_CONFIG"
CONFIG_NAME = "config.toml"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"cache_root", "remotes"}
_REMOTE_KEYS = {
    "url",
    "cache",
    "projects",
    "include",
    "exclude",
    "since",
    "compress",
    "workers",
    "port",
    "identity",
    "stream_python",
}


class ConfigError(ValueError):
    """The remotes file cannot be used: the message names the file, the line and the fix."""


@dataclass(frozen=True)
class RemoteConfig:
    """One ``[remotes.NAME]`` table."""

    name: str
    url: str
    cache: Path
    projects: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    since: str | None = None
    compress: bool | str | None = None
    """``True``, ``False`` or ``"auto"``; ``None``: not set (the command's default)."""
    workers: int | None = None
    port: int | None = None
    identity: tuple[str, ...] = ()
    stream_python: str | None = None
    """The server's interpreter that runs the file stream (``--stream-python``)."""


@dataclass(frozen=True)
class RemotesFile:
    """A parsed remotes file (empty when there is none)."""

    path: Path
    remotes: dict[str, RemoteConfig] = field(default_factory=dict)
    exists: bool = True

    def get(self, name: str) -> RemoteConfig:
        """The remote called ``name``; ``ConfigError`` naming the known ones otherwise."""
        remote = self.remotes.get(name)
        if remote is not None:
            return remote
        if not self.exists:
            raise ConfigError(
                f"no remote named {name!r}: there is no config file at {self.path}; "
                f'create it with a [remotes.{name}] table (url = "HOST:/path"), or pass '
                "HOST:PATH CACHE_DIR"
            )
        known = ", ".join(sorted(self.remotes)) or "none"
        raise ConfigError(
            f"no remote named {name!r} in {self.path} (known: {known}); add a "
            f"[remotes.{name}] table or check the spelling"
        )


def _platform_dir(kind: str) -> Path:
    """The per-user config or cache directory of this platform, for runicorn."""
    home = Path.home()
    if sys.platform == "win32":
        if kind == "config":
            base = os.environ.get("APPDATA") or str(home / "AppData" / "Roaming")
            return Path(base) / "runicorn"
        base = os.environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "runicorn" / "cache"
    if sys.platform == "darwin":
        sub = "Application Support" if kind == "config" else "Caches"
        return home / "Library" / sub / "runicorn"
    variable, fallback = (
        ("XDG_CONFIG_HOME", ".config") if kind == "config" else ("XDG_CACHE_HOME", ".cache")
    )
    base = os.environ.get(variable, "")
    # The XDG rule: a relative value is invalid and ignored.
    return (Path(base) if os.path.isabs(base) else home / fallback) / "runicorn"


def default_config_path() -> Path:
    """``$RUNICORN_CONFIG``, else ``config.toml`` in the platform's config directory:
    ``$XDG_CONFIG_HOME/runicorn`` (``~/.config/runicorn``) on Linux,
    ``~/Library/Application Support/runicorn`` on macOS, ``%APPDATA%\\runicorn`` on Windows."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit and explicit != "0":
        return Path(explicit).expanduser()
    return _platform_dir("config") / CONFIG_NAME


def default_cache_root() -> Path:
    """Where the remotes' caches go without ``cache_root``: ``$XDG_CACHE_HOME/runicorn``
    (``~/.cache/runicorn``) on Linux, ``~/Library/Caches/runicorn`` on macOS,
    ``%LOCALAPPDATA%\\runicorn\\cache`` on Windows."""
    return _platform_dir("cache")


def load_config(path: Path | None = None, *, required: bool = False) -> RemotesFile:
    """Read the remotes file at ``path`` (default: :func:`default_config_path`).

    A missing file is an empty one, unless ``required`` (a path the user named). Raises
    :class:`ConfigError` for anything it cannot use, naming the file and the line.
    """
    path = default_config_path() if path is None else Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return RemotesFile(path, {}, exists=False)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text; save it as UTF-8") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return _Parser(path, text).parse(document)


class _Parser:
    """Checks a parsed document; knows the text only to name lines in errors."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.base = path.parent

    # -- where things are --------------------------------------------------------------------

    def _line(self, table: str | None, key: str | None = None) -> int:
        """The line of ``key`` in ``[table]`` (top level: ``None``), else of the table's
        header, else 1. TOML allows other spellings (dotted keys, inline tables); the
        search finds the usual ones and falls back to something near."""
        current: str | None = None
        header_line = 0
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            if line.startswith("[") and not line.startswith("[["):
                current = _table_name(line)
                if current == table and header_line == 0:
                    header_line = number
                continue
            if (
                key is not None
                and current == table
                and re.match(
                    rf"^(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=", line
                )
            ):
                return number
        return header_line or 1

    def fail(self, table: str | None, key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{self.path}, line {self._line(table, key)}: {message}")

    # -- the document --------------------------------------------------------------------------

    def parse(self, document: Mapping[str, Any]) -> RemotesFile:
        for key in document:
            if key not in _TOP_KEYS:
                raise self.fail(
                    None,
                    key,
                    f"unknown setting {key!r}; the top level takes cache_root and "
                    "[remotes.NAME] tables",
                )
        cache_root = default_cache_root()
        if "cache_root" in document:
            cache_root = self._path(None, "cache_root", document["cache_root"])
        tables = document.get("remotes", {})
        if not isinstance(tables, dict):
            raise self.fail(None, "remotes", "remotes must be tables: [remotes.NAME]")
        remotes: dict[str, RemoteConfig] = {}
        for name, table in tables.items():
            where = f"remotes.{name}"
            if not isinstance(table, dict):
                raise self.fail("remotes", name, f"remote {name!r} must be a table [{where}]")
            if not _NAME.match(name):
                raise self.fail(
                    where,
                    None,
                    f"remote name {name!r}: use letters, digits, '_', '-', '.'"
                    " (it names the cache directory, and a name with ':' or '/' would read as"
                    " HOST:PATH)",
                )
            remotes[name] = self._remote(name, where, table, cache_root)
        return RemotesFile(self.path, remotes)

    def _remote(
        self, name: str, where: str, table: Mapping[str, Any], cache_root: Path
    ) -> RemoteConfig:
        for key in table:
            if key not in _REMOTE_KEYS:
                raise self.fail(
                    where,
                    key,
                    f"unknown setting {key!r} in [{where}]; known: "
                    + ", ".join(sorted(_REMOTE_KEYS)),
                )
        if "url" not in table:
            raise self.fail(
                where, None, f'[{where}] has no url; add url = "HOST:/path/to/experiments"'
            )
        url = table["url"]
        if not isinstance(url, str) or not url.strip():
            raise self.fail(where, "url", 'url must be a string: "[USER@]HOST:PATH" or a directory')
        cache = (
            self._path(where, "cache", table["cache"]) if "cache" in table else cache_root / name
        )
        compress = table.get("compress")
        if compress is not None and compress not in (True, False, "auto"):
            raise self.fail(where, "compress", 'compress must be true, false or "auto"')
        stream_python = table.get("stream_python")
        if stream_python is not None and (
            not isinstance(stream_python, str)
            or not stream_python.strip()
            or any(char in stream_python for char in "\0\n\r")
        ):
            raise self.fail(
                where,
                "stream_python",
                "stream_python must be the path of a Python on the server, such as "
                '"~/runicorn-venv/bin/python"',
            )
        since = table.get("since")
        if since is not None:
            if isinstance(since, bool) or not isinstance(since, str | int | float):
                raise self.fail(where, "since", 'since must be a duration such as "7d" or "12h"')
            from runicorn.sync.selection import parse_duration

            try:
                parse_duration(str(since))
            except ValueError as error:
                raise self.fail(where, "since", str(error)) from None
            since = str(since)
        projects = self._strings(where, "projects", table.get("projects"))
        include = self._strings(where, "include", table.get("include"))
        exclude = self._strings(where, "exclude", table.get("exclude"))
        from runicorn.sync.selection import RunSelection

        try:
            RunSelection(projects=projects)
        except ValueError as error:
            raise self.fail(where, "projects", str(error)) from None
        for key, globs in (("include", include), ("exclude", exclude)):
            try:
                RunSelection(include=globs)
            except ValueError as error:
                raise self.fail(where, key, str(error)) from None
        return RemoteConfig(
            name=name,
            url=url.strip(),
            cache=cache,
            projects=projects,
            include=include,
            exclude=exclude,
            since=since,
            compress=compress,
            workers=self._int(where, "workers", table.get("workers"), 1, 64),
            port=self._int(where, "port", table.get("port"), 1, 65535),
            identity=self._strings(where, "identity", table.get("identity")),
            stream_python=stream_python.strip() if stream_python is not None else None,
        )

    def _path(self, table: str | None, key: str, value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(table, key, f"{key} must be a directory path (a string)")
        path = Path(os.path.expandvars(value.strip())).expanduser()
        # A relative path is relative to the config file, not to wherever the command runs.
        return path if path.is_absolute() else self.base / path

    def _strings(self, table: str, key: str, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(table, key, f"{key} must be a string or a list of strings")
        return tuple(value)

    def _int(self, table: str, key: str, value: object, low: int, high: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(table, key, f"{key} must be a whole number from {low} to {high}")
        return value


def _table_name(header: str) -> str | None:
    """``remotes.gpu1`` from ``[remotes.gpu1]`` or ``[remotes."gpu1"]`` (comments allowed)."""
    match = re.match(r"^\[\s*([^\]]*?)\s*\]\s*(?:#.*)?$", header)
    if match is None:
        return None
    parts = [part.strip().strip("\"'") for part in match.group(1).split(".")]
    return ".".join(parts)

"""The checks of ``runicorn doctor``: is a remote ready to sync from, and this cache to sync into?

Each check gives a :class:`Check`: what it looked at, the outcome (``ok``, ``warn``,
``fail``, or ``skip`` when an earlier failure made it meaningless) and, unless it is ok,
what to do. The checks only read: on the server they list the root and read the published
manifest (and, where the account may run commands, ``date +%s``); in the cache they read
its state and probe its lock without waiting for it. The SSH checks (login, host key) are
the command's, which owns the connection; the rest are here, over any
:class:`~runicorn.transport.remote.Remote`, so they read a local directory alike.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runicorn._sys.locking import is_locked
from runicorn._version import __version__
from runicorn.format.layout import MANIFEST_DIRNAME
from runicorn.format.models import ManifestFormat, ManifestType, SyncManifest
from runicorn.sync.cache.manager import LOCK_NAME, CacheOwnerError, LocalCacheManager, same_server
from runicorn.sync.manifest_fetch import ManifestFetcher
from runicorn.sync.manifest_fetch import check_root as check_manifest_root
from runicorn.sync.stats import SyncRun
from runicorn.transport.remote import Remote

__all__ = [
    "CLOCK_TOLERANCE",
    "FAIL",
    "MANIFEST_MAX_AGE",
    "OK",
    "SKIP",
    "WARN",
    "Check",
    "check_cache",
    "check_clock",
    "check_manifest",
    "check_root",
]

Outcome = Literal["ok", "warn", "fail", "skip"]
OK: Outcome = "ok"
WARN: Outcome = "warn"
FAIL: Outcome = "fail"
SKIP: Outcome = "skip"

MANIFEST_MAX_AGE = 86400.0
"""A full manifest older than this is reported (a warning: a lab where nothing changed keeps
its manifest, but a stopped publisher or timer looks the same)."""

CLOCK_TOLERANCE = 60.0
"""Seconds the server's clock may differ from ours before it is reported: ``--since`` and
the heartbeat ages of ``runicorn runs`` compare the server's times with ours."""

SPACE_MARGIN = 0.1
"""Free space below the lab's missing bytes plus this fraction of them is a warning."""


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str
    outcome: Outcome
    detail: str
    """What was found."""
    advice: str = ""
    """What to do about it (empty when ok)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "outcome": self.outcome,
            "detail": self.detail,
            "advice": self.advice,
        }


def _bytes(count: int) -> str:
    """1234567890 -> '1.23 GB' (decimal units, as the CLI shows sizes)."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


def _age(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def check_root(remote: Remote, where: str) -> Check:
    """The experiments root can be listed."""
    try:
        entries = remote.listdir("")
    except PermissionError as error:
        return Check(
            "remote root",
            FAIL,
            f"{where} is not readable: {error}",
            "give the account read and search permission on the root and its runs (e.g. "
            "`chmod -R g+rX` and membership of the group that owns them)",
        )
    except FileNotFoundError:
        return Check(
            "remote root",
            FAIL,
            f"{where} does not exist",
            "check the path after the colon: it is the directory holding the projects (or "
            "runs/), and a relative path starts at the login directory",
        )
    except (OSError, ValueError) as error:
        return Check(
            "remote root",
            FAIL,
            f"cannot list {where}: {error}",
            "check that the path is a directory the account can read",
        )
    visible = [entry for entry in entries if not entry.name.startswith(".")]
    return Check("remote root", OK, f"{where} is readable ({len(visible)} entries)")


def check_manifest(
    remote: Remote,
    root: str,
    where: str,
    *,
    local: bool,
    now: float | None = None,
    max_age: float = MANIFEST_MAX_AGE,
    max_bytes: int = ManifestFormat.MAX_DECOMPRESSED_BYTES,
) -> tuple[list[Check], SyncManifest | None, float | None]:
    """The full manifest: present, valid, describing ``root``; its revision and age; the
    generator that wrote it. Returns the checks, the manifest (``None`` when it failed) and
    the manifest file's mtime on the server (``None`` when unknown)."""
    now = time.time() if now is None else now
    fetcher = ManifestFetcher(lambda: remote, root, max_bytes)
    generate = f"runicorn generate-manifest --root {root or '.'}"
    try:
        manifest = fetcher.download(ManifestType.FULL, SyncRun(started=now), None)
    except FileNotFoundError as error:
        return [Check("manifest", FAIL, str(error), f"run `{generate}` on the server")], None, None
    except OSError as error:
        missing = str(error) == fetcher.missing_message(ManifestType.FULL)
        advice = (
            "generate it as the message says and keep it published (`generate-manifest "
            "--watch`, or a timer: docs/howto/schedule-generation.md); meanwhile `runicorn "
            "sync --legacy` walks the tree without one"
            if missing
            else "check the permissions of the .runicorn directory on the server"
        )
        return [Check("manifest", FAIL, str(error), advice)], None, None
    except ValueError as error:
        return (
            [Check("manifest", FAIL, str(error), f"regenerate it: `{generate}` on the server")],
            None,
            None,
        )
    try:
        check_manifest_root(manifest, root, local=local)
    except ValueError as error:
        return [Check("manifest", FAIL, str(error), "sync the root the manifest names")], None, None
    mtime = _manifest_mtime(remote)
    checks = [
        Check(
            "manifest",
            OK,
            f"full manifest revision {manifest.revision}: {manifest.total_experiments} runs, "
            f"{manifest.total_files} files",
        )
    ]
    age = now - manifest.generated_at
    if age > max_age:
        checks.append(
            Check(
                "manifest age",
                WARN,
                f"generated {_age(age)} ago",
                "if runs changed since, the publisher or its timer is not running: see "
                "docs/howto/run-the-publisher.md",
            )
        )
    else:
        checks.append(Check("manifest age", OK, f"generated {_age(age)} ago"))
    generator = manifest.generator_version or "unnamed"
    ours = f"runicorn {__version__}"
    if not manifest.generator_version:
        checks.append(
            Check(
                "generator",
                WARN,
                f"format {manifest.format_version}, the generator gave no version",
                "install runicorn on the server and publish with it",
            )
        )
    else:
        note = "" if generator == ours else f" (this client is {ours})"
        checks.append(
            Check("generator", OK, f"{generator}, format {manifest.format_version}{note}")
        )
    return checks, manifest, mtime


def _manifest_mtime(remote: Remote) -> float | None:
    try:
        entries = remote.listdir(MANIFEST_DIRNAME)
    except (OSError, ValueError):
        return None
    names = {entry.name: entry for entry in entries}
    for suffix in (ManifestFormat.GZIP_SUFFIX, ""):
        entry = names.get(ManifestType.FULL.filename + suffix)
        if entry is not None:
            return entry.mtime
    return None


def check_clock(
    server_time: float | None,
    measured_at: float,
    manifest: SyncManifest | None,
    manifest_mtime: float | None,
    *,
    tolerance: float = CLOCK_TOLERANCE,
) -> Check:
    """The server's clock against ours.

    ``server_time``: what the server said its clock read (``date +%s``) at our time
    ``measured_at``; ``None`` when the account may not run commands. Then only the
    manifest bounds it: a ``generated_at`` or file mtime later than our clock means the
    server's clock is ahead by at least that much (a clock behind cannot be told apart from
    a manifest written a while ago).
    """
    advice = (
        "set the clocks right (NTP: `timedatectl set-ntp true`, chrony); `--since` and the "
        "heartbeat ages of `runicorn runs` compare the server's times with this one's"
    )
    if server_time is not None:
        offset = server_time - measured_at
        side = "ahead of" if offset > 0 else "behind"
        if abs(offset) > tolerance:
            return Check("clock", WARN, f"the server's clock is {_age(offset)} {side} ours", advice)
        return Check("clock", OK, f"the server's clock is within {abs(offset):.0f} s of ours")
    stamps = [t for t in (manifest and manifest.generated_at, manifest_mtime) if t]
    if not stamps:
        return Check("clock", SKIP, "no command and no manifest to compare with")
    ahead = max(stamps) - measured_at
    if ahead > tolerance:
        return Check(
            "clock",
            WARN,
            f"the manifest was written {_age(ahead)} in our future: the server's clock is "
            "ahead of ours",
            advice,
        )
    return Check(
        "clock",
        OK,
        "no manifest time lies in our future (the account may not run `date`; a clock "
        "behind ours cannot be seen)",
    )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_cache(
    cache_dir: Path, remote_id: str | None, manifest: SyncManifest | None
) -> list[Check]:
    """The cache: which server it mirrors, the free space for what the lab has that it does
    not, and whether a sync holds its lock. Reads only."""
    cache = LocalCacheManager(cache_dir)
    checks: list[Check] = []
    try:
        exists = cache.state.exists()
        cached = sum(entry[1] for entry in cache.file_entries()) if exists else 0
        try:
            mirrored = cache.mirrored_remote()
        except CacheOwnerError as error:
            checks.append(Check("cache", FAIL, str(error), "see the message"))
        else:
            if (
                mirrored is not None
                and remote_id is not None
                and not same_server(mirrored, remote_id)
            ):
                checks.append(
                    Check(
                        "cache",
                        FAIL,
                        f"{cache_dir} mirrors {mirrored}, not {remote_id}",
                        "sync into another cache directory; a second server would overwrite "
                        "the first one's runs",
                    )
                )
            elif not exists:
                checks.append(
                    Check("cache", OK, f"{cache_dir} holds no cache yet (the first sync makes it)")
                )
            else:
                runs = len(cache.list_runs())
                mirrors = f", mirrors {mirrored}" if mirrored else ""
                checks.append(
                    Check("cache", OK, f"{cache_dir}: {runs} runs, {_bytes(cached)}{mirrors}")
                )
        checks.append(_space_check(cache_dir, manifest, cached))
        checks.append(_lock_check(cache.state_dir / LOCK_NAME))
    finally:
        cache.close()
    return checks


def _space_check(cache_dir: Path, manifest: SyncManifest | None, cached: int) -> Check:
    try:
        free = shutil.disk_usage(_existing_ancestor(cache_dir)).free
    except OSError as error:
        return Check("free space", FAIL, f"cannot stat {cache_dir}: {error}", "check the path")
    if manifest is None:
        return Check("free space", OK, f"{_bytes(free)} free (no manifest to compare with)")
    missing = max(0, manifest.total_bytes - cached)
    detail = f"{_bytes(free)} free; the lab has {_bytes(missing)} the cache does not hold"
    if free < missing:
        return Check(
            "free space",
            FAIL,
            detail,
            "free space, move the cache to a larger disk, or sync part of the lab "
            "(--project, --include, --since)",
        )
    if free < missing * (1 + SPACE_MARGIN):
        return Check("free space", WARN, detail, "the disk will be nearly full after a sync")
    return Check("free space", OK, detail)


def _lock_check(lock_path: Path) -> Check:
    try:
        held = is_locked(lock_path)
    except OSError as error:
        return Check("cache lock", FAIL, f"cannot probe {lock_path}: {error}", "check the path")
    if held:
        return Check(
            "cache lock",
            WARN,
            f"a sync holds {lock_path} now",
            "another sync of this cache is running (a timer, `sync --watch`); the next one "
            "waits for it. If none is, a process holding the file open keeps it: find it "
            f"with `fuser {lock_path}`",
        )
    return Check("cache lock", OK, "free" if held is not None else "free (never taken)")

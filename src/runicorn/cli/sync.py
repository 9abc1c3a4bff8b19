"""``runicorn sync [USER@]HOST:REMOTE_ROOT CACHE_DIR``: bring a local cache up to date.

Exit codes (also in ``runicorn sync --help``):

* 0 -- the cache is up to date (including "nothing changed");
* 1 -- error: connection or authentication failed, the manifest was unreadable and the
  legacy walk failed too, bad arguments (a missing local directory …);
* 2 -- usage error (click);
* 3 -- partial sync: some files failed (the next sync retries them), or a deletion asked
  for with ``--delete`` was refused by a guard;
* 4 -- the host key is unknown or has changed (nothing was synced);
* 130 -- interrupted (Ctrl+C); the cache is consistent and the next sync resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import click
import orjson

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_HOST_KEY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    configure_logging,
    human_bytes,
    ssh_options,
    terminate_as_exit,
)
from runicorn.cli._common import error as print_error

if TYPE_CHECKING:
    import paramiko

    from runicorn.cli._sync_many import Report, Target
    from runicorn.cli.config import RemotesFile
    from runicorn.sync.selection import RunSelection
    from runicorn.sync.service import MetadataSyncService
    from runicorn.sync.stats import SyncStats
    from runicorn.sync.viewer import ViewerReport
    from runicorn.transport.remote import Remote

# [USER@]HOST:PATH, where HOST may be a bracketed IPv6 address. Like scp, a colon after a
# slash does not count (``./a:b`` is a local path).
_REMOTE_SPEC = re.compile(r"^(?P<dest>(?:[^@/:\[\]]+@)?(?:\[[^\]/]+\]|[^@/:\[\]]+)):(?P<path>.*)$")


@dataclass(frozen=True)
class Source:
    """Where to sync from: an SSH destination and a path on it, or a local directory."""

    destination: str | None
    root: str

    @property
    def is_local(self) -> bool:
        return self.destination is None

    def __str__(self) -> str:
        return self.root if self.destination is None else f"{self.destination}:{self.root}"


def parse_source(spec: str) -> Source:
    """``[USER@]HOST:PATH`` is remote unless ``spec`` names an existing local path."""
    if os.path.exists(spec):
        return Source(None, os.path.abspath(spec))
    match = _REMOTE_SPEC.match(spec)
    if match is None:
        return Source(None, os.path.abspath(spec))
    return Source(match.group("dest"), match.group("path"))


def _summary_line(source: Source, service: MetadataSyncService, stats: SyncStats) -> str:
    mode = service.progress.mode or "manifest"
    took = f"{float(stats.get('duration') or 0.0):.2f} s"
    if stats.get("skipped"):
        reason = stats.get("reason") or "nothing changed"
        return f"{source}: up to date ({reason}); checked in {took}"
    revision = stats.get("manifest_revision")
    kind = stats.get("manifest_type") or "full"
    via = f"{kind} manifest revision {revision}" if mode == "manifest" else "legacy walk"
    if stats.get("dry_run"):
        plan = str(stats.get("reason") or "nothing to do").removeprefix("dry run: ")
        return f"{source}: dry run, nothing written; {plan}"
    line = (
        f"{source}: synced {stats.get('files_synced', 0)} files, "
        f"{human_bytes(int(stats.get('bytes_downloaded', 0) or 0))} in {took} via {via} "
        f"({stats.get('incremental_count', 0)} appended, {stats.get('full_count', 0)} full, "
        f"{stats.get('failed_count', 0)} failed)"
    )
    if stats.get("deleted_count"):
        line += f"; removed {stats['deleted_count']} runs that left the server"
    if stats.get("deletion_refused"):
        line += f"; deleted nothing: {stats['deletion_refused']}"
    elif stats.get("vanished_runs") and not stats.get("deleted_count"):
        line += f"; kept {stats['vanished_runs']} runs that left the server (see --delete)"
    if service.fallback_reason:
        line += f"; fell back because the {service.fallback_reason}"
    return line


def _viewer_url(value: str | None) -> str | None:
    """``--viewer`` or ``RUNICORN_VIEWER_URL``; like every RUNICORN_* variable, ``0`` or an
    empty value counts as unset."""
    url = (value or "").strip()
    if url in ("", "0"):
        return None
    from runicorn.sync.viewer import normalize_viewer_url

    try:
        return normalize_viewer_url(url)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--viewer") from None


def _viewer_document(report: ViewerReport | None) -> dict[str, Any] | None:
    """What the viewer was told, for ``--json`` (``None``: no viewer was involved)."""
    if report is None:
        return None
    return {
        "url": report.url,
        "reached": report.reached,
        "reindexed": report.reindexed,
        "status_checked": report.status_checked,
        "forgotten": report.forgotten,
        "restored": report.restored,
        "problem": report.problem,
    }


def _compression_document(client: paramiko.SSHClient | None) -> dict[str, object] | None:
    """What the connection chose for compression, for ``--json`` (``None``: no SSH)."""
    if client is None:
        return None
    from runicorn.transport.ssh import compression_choice

    # What the sync ran with: a check still probing at the end has changed nothing.
    choice = compression_choice(client, wait=0.0)
    return None if choice is None else choice.as_dict()


_OUTPUT = threading.local()
"""``report``: set by ``sync --all`` on each remote's thread (a ``_sync_many.Report``), which
collects what this module would print, to print all remotes' together at the end."""


def _fail(as_json: bool, code: int, message: str, **extra: Any) -> NoReturn:
    report = getattr(_OUTPUT, "report", None)
    if report is not None:
        report.fail(code, message, extra)
        sys.exit(code)
    print_error(message)
    if as_json:
        click.echo(orjson.dumps({"error": message, "exit_code": code, **extra}).decode())
    sys.exit(code)


@click.command("sync")
@click.argument("source", metavar="[USER@]HOST:REMOTE_ROOT|NAME", required=False)
@click.argument("cache_dir", type=click.Path(path_type=Path, file_okay=False), required=False)
@click.option(
    "--all",
    "every_remote",
    is_flag=True,
    help="Sync every remote of the config file, in parallel (one connection each); the "
    "exit code is the worst one.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The remotes file for NAME and --all [env: RUNICORN_CONFIG; default: config.toml "
    "in the platform's config directory, e.g. ~/.config/runicorn].",
)
@ssh_options
@click.option(
    "--compress/--no-compress",
    "-z",
    "compress",
    default=None,
    help="SSH compression on or off [default: the ssh config's Compression, else on when "
    "the link's round trip is 15 ms or more].",
)
@click.option(
    "--stream/--no-stream",
    "stream",
    default=None,
    help="Fetch files through one compressed stream run by python3 on the server, or only "
    "over SFTP [default: the stream for large fetches (a first sync), SFTP otherwise].",
)
@click.option(
    "--stream-python",
    "stream_python",
    metavar="PATH",
    default=None,
    help="The server's Python that runs the file stream, e.g. the python of the runicorn "
    "environment there: it has zstd, which compresses about twice as well as zlib "
    "[default: python3, which hands over to your own runicorn command's python when that "
    "has zstd].",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Parallel transfers.")
@click.option(
    "--jitter",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Random delay (seconds) before reading the manifest; set it in timers.",
)
@click.option("--legacy", is_flag=True, help="Walk the server's tree instead of the manifest.")
@click.option("--dry-run", is_flag=True, help="Report what would move; write nothing.")
@click.option("--delete", is_flag=True, help="Remove cached runs that left the server.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check every cached file on disk (else each run's status.json; all files daily).",
)
@click.option(
    "--allow-mass-delete",
    is_flag=True,
    help="With --delete: allow removing more runs than the safety threshold.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stats as one JSON object.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    help="Seconds before a silent server counts as gone.",
)
@click.option(
    "--viewer",
    "viewer_url",
    metavar="URL",
    envvar="RUNICORN_VIEWER_URL",
    default=None,
    help="A running upstream Runicorn viewer serving CACHE_DIR (http://127.0.0.1:23300): "
    "tell it which runs the sync added, changed or removed [env: RUNICORN_VIEWER_URL; "
    "'' disables].",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running on one connection: sync, then apply the server's manifests as they "
    "change until SIGTERM or Ctrl+C (exit 0). Reconnects with backoff when the connection "
    "drops.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=1.7,
    show_default=True,
    help="With --watch: seconds between probes of the active manifest (3 SFTP requests "
    "each while idle) when the server cannot push its changes.",
)
@click.option(
    "--full-interval",
    type=click.FloatRange(min=0.01),
    default=30.0,
    show_default=True,
    help="With --watch: seconds between checks of the full manifest (new and removed runs).",
)
@click.option(
    "--project",
    "projects",
    metavar="NAME",
    multiple=True,
    help="Only runs of this project (repeatable); a runs/<path>/<id> run is in the project "
    "named by its path's first component.",
)
@click.option(
    "--include",
    metavar="GLOB",
    multiple=True,
    help="Only runs whose project/name/run_id (runs/<path>/<id>) matches (repeatable); "
    "'*' stays within one component, '**' crosses them, a leading match selects the subtree.",
)
@click.option(
    "--exclude", metavar="GLOB", multiple=True, help="Leave out matching runs (repeatable)."
)
@click.option(
    "--since",
    metavar="DURATION",
    default=None,
    help="Only runs created or updated within DURATION (90s, 30m, 12h, 7d, 2w). Runs left "
    "out are neither fetched nor deleted.",
)
@click.option(
    "--max-manifest-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse a manifest larger than this, compressed or decompressed "
    "[default: 512 MiB]; raise it for a lab beyond about 2.5 million files.",
)
@click.option(
    "--max-manifest-entries",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse a manifest listing more runs and files than this, before parsing it "
    "[default: 2,000,000].",
)
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0.0),
    default=600.0,
    show_default=True,
    help="Seconds to wait for another sync writing into the same CACHE_DIR, then exit 1.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging on stderr.")
def sync(
    source: str | None,
    cache_dir: Path | None,
    every_remote: bool,
    config_path: Path | None,
    port: int | None,
    identities: tuple[str, ...],
    ssh_config: str,
    known_hosts: str | None,
    compress: bool | None,
    stream: bool | None,
    stream_python: str | None,
    workers: int | None,
    jitter: float,
    legacy: bool,
    dry_run: bool,
    delete: bool,
    verify: bool,
    allow_mass_delete: bool,
    as_json: bool,
    timeout: float,
    viewer_url: str | None,
    watch: bool,
    interval: float,
    full_interval: float,
    projects: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    since: str | None,
    max_manifest_bytes: int | None,
    max_manifest_entries: int | None,
    lock_timeout: float,
    verbose: bool,
) -> None:
    """Mirror the runs under REMOTE_ROOT on a lab server into CACHE_DIR.

    REMOTE_ROOT may also be a local directory (an NFS mount): then no SSH is used.
    NAME (no ':' or '/') is a remote of the config file, synced into its cache directory
    (or CACHE_DIR); --all syncs every remote of the config file. Options given here win
    over the file's settings.

    \b
    Exit codes:
      0    up to date (also when nothing changed)
      1    error (connection, authentication, unreadable manifest and legacy walk failed)
      2    usage error
      3    partial sync: some files failed (the next sync retries them), or a
           deletion asked for was refused by a guard
      4    host key unknown or changed: verify it, then add it to known_hosts
      130  interrupted (Ctrl+C); the cache stays consistent
      143  terminated (SIGTERM); the cache stays consistent
    With --watch, SIGTERM and Ctrl+C end it with 0 (the cache stays consistent).
    """
    configure_logging(verbose)
    if allow_mass_delete and not delete:
        raise click.UsageError("--allow-mass-delete only makes sense with --delete")
    selection = _selection(projects, include, exclude, since)
    from runicorn.cli._sync_many import (
        Invocation,
        named_remote,
        resolve,
        sync_remotes,
    )

    invocation = Invocation(
        port=port,
        identities=identities,
        workers=workers,
        selection=selection,
        stream_python=stream_python or None,
    )
    if every_remote:
        if source is not None or cache_dir is not None:
            raise click.UsageError("--all syncs the config file's remotes: no SOURCE or CACHE_DIR")
        if watch:
            raise click.UsageError("--watch follows one server: name one remote, not --all")
        config = _load_config(config_path, as_json)
        if not config.remotes:
            _fail(
                as_json,
                EXIT_FAILURE,
                f"no remotes in {config.path}: add [remotes.NAME] tables with a url "
                "(see docs/reference/config.md)",
            )
        targets = [resolve(remote, invocation) for remote in config.remotes.values()]
        shared: dict[str, Any] = {
            "jitter": jitter,
            "legacy": legacy,
            "dry_run": dry_run,
            "delete": delete,
            "verify": verify,
            "allow_mass_delete": allow_mass_delete,
            "as_json": as_json,
            "timeout": timeout,
            "viewer_url": _viewer_url(viewer_url),
            "max_manifest_bytes": max_manifest_bytes,
            "max_manifest_entries": max_manifest_entries,
            "lock_timeout": lock_timeout,
            "stream": stream,
        }

        def run_one(target: Target, report: Report) -> int:
            chosen = compress if compress is not None else target.compress
            return _sync_target(target, report, (ssh_config, known_hosts, chosen), shared)

        with terminate_as_exit():
            sys.exit(sync_remotes(targets, run_one, as_json=as_json))
    if source is None:
        raise click.UsageError(
            "give [USER@]HOST:REMOTE_ROOT CACHE_DIR, the NAME of a remote of the config file, "
            "or --all"
        )
    remote = named_remote(source, cache_dir, lambda: _load_config(config_path, as_json))
    if remote is not None:
        target = resolve(remote, invocation)
        source, port, identities = target.url, target.port, target.identities
        workers, selection = target.workers, target.selection
        stream_python = target.stream_python
        compress = compress if compress is not None else target.compress
        cache_dir = cache_dir or target.cache_dir
    elif cache_dir is None:
        raise click.UsageError(
            f"missing CACHE_DIR (or {source!r} is not a remote of the config file)"
        )
    parsed = parse_source(source)
    if parsed.is_local and not os.path.isdir(parsed.root):
        _fail(as_json, EXIT_FAILURE, f"{parsed.root} is not a directory (and not HOST:PATH)")
    if watch:
        if legacy or dry_run:
            raise click.UsageError(
                "--watch follows the server's manifests: no --legacy or --dry-run"
            )
        if full_interval < interval:
            raise click.UsageError("--full-interval must be at least --interval")
        from runicorn.cli._sync_watch import SshOptions, watch_cache

        sys.exit(
            watch_cache(
                parsed.destination,
                parsed.root,
                cache_dir,
                SshOptions(
                    port,
                    identities,
                    ssh_config,
                    known_hosts,
                    timeout,
                    compress,
                    stream,
                    stream_python or None,
                ),
                workers=workers,
                jitter=jitter,
                delete=delete,
                allow_mass_delete=allow_mass_delete,
                verify=verify,
                as_json=as_json,
                interval=interval,
                full_interval=full_interval,
                selection=selection,
                viewer_url=_viewer_url(viewer_url),
                caps={
                    name: value
                    for name, value in (
                        ("max_manifest_bytes", max_manifest_bytes),
                        ("max_manifest_entries", max_manifest_entries),
                        ("lock_timeout", lock_timeout),
                    )
                    if value is not None
                },
            )
        )
    options: dict[str, Any] = {
        "workers": workers,
        "jitter": jitter,
        "legacy": legacy,
        "dry_run": dry_run,
        "delete": delete,
        "verify": verify,
        "allow_mass_delete": allow_mass_delete,
        "as_json": as_json,
        "timeout": timeout,
        "viewer_url": _viewer_url(viewer_url),
        "selection": selection,
        "max_manifest_bytes": max_manifest_bytes,
        "max_manifest_entries": max_manifest_entries,
        "lock_timeout": lock_timeout,
        "stream": stream,
        "stream_python": stream_python or None,
    }
    ssh = (port, identities, ssh_config, known_hosts, compress)
    sys.exit(sync_source(parsed, cache_dir, ssh, **options))


def _load_config(path: Path | None, as_json: bool) -> RemotesFile:
    """The remotes file (``--config``, ``RUNICORN_CONFIG`` or the platform's); an error that
    names the file and line ends the command (exit 1)."""
    from runicorn.cli.config import CONFIG_ENV, ConfigError, load_config

    explicit = path is not None or os.environ.get(CONFIG_ENV, "").strip() not in ("", "0")
    try:
        return load_config(path, required=explicit)
    except ConfigError as error:
        _fail(as_json, EXIT_FAILURE, str(error))


def _sync_target(
    target: Target,
    report: Report,
    connection: tuple[str, str | None, bool | None],
    options: dict[str, Any],
) -> int:
    """One remote of ``sync --all``, on its own thread, its output collected in ``report``;
    ``connection``: the ssh config, known_hosts and compression choice."""
    _OUTPUT.report = report
    try:
        parsed = parse_source(target.url)
        if parsed.is_local and not os.path.isdir(parsed.root):
            _fail(True, EXIT_FAILURE, f"{parsed.root} is not a directory (and not HOST:PATH)")
        ssh_config, known_hosts, compress = connection
        ssh = (target.port, target.identities, ssh_config, known_hosts, compress)
        chosen = {
            "workers": target.workers,
            "selection": target.selection,
            "stream_python": target.stream_python,
        }
        return sync_source(parsed, target.cache_dir, ssh, **{**options, **chosen})
    finally:
        _OUTPUT.report = None


def sync_source(
    parsed: Source,
    cache_dir: Path,
    ssh: tuple[int | None, tuple[str, ...], str, str | None, bool | None],
    **options: Any,
) -> int:
    """One sync of ``parsed`` into ``cache_dir``; the exit code (``_fail`` raises
    ``SystemExit`` for the codes that end the command early). ``ssh``: port, identity
    files, ssh config, known_hosts and compression (``None``: the default)."""
    port, identities, ssh_config, known_hosts, compress = ssh
    as_json, timeout = options["as_json"], options["timeout"]
    client = None
    code = EXIT_FAILURE
    try:
        with terminate_as_exit():
            if parsed.is_local:
                code = _sync_local(parsed, cache_dir, **options)
            else:
                streams = _streams_first_sync(cache_dir, options)
                client = _connect(
                    parsed,
                    port,
                    identities,
                    ssh_config,
                    known_hosts,
                    timeout,
                    as_json,
                    compress,
                    "stream" if streams else "ssh",
                )
                code = _sync_remote(client, parsed, cache_dir, **options)
    except SystemExit as stop:
        if stop.code != EXIT_TERMINATED:
            raise
        _fail(
            as_json,
            EXIT_TERMINATED,
            "terminated; finished files are kept and the next sync resumes",
        )
    except KeyboardInterrupt:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()  # transfers still in flight fail at once instead of finishing
        _fail(
            as_json,
            EXIT_INTERRUPTED,
            "interrupted; finished files are kept and the next sync resumes",
        )
    finally:
        if client is not None:
            client.close()
    return code


def _streams_first_sync(cache_dir: Path, options: dict[str, Any]) -> bool:
    """Whether this sync will fetch through the file stream, judged before connecting: a
    cache that holds no state yet is a first sync, which opens the stream at once (unless
    --no-stream, --legacy or --dry-run). The connection then leaves compression to the
    stream instead of offering it to SSH and re-keying it off."""
    if options.get("stream") is False or options.get("legacy") or options.get("dry_run"):
        return False
    from runicorn.sync.cache import STATE_DB_NAME, STATE_DIRNAME

    return not os.path.lexists(cache_dir / STATE_DIRNAME / STATE_DB_NAME)


def _selection(
    projects: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], since: str | None
) -> RunSelection:
    """The runs to mirror from the selection options (usage errors name the option)."""
    from runicorn.sync.selection import RunSelection, parse_duration

    seconds = None
    if since is not None:
        try:
            seconds = parse_duration(since)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--since") from None
    try:
        return RunSelection.of(projects, include, exclude, seconds)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--project/--include/--exclude") from None


def _connect(
    parsed: Source,
    port: int | None,
    identities: tuple[str, ...],
    ssh_config: str,
    known_hosts: str | None,
    timeout: float,
    as_json: bool,
    compress: bool | None,
    carrier: Literal["ssh", "stream"] = "ssh",
) -> paramiko.SSHClient:
    from runicorn.transport.paramiko_import import import_paramiko

    import_paramiko()  # before anything else imports it: without invoke
    import paramiko

    from runicorn.transport.ssh import HostKeyError, SshConfigError, connect

    assert parsed.destination is not None
    for identity in identities:
        path = os.path.expanduser(identity)
        if not os.path.isfile(path):
            _fail(
                as_json,
                EXIT_FAILURE,
                f"the identity file {identity} (-i) does not exist or is not a file; check "
                "the path",
            )
    switch_interval = sys.getswitchinterval()
    _preload_sync_engine()
    try:
        return connect(
            parsed.destination,
            port=port,
            config_path=ssh_config,
            known_hosts=known_hosts,
            identity_files=identities,
            timeout=timeout,
            compress=compress,
            carrier=carrier,
        )
    except HostKeyError as exc:
        _fail(as_json, EXIT_HOST_KEY, str(exc), host=exc.host, port=exc.port)
    except SshConfigError as exc:
        _fail(as_json, EXIT_FAILURE, str(exc))
    except (paramiko.SSHException, OSError) as exc:
        _fail(as_json, EXIT_FAILURE, _connect_failure(parsed.destination, port, timeout, exc))
    finally:
        sys.setswitchinterval(switch_interval)
    raise AssertionError("unreachable")


def _connect_failure(
    destination: str, port: int | None, timeout: float, error: Exception
) -> str:
    """One line saying why connecting failed, in the words of what happened."""
    text = str(error) or type(error).__name__
    where = f"{destination}" + (f" (port {port})" if port else "")
    if "No existing session" in text or "protocol banner" in text:
        return (
            f"cannot connect to {where}: the server accepted the connection but did not "
            f"answer the SSH handshake within {timeout:g} s (not an SSH server on that "
            "port, or an overloaded one); check the host and port, or raise --timeout"
        )
    return f"cannot connect to {where}: {text}"


def _preload_sync_engine() -> None:
    """Import the sync engine on a thread while the SSH handshake waits for the network.

    The handshake is several round trips of waiting; the imports are tens of milliseconds of
    CPU that would otherwise come after it. A short switch interval (until the connection is
    up) keeps the thread from delaying paramiko's reader when a packet arrives.
    """

    def load() -> None:
        with contextlib.suppress(Exception):  # the main thread imports again and reports
            if _may_draw_progress():
                import runicorn.cli.progress  # (and rich)
            import runicorn.sync.client
            import runicorn.sync.service
            import runicorn.transport.sftp_remote  # noqa: F401  (and the SFTP engine)

    sys.setswitchinterval(0.0005)
    threading.Thread(target=load, name="runicorn-preload", daemon=True).start()


_TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
"""Environment variables with which rich may draw on what is not a terminal."""


def _may_draw_progress() -> bool:
    """Whether the progress display could draw: stderr is a terminal, or the environment
    lets rich decide otherwise. When not, rich (some 30 ms of a command's start) is never
    imported: cron, systemd, pipes and ``--json`` in a script get no display anyway."""
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return terminal or any(name in os.environ for name in _TERMINAL_OVERRIDES)


def _first_round_trip_plan(cache_dir: Path) -> tuple[bool, bool]:
    """``(stamped, fresh)``: whether the cache recorded the server's full manifest stamp
    (the no-change check then reads the active manifest's header and the full one's size
    and mtime, not its header), and whether it has no state yet (a first sync reads the
    full manifest and records its stamp, asked with the headers at no extra cost)."""
    from runicorn.sync.cache import CacheError, LocalCacheManager

    cache = LocalCacheManager(cache_dir)
    try:
        if not cache.state.exists():
            return False, True
        return cache.has_full_manifest_stamp(), False
    except CacheError:
        return False, False  # the sync reports it
    finally:
        cache.close()


def _sync_remote(
    client: paramiko.SSHClient, parsed: Source, cache_dir: Path, **options: Any
) -> int:
    import paramiko

    from runicorn.sync.manifest_fetch import PREFIX_BYTES, first_probe_paths, first_stamp_paths
    from runicorn.transport.sftp_pipeline import open_sftp_client

    root = parsed.root or "."
    root = "." if root == "~" else root.removeprefix("~/")
    stamped, fresh = _first_round_trip_plan(cache_dir)
    # The session's first round trip resolves the root, reads the active manifest's header
    # and asks the full one's size and mtime: on OpenSSH the whole no-change check rides on
    # it. The window is the worker channels'.
    try:
        transport = client.get_transport()
        if transport is None:  # connect() returns a connected client; never expected
            raise EOFError("the SSH connection is not open")
        if _streams_first_sync(cache_dir, options):
            from runicorn.transport import file_stream, openssh_shortcuts

            # The file stream's channel opens beside the SFTP one, not after the manifest.
            openssh_shortcuts.open_session_ahead(transport, file_stream.WINDOW_SIZE)
        sftp = open_sftp_client(
            transport,
            window_size=8 * 1024 * 1024,
            timeout=options["timeout"],
            root=root,
            prefetch=[] if options["legacy"] else first_probe_paths(stamped=stamped),
            prefetch_bytes=PREFIX_BYTES,
            prestat=[] if options["legacy"] else first_stamp_paths(stamped=stamped or fresh),
        )
    except (paramiko.SSHException, OSError, EOFError) as exc:
        _fail(
            options["as_json"],
            EXIT_FAILURE,
            f"cannot start an SFTP session on {parsed.destination} for {root}: {exc}",
        )
    try:
        resolved = getattr(sftp, "root", None)
        if resolved is None and not root.startswith("/"):
            resolved = sftp.normalize(root)
        source = Source(parsed.destination, resolved or root)
        return _run(client, sftp, source, cache_dir, None, **options)
    finally:
        sftp.close()


def _sync_local(parsed: Source, cache_dir: Path, **options: Any) -> int:
    from runicorn.transport.local_remote import LocalRemote

    remote = LocalRemote(parsed.root)
    try:
        return _run(None, None, parsed, cache_dir, remote, **options)
    finally:
        remote.close()


def _run(
    client: paramiko.SSHClient | None,
    sftp: paramiko.SFTPClient | None,
    source: Source,
    cache_dir: Path,
    remote: Remote | None,
    *,
    workers: int | None,
    jitter: float,
    legacy: bool,
    dry_run: bool,
    delete: bool,
    verify: bool,
    allow_mass_delete: bool,
    as_json: bool,
    timeout: float,
    viewer_url: str | None,
    selection: RunSelection,
    max_manifest_bytes: int | None,
    max_manifest_entries: int | None,
    lock_timeout: float,
    stream: bool | None = None,
    stream_python: str | None = None,
) -> int:
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.service import MetadataSyncService

    report = getattr(_OUTPUT, "report", None)
    # Under ``sync --all`` the command draws one display for every remote.
    display = None
    if report is None and _may_draw_progress():
        from runicorn.cli.progress import SyncProgressDisplay

        display = SyncProgressDisplay()
    if report is not None:
        on_progress = report.progress
    else:
        on_progress = display.track() if display is not None and display.enabled else None
    cache = LocalCacheManager(cache_dir)
    service = MetadataSyncService(
        client,
        sftp,
        source.root,
        cache,
        use_manifest_sync=not legacy,
        manifest_sync_jitter=jitter,
        remote=remote,
        max_workers=workers,
        delete=delete,
        allow_mass_delete=allow_mass_delete,
        dry_run=dry_run,
        timeout=timeout,
        verify=verify,
        on_progress=on_progress,
        viewer_url=viewer_url,
        projects=selection.projects,
        include=selection.include,
        exclude=selection.exclude,
        since=selection.since,
        max_manifest_bytes=max_manifest_bytes,
        max_manifest_entries=max_manifest_entries,
        lock_timeout=lock_timeout,
        stream=stream,
        stream_python=stream_python,
    )
    if viewer_url and not dry_run and not cache.is_marked_remote_cache:
        click.echo(
            "warning: the upstream viewer marks a running run failed when it cannot find the "
            "run's process on this machine, unless the run's path contains 'remote_cache'; "
            f"name the cache directory so (e.g. {cache.root_dir}_remote_cache) to stop it. "
            "Until then each sync puts the server's status back.",
            err=True,
        )
    try:
        with display if display is not None else contextlib.nullcontext():
            ok = service.sync_all()
    finally:
        cache.close()
    stats = service.last_stats
    if stats is None:
        message = service.progress.last_error or "sync failed"
        if sftp is not None and _is_a_file(sftp, source.root):
            message = (
                f"the remote root {source.root} is a file, not a directory; name the "
                "directory that holds the experiments"
            )
        _fail(as_json, EXIT_FAILURE, f"sync from {source} failed: {message}")
    assert stats is not None
    code = EXIT_OK if ok else EXIT_PARTIAL
    refused = stats.get("deletion_refused")
    if refused and code == EXIT_OK:
        code = EXIT_PARTIAL  # --delete was asked for and not done: a script must notice
    document = {
        **stats,
        "mode": service.progress.mode,
        "source": str(source),
        "cache_dir": str(cache.root_dir),
        "dry_run": dry_run,
        "fallback_reason": service.fallback_reason,
        "warnings": list(service.progress.warnings),
        "viewer": _viewer_document(service.last_viewer_report),
        "compression": _compression_document(client),
        "exit_code": code,
    }
    problems = []
    if stats.get("failed_count"):
        problems.append(
            f"{stats.get('failed_count')} file(s) failed (see the warnings above); "
            "run the sync again to retry them"
        )
    if refused:
        problems.append(f"deleted nothing: {refused}; everything else is synced")
    if report is not None:
        report.done(code, document, _summary_line(source, service, stats))
        report.errors.extend(problems)
        return code
    if as_json:
        click.echo(orjson.dumps(document, default=str).decode())
    else:
        click.echo(_summary_line(source, service, stats))
    for problem in problems:
        print_error(problem)
    return code


def _is_a_file(sftp: paramiko.SFTPClient, root: str) -> bool:
    """Whether the remote root is something other than a directory (asked after a failed
    sync, to say so instead of what the failed manifest read and walk said)."""
    import paramiko

    try:
        mode = sftp.stat(root).st_mode
    except (OSError, EOFError, paramiko.SSHException):
        return False
    return mode is not None and not stat.S_ISDIR(mode)

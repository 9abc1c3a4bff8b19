"""``runicorn doctor REMOTE [CACHE]``: a checklist of what a sync from REMOTE needs.

Each line is one check, ok or what to do; the exit code is 1 when a check failed, 4 when
the failure is the host key (as for ``runicorn sync``), 0 otherwise (warnings included), so a
timer can run it and alert on the code. Nothing is written: not on the server, not in the
cache.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson

from runicorn.cli._common import (
    EXIT_FAILURE,
    EXIT_HOST_KEY,
    EXIT_OK,
    configure_logging,
    printable,
    ssh_options,
    use_color,
)
from runicorn.cli.sync import parse_source

if TYPE_CHECKING:
    import paramiko

    from runicorn.cli.config import RemoteConfig
    from runicorn.sync.doctor import Check
    from runicorn.transport.remote import Remote

_MARKS = {
    "ok": ("ok", "green"),
    "warn": ("warn", "yellow"),
    "fail": ("FAIL", "red"),
    "skip": ("skip", "bright_black"),
}
"""How each outcome is shown, and its colour on a terminal."""

_DATE_COMMAND = "date +%s"
"""Read-only, in every POSIX shell: the server's clock in Unix seconds."""


@click.command("doctor")
@click.argument("source", metavar="[USER@]HOST:REMOTE_ROOT|LOCAL_DIR|NAME")
@click.argument(
    "cache_dir", metavar="[CACHE]", type=click.Path(path_type=Path, file_okay=False), required=False
)
@ssh_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server at each step.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The remotes file NAME is looked up in (default: RUNICORN_CONFIG, else the "
    "platform's config directory).",
)
@click.option(
    "--max-age",
    default="1d",
    show_default=True,
    help="A full manifest older than this is a warning (e.g. 30m, 12h, 7d).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: every check, the code.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging on stderr.")
def doctor(
    source: str,
    cache_dir: Path | None,
    port: int | None,
    identities: tuple[str, ...],
    ssh_config: str,
    known_hosts: str | None,
    timeout: float,
    config_path: Path | None,
    max_age: str,
    as_json: bool,
    verbose: bool,
) -> None:
    """Check that a sync from SOURCE (into CACHE) can work, and say what to fix.

    SOURCE is what `runicorn sync` takes: [USER@]HOST:REMOTE_ROOT over SSH, a local
    directory, or the NAME of a remote in the remotes file (its cache directory is then
    checked too). Checks: SSH login and host key, the root readable, the full manifest
    present and valid, its revision and age, the generator that wrote it, the server's clock
    against this one, and the cache's owner, free space and lock.

    Exit code: 0 when nothing failed (warnings allowed), 1 when a check failed, 4 when the
    host key is unknown or changed.
    """
    from runicorn.sync.selection import parse_duration

    configure_logging(verbose)
    try:
        max_age_seconds = parse_duration(max_age)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--max-age") from None
    url, cache_dir, named = _resolve_name(source, cache_dir, config_path)
    if named is not None:
        port = port if port is not None else named.port
        identities = identities or named.identity
    parsed = parse_source(url)
    destination, root = parsed.destination, parsed.root
    checks: list[Check] = []
    code = _run_checks(
        checks,
        destination,
        root,
        cache_dir,
        ssh=(port, identities, ssh_config, known_hosts, timeout),
        max_age=max_age_seconds,
    )
    if as_json:
        click.echo(
            orjson.dumps(
                {
                    "source": url,
                    "cache": None if cache_dir is None else str(cache_dir),
                    "checks": [check.to_json() for check in checks],
                    "exit_code": code,
                }
            ).decode()
        )
    else:
        _print(checks)
    sys.exit(code)


def _resolve_name(
    source: str, cache_dir: Path | None, config_path: Path | None
) -> tuple[str, Path | None, RemoteConfig | None]:
    """A NAME of the remotes file to its URL, cache and entry; anything else as it is."""
    if any(char in source for char in ":/\\") or os.path.exists(source):
        return source, cache_dir, None
    from runicorn.cli.config import ConfigError, load_config

    try:
        remote = load_config(config_path).get(source)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    return remote.url, cache_dir if cache_dir is not None else remote.cache, remote


def _run_checks(
    checks: list[Check],
    destination: str | None,
    root: str,
    cache_dir: Path | None,
    *,
    ssh: tuple[int | None, tuple[str, ...], str, str | None, float],
    max_age: float,
) -> int:
    """Run every check into ``checks``; the exit code."""
    from runicorn.sync import doctor as checks_of
    from runicorn.sync.doctor import FAIL, OK, SKIP, Check

    client: paramiko.SSHClient | None = None
    remote: Remote | None = None
    code = EXIT_OK
    try:
        if destination is None:
            from runicorn.transport.local_remote import LocalRemote

            remote = LocalRemote(root)
            remote_id: str | None = f"file://{root}"
            where = root
        else:
            client, failed = _connect(checks, destination, ssh)
            if client is None:
                names = ["remote root", "manifest", "clock"]
                checks.extend(Check(name, SKIP, "not connected") for name in names)
                if cache_dir is not None:
                    checks.extend(checks_of.check_cache(cache_dir, None, None))
                return EXIT_HOST_KEY if failed == "host key" else EXIT_FAILURE
            remote, root, remote_id = _open_remote(checks, client, root, ssh[4])
            where = f"{destination}:{root}"
            if remote is None:
                checks.extend(Check(name, SKIP, "no SFTP session") for name in ("manifest",))
                return EXIT_FAILURE
        root_check = checks_of.check_root(remote, where)
        checks.append(root_check)
        manifest = None
        mtime = None
        if root_check.outcome == FAIL:
            checks.append(Check("manifest", SKIP, "the root cannot be read"))
        else:
            found, manifest, mtime = checks_of.check_manifest(
                remote, root, where, local=destination is None, max_age=max_age
            )
            checks.extend(found)
        if client is None:
            checks.append(Check("clock", OK, "a local directory: one clock"))
        else:
            server_time, measured_at = _server_clock(client, ssh[4])
            checks.append(checks_of.check_clock(server_time, measured_at, manifest, mtime))
        if cache_dir is not None:
            checks.extend(checks_of.check_cache(cache_dir, remote_id, manifest))
    finally:
        if remote is not None:
            with contextlib.suppress(Exception):
                remote.close()
        if client is not None:
            client.close()
    if any(check.outcome == FAIL for check in checks):
        code = EXIT_FAILURE
    return code


def _connect(
    checks: list[Check],
    destination: str,
    ssh: tuple[int | None, tuple[str, ...], str, str | None, float],
) -> tuple[paramiko.SSHClient | None, str | None]:
    """Log in; the host key and login checks. ``(client, None)`` or ``(None, failed check)``."""
    import paramiko

    from runicorn.sync.doctor import FAIL, OK, SKIP, Check
    from runicorn.transport.ssh import (
        HostKeyError,
        SshAuthenticationError,
        SshConfigError,
        connect,
        fingerprint,
    )

    port, identities, ssh_config, known_hosts, timeout = ssh
    try:
        client = connect(
            destination,
            port=port,
            config_path=ssh_config,
            known_hosts=known_hosts,
            identity_files=identities,
            timeout=timeout,
        )
    except HostKeyError as error:
        checks.append(Check("host key", FAIL, str(error), "see the message: check the key first"))
        checks.append(Check("login", SKIP, "the host key is not trusted"))
        return None, "host key"
    except SshAuthenticationError as error:
        checks.append(Check("host key", OK, "known and matching"))
        checks.append(
            Check(
                "login",
                FAIL,
                str(error),
                "install your public key on the server (`ssh-copy-id`) or pass it with -i",
            )
        )
        return None, "login"
    except SshConfigError as error:
        checks.append(Check("login", FAIL, str(error), "fix the destination or the ssh config"))
        return None, "login"
    except (paramiko.SSHException, OSError) as error:
        checks.append(
            Check(
                "login",
                FAIL,
                f"cannot connect to {destination}: {error}",
                "check the host name and port, the network or VPN, and that sshd runs there",
            )
        )
        return None, "login"
    transport = client.get_transport()
    key = transport.get_remote_server_key() if transport is not None else None
    peer = f"{transport.getpeername()[0]}:{transport.getpeername()[1]}" if transport else ""
    user = transport.get_username() if transport is not None else ""
    checks.append(
        Check("host key", OK, f"{key.get_name()} {fingerprint(key)} is known" if key else "known")
    )
    checks.append(Check("login", OK, f"logged in as {user} at {peer}"))
    return client, None


def _open_remote(
    checks: list[Check], client: paramiko.SSHClient, root: str, timeout: float
) -> tuple[Remote | None, str, str | None]:
    """An SFTP session reading ``root``; ``(remote, absolute root, remote_id)``."""
    import paramiko

    from runicorn.sync.doctor import FAIL, Check
    from runicorn.transport.sftp_remote import SftpRemote

    try:
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(timeout)  # type: ignore[union-attr]
        relative = "." if root in ("", "~") else root.removeprefix("~/")
        try:
            resolved = sftp.normalize(relative)
        except OSError:
            resolved = relative  # the root check says what is wrong with it
    except (paramiko.SSHException, OSError, EOFError) as error:
        checks.append(
            Check(
                "sftp",
                FAIL,
                f"cannot start an SFTP session: {error}",
                "the server must allow the sftp subsystem for this account "
                "(`Subsystem sftp` in sshd_config; not ForceCommand)",
            )
        )
        return None, root, None
    transport = client.get_transport()
    remote_id = None
    if transport is not None:
        host = getattr(transport, "hostname", None) or transport.getpeername()[0]
        port = transport.getpeername()[1]
        remote_id = f"sftp://{transport.get_username()}@{host}:{port}/{resolved.lstrip('/')}"
    return SftpRemote(sftp, resolved, timeout=timeout), resolved, remote_id


def _server_clock(client: paramiko.SSHClient, timeout: float) -> tuple[float | None, float]:
    """The server's ``date +%s`` and our clock at the middle of the exchange; ``None`` when
    the account may not run commands (an sftp-only account) or the answer is not a number."""
    import paramiko

    before = time.time()
    try:
        stdin, stdout, _stderr = client.exec_command(_DATE_COMMAND, timeout=timeout)
        stdin.channel.shutdown_write()  # a ForceCommand in its place sees EOF, and ends
        answer = stdout.read(64)
        status = stdout.channel.recv_exit_status()
    except (paramiko.SSHException, OSError, EOFError):
        return None, time.time()
    after = time.time()
    try:
        value = float(answer.strip()) if status == 0 else None
    except ValueError:
        value = None
    # date +%s truncates: its second began up to 1 s before it printed.
    return (None if value is None else value + 0.5), (before + after) / 2


def _print(checks: list[Check]) -> None:
    color = use_color()
    width = max((len(check.name) for check in checks), default=0)
    for check in checks:
        mark, colour = _MARKS[check.outcome]
        label = click.style(
            f"{mark:>4}", fg=colour if color else None, bold=check.outcome == "fail"
        )
        click.echo(f"{label}  {check.name:<{width}}  {printable(check.detail)}", color=color)
        if check.advice:
            click.echo(f"      {'':<{width}}  -> {printable(check.advice)}", color=color)
    failed = sum(check.outcome == "fail" for check in checks)
    warned = sum(check.outcome == "warn" for check in checks)
    click.echo(
        f"{failed} failed, {warned} warning{'' if warned == 1 else 's'}, "
        f"{sum(check.outcome == 'ok' for check in checks)} ok"
    )

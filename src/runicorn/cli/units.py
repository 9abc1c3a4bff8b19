"""``runicorn units``: print the shipped systemd units, filled in, for installing."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

import click

from runicorn.generate.service_unit import publisher_unit
from runicorn.sync.service_unit import client_unit


@click.group("units")
def units() -> None:
    """Print systemd units for running Runicorn as a service."""


@units.command("publisher")
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    required=True,
    help="Experiments root the publisher watches.",
)
@click.option(
    "--user",
    default=None,
    help="User the service runs as (one who can read the runs and write <root>/.runicorn). "
    "Default: the current user.",
)
@click.option("--group", default=None, help="Group of the service. Default: same as --user.")
@click.option(
    "--runicorn",
    "runicorn_path",
    default=None,
    help="The runicorn executable for ExecStart. Default: this installation's (its venv).",
)
@click.option(
    "--full-interval",
    type=click.FloatRange(min=0),
    default=None,
    help="Passed on to generate-manifest --watch.",
)
@click.option("--poll", is_flag=True, help="Pass --poll on (force polling).")
def publisher(
    root: Path,
    user: str | None,
    group: str | None,
    runicorn_path: str | None,
    full_interval: float | None,
    poll: bool,
) -> None:
    """Print runicorn-publisher.service: generate-manifest --watch on ROOT as a service.

    Install it with:

    \b
      runicorn units publisher --root /data/experiments --user mluser \\
          | sudo tee /etc/systemd/system/runicorn-publisher.service
      sudo systemctl daemon-reload
      sudo systemctl enable --now runicorn-publisher.service
    """
    extra: list[str] = []
    if full_interval is not None:
        extra += ["--full-interval", f"{full_interval:g}"]
    if poll:
        extra.append("--poll")
    try:
        text = publisher_unit(
            root,
            user or getpass.getuser(),
            group,
            command=[runicorn_path] if runicorn_path else None,
            extra_arguments=extra,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    click.echo(text, nl=False)


@units.command("client")
@click.argument("source", metavar="[USER@]HOST:REMOTE_ROOT")
@click.argument("cache_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--runicorn",
    "runicorn_path",
    default=None,
    help="The runicorn executable for ExecStart. Default: this installation's (its venv).",
)
@click.option("--port", "-p", type=click.IntRange(1, 65535), help="Passed on to sync.")
@click.option(
    "--identity",
    "-i",
    "identities",
    multiple=True,
    help="Passed on to sync (repeatable): a key file, never its passphrase.",
)
@click.option("--ssh-config", default=None, help="Passed on to sync.")
@click.option("--known-hosts", default=None, help="Passed on to sync.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=None, help="Passed on.")
@click.option("--full-interval", type=click.FloatRange(min=0.01), default=None, help="Passed on.")
@click.option("--delete", is_flag=True, help="Pass --delete on (remove runs gone upstream).")
def client(
    source: str,
    cache_dir: Path,
    runicorn_path: str | None,
    port: int | None,
    identities: tuple[str, ...],
    ssh_config: str | None,
    known_hosts: str | None,
    interval: float | None,
    full_interval: float | None,
    delete: bool,
) -> None:
    """Print runicorn-sync.service: sync SOURCE CACHE_DIR --watch as a user service.

    Install it with:

    \b
      mkdir -p ~/.config/systemd/user
      runicorn units client lab:/data/experiments ~/runicorn-cache \\
          > ~/.config/systemd/user/runicorn-sync.service
      systemctl --user daemon-reload
      systemctl --user enable --now runicorn-sync.service
      loginctl enable-linger "$USER"   # keep it running while logged out
    """
    extra: list[str] = []
    if port is not None:
        extra += ["--port", str(port)]
    # A service starts in another directory, with no shell to expand "~": absolute paths.
    for identity in identities:
        extra += ["--identity", _absolute(identity)]
    for option, value in (("--ssh-config", ssh_config), ("--known-hosts", known_hosts)):
        if value is not None:
            extra += [option, _absolute(value)]
    for option, seconds in (("--interval", interval), ("--full-interval", full_interval)):
        if seconds is not None:
            extra += [option, f"{seconds:g}"]
    if delete:
        extra.append("--delete")
    try:
        text = client_unit(
            source,
            cache_dir,
            command=[runicorn_path] if runicorn_path else None,
            extra_arguments=extra,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    click.echo(text, nl=False)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))

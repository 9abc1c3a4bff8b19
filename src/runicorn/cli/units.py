"""``runicorn units``: print the shipped systemd units, filled in, for installing."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from runicorn.generate.service_unit import publisher_unit


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

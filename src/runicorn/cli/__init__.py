"""The ``runicorn`` command line: server-side manifest generation and client-side sync.

Only this package prints. Machine-readable output (``--json``) goes to stdout; logs and
progress go to stderr.
"""

from __future__ import annotations

import click

from runicorn import __version__
from runicorn.cli.demo import demo
from runicorn.cli.generate import generate_manifest
from runicorn.cli.sync import sync


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from runicorn.core.backend import active_backend

    click.echo(f"runicorn {__version__} (backend: {active_backend().name})")
    ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    "-V",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the active backend (native or python), then exit.",
)
def main() -> None:
    """Runicorn manifest-based sync of ML experiment runs."""


main.add_command(generate_manifest)
main.add_command(sync)
main.add_command(demo)

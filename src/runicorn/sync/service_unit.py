"""The user-level systemd unit shipped for the sync client's watch, filled in for one
server and one cache.

The template lives beside this module (``units/runicorn-sync.service``, package data); the
quoting and filling shared with the publisher's unit is :mod:`runicorn._sys.systemd`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from runicorn._sys.systemd import exec_start, fill_unit, runicorn_command, systemd_comment

CLIENT_UNIT = "runicorn-sync.service"


def client_unit(
    source: str,
    cache_dir: Path,
    command: Sequence[str] | None = None,
    extra_arguments: Sequence[str] = (),
) -> str:
    """The client's unit text: ``runicorn sync SOURCE CACHE_DIR --watch`` as a user service.

    ``source`` is what ``runicorn sync`` takes (``[USER@]HOST:REMOTE_ROOT``); ``command``
    starts ``runicorn`` (default :func:`~runicorn._sys.systemd.runicorn_command`);
    ``extra_arguments`` are appended after ``--watch``. Raises ``ValueError`` for a source
    or cache a unit cannot hold (empty, a line break)."""
    for label, value in (("source", source), ("cache directory", str(cache_dir))):
        if not value.strip() or "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"{label} {value!r} cannot be written into a unit")
    cache_text = os.path.abspath(os.path.expanduser(cache_dir))
    words = [*(command or runicorn_command()), "sync", source, cache_text, "--watch"]
    values = {
        "@REMOTE_COMMENT@": systemd_comment(source),
        "@CACHE_COMMENT@": systemd_comment(cache_text),
        "@EXEC_START@": exec_start([*words, *extra_arguments]),
    }
    return fill_unit("runicorn.sync", CLIENT_UNIT, values)

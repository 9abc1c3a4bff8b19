"""The systemd unit shipped for the publisher, filled in for one root and one user.

The template lives beside this module (``units/runicorn-publisher.service``, package data);
the quoting and filling shared with the client's unit is :mod:`runicorn._sys.systemd`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from runicorn._sys.systemd import exec_start, fill_unit, runicorn_command, systemd_quote

__all__ = ["PUBLISHER_UNIT", "publisher_unit", "runicorn_command", "systemd_quote"]

PUBLISHER_UNIT = "runicorn-publisher.service"


def publisher_unit(
    root: Path,
    user: str,
    group: str | None = None,
    command: Sequence[str] | None = None,
    extra_arguments: Sequence[str] = (),
) -> str:
    """The publisher's unit text for ``root``, run as ``user`` (and ``group``, default the
    same name). ``command`` starts ``runicorn`` (default :func:`runicorn_command`);
    ``extra_arguments`` are appended to ``generate-manifest --watch``."""
    for label, value in (("user", user), ("group", group or user)):
        if not value or any(char.isspace() for char in value) or "%" in value:
            raise ValueError(f"{label} {value!r} is not a valid user or group name")
    root_text = os.path.abspath(root)
    words = [
        *(command or runicorn_command()),
        "generate-manifest",
        "--root",
        root_text,
        "--watch",
        *extra_arguments,
    ]
    values = {
        "@ROOT_COMMENT@": root_text.replace("%", "%%"),
        "@USER@": user,
        "@GROUP@": group or user,
        "@EXEC_START@": exec_start(words),
    }
    return fill_unit("runicorn.generate", PUBLISHER_UNIT, values)

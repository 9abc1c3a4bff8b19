"""The systemd unit shipped for the publisher, filled in for one root and one user.

The template lives beside this module (``units/runicorn-publisher.service``, package data);
its ``@NAME@`` placeholders are replaced with values quoted the way systemd reads them, so a
root with spaces or a ``%`` in it still makes a valid unit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PUBLISHER_UNIT = "runicorn-publisher.service"


def _template(name: str) -> str:
    return (resources.files("runicorn.generate") / "units" / name).read_text("utf-8")


def systemd_quote(argument: str) -> str:
    """One ``ExecStart`` word: specifiers (``%``) and variables (``$``) escaped, quoted
    when it holds a space, a quote or a backslash."""
    escaped = argument.replace("%", "%%").replace("$", "$$")
    if escaped and not any(char in escaped for char in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def runicorn_command() -> list[str]:
    """How to start this installation's ``runicorn``: the console script beside the running
    interpreter (a virtual environment's ``bin/``), else ``python -m runicorn``."""
    script = Path(sys.executable).with_name("runicorn")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "runicorn"]


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
        "@EXEC_START@": " ".join(systemd_quote(word) for word in words),
    }
    text = _template(PUBLISHER_UNIT)
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text

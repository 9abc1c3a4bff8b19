"""Filling in the systemd units the package ships: quoting for systemd, finding ``runicorn``.

Each unit is a template (package data) whose ``@NAME@`` placeholders are replaced with
values quoted the way systemd reads them, so a path with spaces or a ``%`` in it still makes
a valid unit. The publisher's unit lives with the publisher (``runicorn.generate``), the
client's with the client (``runicorn.sync``); what both need is here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources

_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def systemd_quote(argument: str) -> str:
    """One ``ExecStart`` word: specifiers (``%``) and variables (``$``) escaped, quoted
    when it holds a space, a quote or a backslash."""
    escaped = argument.replace("%", "%%").replace("$", "$$")
    if escaped and not any(char in escaped for char in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_comment(text: str) -> str:
    """``text`` for a unit's ``Description=`` or a comment: specifiers escaped, one line."""
    return " ".join(text.replace("%", "%%").split())


def exec_start(words: Sequence[str]) -> str:
    """An ``ExecStart`` value running ``words``, each quoted for systemd."""
    return " ".join(systemd_quote(word) for word in words)


def runicorn_command() -> list[str]:
    """How to start this installation's ``runicorn``: the console script beside the running
    interpreter (a virtual environment's ``bin/``), else ``python -m runicorn``."""
    script = os.path.join(os.path.dirname(sys.executable), "runicorn")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "runicorn"]


def fill_unit(package: str, name: str, values: Mapping[str, str]) -> str:
    """The template ``<package>/units/<name>`` with each ``@KEY@`` replaced by its entry in
    ``values`` (already quoted); every placeholder of the template must have one."""
    text = (resources.files(package) / "units" / name).read_text("utf-8")
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise ValueError(f"unit {name}: no value for {', '.join(sorted(missing))}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(0)], text)

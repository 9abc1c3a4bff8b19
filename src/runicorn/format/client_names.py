"""Names the client's own file system cannot hold: the platform half of the name rule.

:mod:`runicorn.format.names` decides, on the server's side, which names a manifest may carry
at all (for every client). Some names are fine on Linux and macOS but not on a Windows
client, whose file system would refuse them or, worse, store them as another file:

* a device name -- ``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM1``-``COM9``, ``LPT1``-``LPT9``
  -- alone or before an extension (``nul.txt`` is the device too);
* a name ending in a dot or a space (Windows drops them: ``run.`` would be ``run``);
* one of ``< > : " | ? *``.

Two names differing only in case or Unicode normalisation are one file on macOS and Windows
(:func:`runicorn.format.names.fold`); :func:`case_twins` finds them in a list of paths.

Each rule takes the platform as an argument (``sys.platform`` values), so tests exercise the
Windows and macOS rules on any machine; :func:`client_path_problem` applies this machine's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from runicorn.format.names import fold

__all__ = [
    "REASON_WINDOWS_CHARACTER",
    "REASON_WINDOWS_DEVICE",
    "REASON_WINDOWS_TRAILING",
    "case_twins",
    "client_path_problem",
    "is_case_insensitive",
    "windows_name_problem",
]

WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
    | {"COM¹", "COM²", "COM³", "LPT¹", "LPT²", "LPT³"}
)
"""Names Windows reserves for devices, whatever the case and extension."""

_WINDOWS_CHARACTERS = frozenset('<>:"|?*')

REASON_WINDOWS_DEVICE = "is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
REASON_WINDOWS_TRAILING = "ends with a dot or a space, which Windows drops"
REASON_WINDOWS_CHARACTER = 'contains a character Windows cannot hold in a name (< > : " | ? *)'


def windows_name_problem(name: str) -> str | None:
    """Why a Windows file system cannot hold ``name`` (one component) as itself, or ``None``."""
    if any(char in _WINDOWS_CHARACTERS for char in name):
        return REASON_WINDOWS_CHARACTER
    if name.endswith((".", " ")):
        return REASON_WINDOWS_TRAILING
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    if stem in WINDOWS_DEVICES:
        return REASON_WINDOWS_DEVICE
    return None


def is_case_insensitive(platform: str) -> bool:
    """Whether the platform's usual file system folds case (macOS APFS/HFS+, Windows NTFS)."""
    return platform == "win32" or platform == "darwin"


def client_path_problem(path: str, platform: str = sys.platform) -> str | None:
    """Why a client on ``platform`` cannot write the ``/``-separated ``path`` as itself:
    the first component :func:`windows_name_problem` refuses on Windows; ``None`` on every
    other platform (their limits are the server-side rule's)."""
    if platform != "win32":
        return None
    for part in path.split("/"):
        reason = windows_name_problem(part)
        if reason is not None:
            return f"{part!r} {reason}"
    return None


def case_twins(paths: Iterable[str], platform: str = sys.platform) -> dict[str, str]:
    """Paths that a case-insensitive, normalising file system on ``platform`` would store
    as an earlier one (in the given order): ``{later path: earlier path}``; empty where the
    file system tells them apart."""
    if not is_case_insensitive(platform):
        return {}
    first: dict[str, str] = {}
    twins: dict[str, str] = {}
    for path in paths:
        key = fold(path)
        kept = first.setdefault(key, path)
        if kept != path:
            twins[path] = kept
    return twins

"""The name rule: which file names and paths a manifest may carry, and how to show any name.

A lab server's tree holds whatever its users and their tools created; a client must be able
to write every listed path, on Linux, macOS and Windows alike, without surprises. One rule,
stated here once, decides it for the scan (both backends), the generator, the legacy walk
and the manifest validator. A name the rule refuses is skipped and reported -- never fatal
for the rest of the lab:

* not valid UTF-8 (the JSON of a manifest cannot carry it; Python sees such a name with
  ``surrogateescape`` surrogates);
* a control or format character (Unicode categories Cc, Cf, Zl, Zp: escape sequences, bidi
  overrides, zero-width characters, line separators), which can forge terminal output and
  make two different names look the same;
* a backslash (a path separator on Windows clients);
* longer than :data:`MAX_NAME_BYTES` in UTF-8 (no common file system stores it);
* reserved by the client: its temp-file prefix (:data:`runicorn._sys.atomic.TEMP_PREFIX`),
  and at the top of a path a Windows drive (``C:``), which the client reads as absolute.

A whole path (relative to the experiments root) is refused beyond :data:`MAX_DEPTH`
components or :data:`MAX_PATH_BYTES` bytes: it could not be written below a client's cache
directory on every platform, and a walk that stops at a fixed depth has bounded cost.

Two names that differ only in case or Unicode normalisation (``Vision``/``vision``, NFC and
NFD ``café``) are one file on macOS and Windows clients: :func:`fold` gives the key they share,
and the later of two such paths (in sorted order) is skipped.

:func:`printable` is the one way a name reaches a terminal or a log: everything the rule
would refuse is shown as an escape, so no name can move the cursor or forge a line.
"""

from __future__ import annotations

import re
import unicodedata

from runicorn._sys.atomic import TEMP_PREFIX

MAX_NAME_BYTES = 255
"""Longest name (one path component) in UTF-8 bytes: ``NAME_MAX`` of Linux and macOS file
systems, and of NTFS in UTF-16 units for most names."""

MAX_PATH_BYTES = 1024
"""Longest path relative to the experiments root, in UTF-8 bytes: macOS's ``PATH_MAX`` is
1024 for a whole path, so a longer relative path could never be written there."""

MAX_DEPTH = 64
"""Most components a path relative to the experiments root may have (a run's prefix is
four of them in the project-name layout)."""

REASON_NOT_UTF8 = "name is not valid UTF-8"
REASON_CONTROL = "name contains a control or invisible formatting character"
REASON_BACKSLASH = "name contains a backslash"
REASON_NAME_TOO_LONG = f"name is longer than {MAX_NAME_BYTES} bytes"
REASON_RESERVED = "name is reserved by the sync client"
REASON_TOO_DEEP = f"path is deeper than {MAX_DEPTH} levels"
REASON_PATH_TOO_LONG = f"path is longer than {MAX_PATH_BYTES} bytes"
REASON_COLLISION = "differs only in case or Unicode normalisation from {other}"
"""Formatted with the kept path; the skipped one is the problem's path."""

NAME_REASONS = (
    REASON_NOT_UTF8,
    REASON_CONTROL,
    REASON_BACKSLASH,
    REASON_NAME_TOO_LONG,
    REASON_RESERVED,
)
"""Every answer :func:`name_problem` can give (the compiled scan numbers them)."""

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_DRIVE = re.compile(r"[A-Za-z]:")


def name_problem(name: str, *, top: bool = False) -> str | None:
    """Why ``name`` (one path component) may not be listed, or ``None`` when it may.

    ``top``: the name is the first component of a path (a project, or ``runs``), where a
    Windows drive prefix is refused too. The common case, a short printable ASCII name, costs
    a few string scans.
    """
    if name.isascii():
        if not name.isprintable():
            return REASON_CONTROL
        if "\\" in name:
            return REASON_BACKSLASH
        size = len(name)
    else:
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            return REASON_NOT_UTF8
        if any(unicodedata.category(char) in _UNSAFE_CATEGORIES for char in name):
            return REASON_CONTROL
        if "\\" in name:
            return REASON_BACKSLASH
    if size > MAX_NAME_BYTES:
        return REASON_NAME_TOO_LONG
    if name.startswith(TEMP_PREFIX) or (top and _DRIVE.match(name)):
        return REASON_RESERVED
    return None


def path_problem(path: str) -> str | None:
    """Why a ``/``-separated path relative to the experiments root may not be listed (its
    depth, its length, or the first refused component), or ``None``."""
    if path.count("/") >= MAX_DEPTH:
        return REASON_TOO_DEEP
    if len(path) > MAX_PATH_BYTES // 4 and _utf8_length(path) > MAX_PATH_BYTES:
        return REASON_PATH_TOO_LONG
    first = True
    for part in path.split("/"):
        reason = name_problem(part, top=first)
        if reason is not None:
            return reason
        first = False
    return None


def depth_problem(depth: int, length: int) -> str | None:
    """:func:`path_problem`'s checks of a whole path, from its component count and its length
    in bytes (for a walk that keeps both at hand)."""
    if depth > MAX_DEPTH:
        return REASON_TOO_DEEP
    if length > MAX_PATH_BYTES:
        return REASON_PATH_TOO_LONG
    return None


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def fold(path: str) -> str:
    """The key two paths share when a case-insensitive or normalising file system (macOS,
    Windows) would store them as one: NFC of the case-folded NFD form."""
    if path.isascii():
        return path.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", path).casefold())


def printable(text: str) -> str:
    """``text`` safe for a terminal or a log line: each character the name rule refuses
    as a control or format character, and every undecodable byte, is shown as a Python
    escape as ``unicode_escape`` writes it (``\\x1b``, ``\\n``, ``\\u202e``; an undecodable
    byte as ``\\xff``); the rest as is. (A backslash is left alone: a
    name that spells an escape out can only look like one, never act as one.)"""
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escaped(char) for char in text)


def json_safe(path: str) -> str:
    """``path`` as a manifest carries it: as it is when JSON can carry it, so a client can
    match it against what it holds; else (undecodable bytes) as :func:`printable` shows it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return printable(path)
    return path


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return char
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"

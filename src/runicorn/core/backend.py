"""The one place that decides which implementation of the hot paths runs.

``RUNICORN_PURE_PYTHON=1`` forces the pure-Python modules; on CPython the compiled twins
(built from ``csrc/``) are used when present, and their absence is logged once as a warning.
``RUNICORN_REQUIRE_NATIVE=1`` turns that absence into an ``ImportError`` (CI sets it, so a
broken build cannot pass by testing Python twice).

Library code takes a :class:`Backend` argument defaulting to :func:`active_backend`, so the
tests can run every behaviour against both implementations in one process.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from runicorn._sys.cpu import usable_cores

if TYPE_CHECKING:
    from runicorn.core import copy, diff, entries, scan, tailhash
    from runicorn.core.copy import CopyJob, CopyResult, Install
    from runicorn.core.diff import DiffResult, LocalEntry, RemoteEntry
    from runicorn.core.entries import Entries
    from runicorn.core.memo import FileMemo
    from runicorn.core.scan import RunScan, ScanResult
    from runicorn.core.tailhash import TailRequest, TailResult
    from runicorn.format.models import ExperimentEntry

logger = logging.getLogger(__name__)

NATIVE = "native"
PYTHON = "python"

# concept -> (pure-Python module, compiled module)
MODULES = {
    "scan": ("runicorn.core.scan", "runicorn.core._native_scan"),
    "diff": ("runicorn.core.diff", "runicorn.core._native_diff"),
    "tailhash": ("runicorn.core.tailhash", "runicorn.core._native_tailhash"),
    "entries": ("runicorn.core.entries", "runicorn.core._native_entries"),
    "copy": ("runicorn.core.copy", "runicorn.core._native_copy"),
}

FUNCTIONS = {
    "scan": ("scan_experiments",),
    "diff": ("diff_entries",),
    "tailhash": ("hash_tails",),
    "entries": ("build_file_entries", "encode_experiments"),
    "copy": ("copy_files", "install_files"),
}


MAX_DEFAULT_SCAN_THREADS = 4
"""More threads than this rarely help a local disk; on NFS or Lustre ask for more."""


class ScanExperiments(Protocol):
    """:func:`runicorn.core.scan.scan_experiments`."""

    def __call__(self, root: str, threads: int = 1, read: Collection[str] = ()) -> ScanResult: ...


class DiffEntries(Protocol):
    """:func:`runicorn.core.diff.diff_entries`."""

    def __call__(
        self, remote: Sequence[RemoteEntry], local: Sequence[LocalEntry]
    ) -> DiffResult: ...


class HashTails(Protocol):
    """:func:`runicorn.core.tailhash.hash_tails`."""

    def __call__(
        self,
        root: str,
        requests: Sequence[TailRequest],
        window: int = ...,
        algorithm: str = ...,
    ) -> list[TailResult | None]: ...


class BuildFileEntries(Protocol):
    """:func:`runicorn.core.entries.build_file_entries`."""

    def __call__(
        self,
        runs: Sequence[RunScan],
        memos: Mapping[str, FileMemo],
        reuse_before_ns: int,
        watched: tuple[str, ...] = (),
    ) -> Entries: ...


class EncodeExperiments(Protocol):
    """:func:`runicorn.core.entries.encode_experiments`."""

    def __call__(self, experiments: Sequence[ExperimentEntry]) -> bytes: ...


class CopyFiles(Protocol):
    """:func:`runicorn.core.copy.copy_files`."""

    def __call__(
        self,
        source_fd: int,
        target_fd: int,
        jobs: Sequence[CopyJob],
        temp_prefix: str,
        threads: int = 1,
        make_dirs: bool = False,
    ) -> list[CopyResult]: ...


class InstallFiles(Protocol):
    """:func:`runicorn.core.copy.install_files`."""

    def __call__(
        self, target_fd: int, installs: Sequence[Install], threads: int = 1
    ) -> list[int]: ...


if TYPE_CHECKING:
    # The pure twins are the specification: mypy proves each one fits its protocol (the
    # compiled twins have no stubs; a test compares their signatures with the pure ones).
    _scan: ScanExperiments = scan.scan_experiments
    _diff: DiffEntries = diff.diff_entries
    _hash: HashTails = tailhash.hash_tails
    _build: BuildFileEntries = entries.build_file_entries
    _encode: EncodeExperiments = entries.encode_experiments
    _copy: CopyFiles = copy.copy_files
    _install: InstallFiles = copy.install_files


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    """One complete implementation of the hot paths."""

    name: str
    scan_experiments: ScanExperiments
    diff_entries: DiffEntries
    hash_tails: HashTails
    build_file_entries: BuildFileEntries
    encode_experiments: EncodeExperiments
    copy_files: CopyFiles
    install_files: InstallFiles

    def __repr__(self) -> str:
        return f"<runicorn backend {self.name}>"

    @property
    def releases_gil(self) -> bool:
        """Whether its scan and tail hashing run without the GIL (the compiled core's do),
        so that threads make them faster rather than slower."""
        return self.name == NATIVE

    def default_scan_threads(self) -> int:
        """Threads for a scan when the caller names none: up to 4 (one per usable core)
        for the compiled core, 1 for pure Python, where threads only add GIL contention."""
        if not self.releases_gil:
            return 1
        return min(MAX_DEFAULT_SCAN_THREADS, usable_cores())


def _modules(kind: str) -> dict[str, ModuleType]:
    column = 0 if kind == PYTHON else 1
    return {concept: importlib.import_module(names[column]) for concept, names in MODULES.items()}


@cache
def load_backend(kind: str) -> Backend:
    """Import one backend by name (``"native"`` or ``"python"``); ``ImportError`` if absent."""
    if kind not in (NATIVE, PYTHON):
        raise ValueError(f"unknown backend {kind!r}; expected {NATIVE!r} or {PYTHON!r}")
    modules = _modules(kind)
    functions = {
        fn: getattr(modules[concept], fn) for concept, names in FUNCTIONS.items() for fn in names
    }
    return Backend(name=kind, **functions)


def native_available() -> bool:
    """Whether the compiled backend imports on this interpreter."""
    try:
        load_backend(NATIVE)
    except ImportError:
        return False
    return True


@cache
def active_backend() -> Backend:
    """The backend library code uses unless told otherwise (decided once per process)."""
    if _flag("RUNICORN_PURE_PYTHON"):
        return load_backend(PYTHON)
    if platform.python_implementation() != "CPython":
        return load_backend(PYTHON)
    try:
        return load_backend(NATIVE)
    except ImportError as error:
        if _flag("RUNICORN_REQUIRE_NATIVE"):
            raise ImportError(
                f"RUNICORN_REQUIRE_NATIVE is set but the compiled core did not load: {error}. "
                "Rebuild with `pip install -e .` and check the build log for compiler errors."
            ) from error
        logger.warning(
            "runicorn's compiled core is not available (%s); using the slower pure-Python "
            "backend. Set RUNICORN_PURE_PYTHON=1 to choose it explicitly.",
            error,
        )
        return load_backend(PYTHON)

"""Finding, reading and validating the manifest a server publishes.

A server publishes a full manifest and perhaps an active one, each as ``.json.gz`` or
``.json``, under the experiments root. This module knows where to look and how to read them
cheaply and safely: the first :data:`PREFIX_BYTES` of every candidate in one pipelined round
(the header that tells whether anything changed, and the whole of a small manifest), the rest
only when needed, size-capped before and while decompressing, then validated, including that
it describes the root that was asked for. Deciding *which* manifest to apply, from what the
cache last applied, is the client's job (:mod:`.client`).

Everything the server says is untrusted.
"""

from __future__ import annotations

import os
import posixpath
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runicorn.format.layout import MANIFEST_DIRNAME
from runicorn.format.models import (
    ManifestFormat,
    ManifestType,
    SyncManifest,
    ValidationMemo,
    read_header,
)

if TYPE_CHECKING:
    from runicorn.sync.stats import SyncRun
    from runicorn.transport.remote import Remote

__all__ = [
    "PREFIX_BYTES",
    "ManifestFetcher",
    "Probe",
    "check_root",
    "first_probe_paths",
    "first_stamp_paths",
    "normalize_root",
]

PREFIX_BYTES = 255 * 1024
"""How much of a manifest the no-change check reads: its header comes first, and this is one
READ (OpenSSH's clamp), so a manifest up to this size (a gzip manifest of ~1,000 runs) arrives
whole with the check and is not downloaded again when it changed."""


def first_probe_paths(*, stamped: bool = False) -> list[str]:
    """What a sync's no-change check reads first (relative to the root): the ``.gz`` of the
    full manifest, then of the active one; only the active one's when the cache recorded the
    full manifest's stamp (``stamped``), which :func:`first_stamp_paths` then checks. A
    caller that can read them early (the first round trip of an SFTP session) saves the
    check its round trips."""
    kinds = (ManifestType.ACTIVE,) if stamped else (ManifestType.FULL, ManifestType.ACTIVE)
    return [f"{MANIFEST_DIRNAME}/{kind.filename}{ManifestFormat.GZIP_SUFFIX}" for kind in kinds]


def first_stamp_paths(*, stamped: bool = False) -> list[str]:
    """What a sync's no-change check asks the size and mtime of first, when the cache
    recorded the full manifest's stamp (``stamped``): the full manifest's ``.gz``, compared
    with that record in place of reading its header."""
    if not stamped:
        return []
    return [f"{MANIFEST_DIRNAME}/{ManifestType.FULL.filename}{ManifestFormat.GZIP_SUFFIX}"]


def normalize_root(root: str) -> str:
    root = root.strip()
    if root in ("~", "."):
        return ""
    if root.startswith("~/"):
        root = root[2:]
    return posixpath.normpath(root) if root else ""


@dataclass
class Probe:
    """The first bytes of one published manifest file."""

    path: str
    gz: bool
    data: bytes
    complete: bool
    header: dict[str, Any] | None


def _header_of(data: bytes, gz: bool) -> dict[str, Any] | None:
    """Header fields from a (possibly gzip) manifest prefix, or ``None`` if not there."""
    if gz:
        try:
            data = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, 256 * 1024)
        except zlib.error:
            return None
    return read_header(data)


@dataclass
class ManifestFetcher:
    """Where a server publishes its manifests, and how one is read from it.

    ``remote`` returns the client's :class:`Remote` (built on first use); the settings are
    the client's at the time of the call.
    """

    remote: Callable[[], Remote]
    remote_root: str
    max_manifest_bytes: int
    max_manifest_entries: int | None = ManifestFormat.MAX_ENTRIES
    active_memo: ValidationMemo | None = None
    """Kept by the client across passes: an active manifest's runs that did not change since
    the last one read are not validated again."""
    full_stamp: tuple[int, int] | None = None
    """``(size, mtime)`` of the full manifest's ``.gz`` when :meth:`probe_many` was asked
    for it and the server answered."""

    def candidates(self, manifest_type: ManifestType) -> list[tuple[str, bool]]:
        base = f"{MANIFEST_DIRNAME}/{manifest_type.filename}"
        return [(base + ManifestFormat.GZIP_SUFFIX, True), (base, False)]

    def where(self, path: str) -> str:
        return f"{self.remote_root.rstrip('/')}/{path}"

    def missing_message(self, manifest_type: ManifestType) -> str:
        return (
            f"no {manifest_type.value} manifest at "
            f"{self.where(MANIFEST_DIRNAME + '/' + manifest_type.filename)}(.gz); generate "
            f"one on the server with `runicorn generate-manifest --root {self.remote_root}`"
        )

    def probe_many(
        self,
        wanted: Sequence[tuple[ManifestType, bool]],
        run: SyncRun,
        *,
        stamp_full: bool = False,
    ) -> list[Probe | None]:
        """Read the first :data:`PREFIX_BYTES` of each published manifest in ``wanted``
        (type, gz only), all ``.gz`` candidates in one pipeline: OPEN, READ and a CLOSE
        nobody waits for, two round trips however many. A missing ``.gz`` is followed by
        its plain ``.json`` unless gz only. ``None`` for a type with no manifest published.
        ``stamp_full``: the same pipeline first asks the full manifest's ``.gz`` for its size
        and mtime (:attr:`full_stamp`), where the remote can (``probe_files``)."""
        found: list[Probe | None] = [None] * len(wanted)
        stamp_paths = [self.candidates(ManifestType.FULL)[0][0]] if stamp_full else []
        rounds = [
            [(i, *self.candidates(kind)[0]) for i, (kind, _) in enumerate(wanted)],
            [
                (i, *self.candidates(kind)[1])
                for i, (kind, gz_only) in enumerate(wanted)
                if not gz_only
            ],
        ]
        for candidates in rounds:
            todo = [(i, path, gz) for i, path, gz in candidates if found[i] is None]
            if stamp_paths:
                results = self._probe_files([path for _, path, _ in todo], stamp_paths)
                stamp_paths = []
            elif not todo:
                continue
            else:
                results = self.read_prefixes([path for _, path, _ in todo])
            for (i, path, gz), data in zip(todo, results, strict=True):
                if isinstance(data, FileNotFoundError):
                    continue
                if isinstance(data, BaseException):
                    where = self.where(path)
                    raise OSError(f"cannot read the manifest {where}: {data}") from data
                run.bytes_downloaded += len(data)
                complete = len(data) < PREFIX_BYTES
                found[i] = Probe(path, gz, data, complete, _header_of(data, gz))
            if all(probe is not None for probe in found):
                break
        return found

    def pushed_probe(self, manifest_type: ManifestType, data: bytes) -> Probe:
        """A probe of the ``.gz`` manifest whose whole content the server pushed (the watch's
        change feed): :meth:`download` then reads nothing more."""
        path, gz = self.candidates(manifest_type)[0]
        return Probe(path, gz, data, True, _header_of(data, gz))

    def _probe_files(
        self, paths: list[str], stamp_paths: list[str]
    ) -> list[bytes | BaseException]:
        """:meth:`read_prefixes`, with the stamps of ``stamp_paths`` (the full manifest's
        ``.gz``) asked first in the same pipeline where the remote can."""
        prober = getattr(self.remote(), "probe_files", None)
        if prober is None:
            return self.read_prefixes(paths)
        try:
            prefixes, stamps = prober(paths, PREFIX_BYTES, stamp_paths)
        except OSError as error:  # the channel failed: every read failed
            return [error] * len(paths)
        stamp = stamps[0] if stamps else None
        self.full_stamp = stamp if isinstance(stamp, tuple) else None
        return list(prefixes)

    def read_prefixes(self, paths: list[str]) -> list[bytes | BaseException]:
        """The remote's pipelined ``read_prefixes`` where it has one, else one at a time."""
        reader = getattr(self.remote(), "read_prefixes", None)
        if reader is not None:
            try:
                return list(reader(paths, PREFIX_BYTES))
            except OSError as error:  # the channel failed: every read failed
                return [error] * len(paths)
        results: list[bytes | BaseException] = []
        for path in paths:
            try:
                results.append(self.remote().read_prefix(path, PREFIX_BYTES))
            except OSError as error:
                results.append(error)
        return results

    def download(
        self,
        manifest_type: ManifestType,
        run: SyncRun,
        probe: Probe | None,
        known_runs: Mapping[str, bytes] | None = None,
    ) -> SyncManifest:
        """Read, decompress (capped) and validate the whole manifest; runs listed exactly as
        ``known_runs`` holds them are left out (``SyncManifest.from_json``)."""
        candidates = self.candidates(manifest_type)
        if probe is not None:
            candidates = candidates[[path for path, _ in candidates].index(probe.path) :]
        for path, gz in candidates:
            where = self.where(path)
            if probe is not None and probe.path == path and probe.complete:
                data = probe.data
            else:
                try:
                    data = self.remote().read_file(path, self.max_manifest_bytes)
                except FileNotFoundError:
                    continue
                except ValueError as error:
                    raise ValueError(f"manifest {where}: {error}") from error
                except OSError as error:
                    raise OSError(f"cannot read the manifest {where}: {error}") from error
                run.bytes_downloaded += len(data)
            if len(data) > self.max_manifest_bytes:
                raise ValueError(
                    f"manifest {where} is larger than {self.max_manifest_bytes} bytes; "
                    "refusing it (raise max_manifest_bytes, --max-manifest-bytes on the "
                    "command line, for a lab this large)"
                )
            memo = self.active_memo if manifest_type is ManifestType.ACTIVE else None
            if gz:
                manifest = SyncManifest.from_gzip(
                    data,
                    source=f"manifest {where}",
                    max_decompressed=self.max_manifest_bytes,
                    max_entries=self.max_manifest_entries,
                    memo=memo,
                    known_runs=known_runs,
                )
            else:
                manifest = SyncManifest.from_json(
                    data,
                    source=f"manifest {where}",
                    max_entries=self.max_manifest_entries,
                    memo=memo,
                    known_runs=known_runs,
                )
            if manifest.manifest_type is not manifest_type:
                raise ValueError(
                    f"manifest {where} says it is a {manifest.manifest_type.value} manifest, "
                    f"not {manifest_type.value}; regenerate it on the server"
                )
            return manifest
        raise OSError(self.missing_message(manifest_type))


def check_root(manifest: SyncManifest, remote_root: str, *, local: bool) -> None:
    """The manifest must describe the root we asked for (a copied or misplaced manifest
    would otherwise mirror, or delete, the wrong runs). ``local``: the remote is a local
    directory (no SFTP client), so a relative root is relative to the working directory."""
    asked = normalize_root(remote_root)
    published = posixpath.normpath(manifest.remote_root) if manifest.remote_root else ""
    if local and not posixpath.isabs(asked):
        asked = os.path.abspath(remote_root)
    if posixpath.isabs(asked):
        matches = asked == published
    else:
        # Relative to the login directory: the server's absolute path must end with it.
        matches = not asked or published.endswith("/" + asked)
    if not matches:
        raise ValueError(
            f"the manifest describes remote_root {manifest.remote_root!r}, not "
            f"{remote_root!r}; regenerate it with `runicorn generate-manifest --root "
            f"{remote_root}` or sync the root it names"
        )

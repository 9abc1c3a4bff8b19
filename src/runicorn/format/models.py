"""Manifest format 1.0: the data model, its encoding, and strict validation of what we read.

A manifest arrives from a server we do not control, so decoding is validation: every field
is type-checked, every path is checked against the rules of spec section 3.9, and the first
problem raises ``ValueError`` naming the field and the run it belongs to. Encoding is
deterministic (fixed key order, compact orjson) so both backends publish identical bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from itertools import starmap
from typing import Any

import orjson

from runicorn._sys.atomic import TEMP_PREFIX
from runicorn._sys.gcpause import paused_gc
from runicorn._version import __version__
from runicorn.format import names
from runicorn.format.compression import JsonTally, decompress_capped, decompress_pieces
from runicorn.format.layout import RUNS_DIRNAME, run_prefix


class ManifestType(str, Enum):
    """Which runs a manifest lists: all of them, or only the recently active ones."""

    FULL = "full"
    ACTIVE = "active"

    @property
    def filename(self) -> str:
        """The published file name, e.g. ``full_manifest.json``."""
        return f"{self.value}_manifest.json"


class ManifestFormat:
    """Constants of manifest format 1.0 and the limits a reader enforces."""

    VERSION = "1.0"
    SUPPORTED_MAJOR = "1"
    TAIL_HASH_ALGORITHM = "blake3-128"
    LEGACY_TAIL_HASH_ALGORITHM = "md5"
    """The tail hash of a manifest that names no algorithm: 0.5.x generators (and the API
    document's example) write MD5 of the same window."""
    TAIL_HASH_WINDOW = 4096
    GZIP_SUFFIX = ".gz"
    MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024
    """A decompressed manifest larger than this is refused (gzip bombs). About 2.5 million
    file entries fit; raise it on the reader for labs beyond that."""
    MAX_ENTRIES = 2_000_000
    """A manifest listing more runs and files than this is refused before it is parsed
    (what parsing costs grows with the entries, not the bytes): twice a 100,000-run lab of
    ten files a run. Raise it on the reader (``max_manifest_entries``) for labs beyond."""
    MAX_SIZE = 2**63 - 1


_HEX = re.compile(r"[0-9a-f]+\Z")

MAX_CHANGES_SINCE = 1024
"""A ``changes_since`` header naming more full manifests than this is refused."""


@dataclass(slots=True)
class FileEntry:
    """One file of a run, as the server saw it."""

    path: str
    """Relative POSIX path from the experiments root."""
    size: int
    mtime: float
    priority: int = 4
    is_append_only: bool = False
    tail_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mtime": self.mtime,
            "priority": self.priority,
            "is_append_only": self.is_append_only,
        }
        if self.tail_hash is not None:
            data["tail_hash"] = self.tail_hash
        return data


@dataclass(slots=True)
class ExperimentEntry:
    """One run and its files, sorted by path.

    A runs-path run (``runs/<path...>/<run_id>/``) has ``project`` ``"runs"``, ``name`` its
    path and ``path`` the same path; ``path`` is ``None`` for a project-name run.
    """

    run_id: str
    project: str
    name: str
    status: str
    created_at: float
    updated_at: float
    files: list[FileEntry] = field(default_factory=list)
    tags: list[str] | None = None
    path: str | None = None

    @property
    def prefix(self) -> str:
        """The path prefix every file of this run must carry."""
        return run_prefix(self.project, self.name, self.run_id)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "project": self.project,
            "name": self.name,
        }
        if self.path is not None:
            data["path"] = self.path
        data["status"] = self.status
        data["created_at"] = self.created_at
        data["updated_at"] = self.updated_at
        data["files"] = [entry.to_dict() for entry in self.files]
        if self.tags:
            data["tags"] = list(self.tags)
        return data


EXPERIMENTS_KEY = b',"experiments":'
"""What joins the header to the experiments array in the JSON :meth:`SyncManifest.to_json`
writes. Inside a JSON string every ``"`` is escaped, so in those bytes the first occurrence
of this is the key itself (what :class:`~runicorn.format.published.PublishedManifest`
splits on)."""


@dataclass(slots=True)
class SyncManifest:
    """A complete manifest: header plus every listed run."""

    manifest_type: ManifestType
    revision: int
    snapshot_id: str
    generated_at: float
    server_hostname: str
    remote_root: str
    experiments: list[ExperimentEntry] = field(default_factory=list)
    format_version: str = ManifestFormat.VERSION
    generator_version: str = f"runicorn {__version__}"
    tail_hash_algorithm: str | None = ManifestFormat.TAIL_HASH_ALGORITHM
    tail_hash_window: int | None = ManifestFormat.TAIL_HASH_WINDOW
    changes_since: list[str] | None = None
    """Active manifests (optional header field): snapshot ids of full manifests, oldest
    first, the last the newest full manifest when this one was generated. For each of them
    this manifest lists every run whose entry differs from that full manifest's (removed
    runs excepted), so a client that applied one can apply this instead of the newest."""
    problems: list[tuple[str, str]] | None = field(default_factory=list)
    """``(path, reason)`` of what the generator could not read or list (an unreadable
    directory, a vanished file, a name the name rule refuses): empty when its scan was
    complete, ``None`` when the manifest does not say (other generators). Clients never
    delete what lies under one of these paths."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of the runs and files this reader left out because the name rule
    (:mod:`runicorn.format.names`) refuses their paths; never encoded."""
    unchanged: list[str] = field(default_factory=list)
    """The directory prefixes of the runs this reader left out because the caller holds
    them exactly as listed (``known_runs`` of :meth:`from_json`); never encoded."""

    @property
    def total_experiments(self) -> int:
        return len(self.experiments)

    @property
    def tail_hashes_by(self) -> str:
        """The algorithm of this manifest's tail hashes: the header's, else MD5 (see
        :attr:`ManifestFormat.LEGACY_TAIL_HASH_ALGORITHM`)."""
        return self.tail_hash_algorithm or ManifestFormat.LEGACY_TAIL_HASH_ALGORITHM

    @property
    def total_files(self) -> int:
        return sum(len(exp.files) for exp in self.experiments)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for exp in self.experiments for entry in exp.files)

    @property
    def statistics(self) -> dict[str, int]:
        return {
            "total_experiments": self.total_experiments,
            "total_files": self.total_files,
            "total_bytes": self.total_bytes,
        }

    def iter_files(self) -> Iterator[FileEntry]:
        """Every file entry of every run, in manifest order."""
        for exp in self.experiments:
            yield from exp.files

    def to_dict(self) -> dict[str, Any]:
        """The JSON document. Header fields come first, so a reader can learn the revision
        from the first few kilobytes (see :func:`read_header`)."""
        data = self._header_dict()
        data["experiments"] = [exp.to_dict() for exp in self.experiments]
        return data

    def _header_dict(self) -> dict[str, Any]:
        """Every top-level field but ``experiments``, which comes last, in document order."""
        data: dict[str, Any] = {
            "format_version": self.format_version,
            "manifest_type": self.manifest_type.value,
            "revision": self.revision,
            "snapshot_id": self.snapshot_id,
            "generated_at": self.generated_at,
            "server_hostname": self.server_hostname,
            "remote_root": self.remote_root,
            "generator_version": self.generator_version,
        }
        if self.tail_hash_algorithm is not None:
            data["tail_hash_algorithm"] = self.tail_hash_algorithm
        if self.tail_hash_window is not None:
            data["tail_hash_window"] = self.tail_hash_window
        if self.changes_since is not None:
            data["changes_since"] = list(self.changes_since)
        data["statistics"] = self.statistics
        if self.problems is not None:
            data["problems"] = [{"path": path, "reason": reason} for path, reason in self.problems]
        return data

    def protects(self, run_directory: str) -> bool:
        """Whether a run directory (relative, no trailing slash) lies under, at or above a
        path this manifest reports as a problem or that its reader skipped: what lies there
        may exist on the server unseen, so a client must not delete it."""
        for path, _reason in self.problem_paths():
            if (
                path == run_directory
                or path.startswith(run_directory + "/")
                or run_directory.startswith(path + "/")
            ):
                return True
        return False

    def problem_paths(self) -> list[tuple[str, str]]:
        """The generator's problems and the reader's skipped paths, together."""
        return [*(self.problems or ()), *self.skipped]

    def to_json(self, experiments_json: bytes | None = None) -> bytes:
        """Deterministic compact JSON bytes, the same as ``orjson.dumps(self.to_dict())``.

        ``experiments_json`` is :func:`encode_experiments` of this manifest's experiments,
        when the caller already has it: the generator hashes those bytes for its content
        digest, and encoding a large lab's entries a second time would add about a tenth to a
        full generation.
        """
        return b"".join(self.to_json_pieces(experiments_json))

    def to_json_pieces(self, experiments_json: bytes | None = None) -> tuple[bytes, bytes, bytes]:
        """:meth:`to_json` as three pieces that concatenate to it (header, experiments,
        closing brace): the generator writes, compresses and hashes a large lab's manifest
        without copying 150 MB into one buffer first."""
        if experiments_json is None:
            experiments_json = encode_experiments(self.experiments)
        header = orjson.dumps(self._header_dict())
        # compact JSON of an object ends in "}", and experiments is its last key
        return header[:-1] + EXPERIMENTS_KEY, experiments_json, b"}"

    @classmethod
    def from_json(
        cls,
        data: bytes | bytearray,
        *,
        source: str = "manifest",
        max_entries: int | None = ManifestFormat.MAX_ENTRIES,
        memo: ValidationMemo | None = None,
        known_runs: Mapping[str, bytes] | None = None,
    ) -> SyncManifest:
        """Parse and validate JSON bytes; ``ValueError`` says what is wrong and where.

        A document listing more than ``max_entries`` runs and files (``None``: no cap) is
        refused before it is parsed (:class:`~runicorn.format.compression.JsonTally`).
        ``memo``: runs validated by the previous call with it are not checked again
        (:class:`ValidationMemo`); the result is the same.
        ``known_runs``: per run prefix, the :func:`run_digest` of a run the caller holds as
        validated and applied; a run listed with exactly that JSON is left out of
        ``experiments`` (its prefix goes to ``unchanged``) without being built or checked
        again, but for what spans runs (a run listed twice, the statistics), unless its
        directory nests with another run's.
        """
        return cls._parse([data], source, max_entries, memo, known_runs)

    @classmethod
    def _parse(
        cls,
        holder: list[bytes | bytearray],
        source: str,
        max_entries: int | None,
        memo: ValidationMemo | None,
        known_runs: Mapping[str, bytes] | None,
    ) -> SyncManifest:
        """:meth:`from_json` of the bytes in ``holder``, which it empties: bytes only it
        holds (a decompressed manifest) are freed once parsed, and each run's parsed JSON
        once validated, so the text, the parsed document and the entries are never all
        in memory at once (at 100,000 runs: 150 MB, about 400 MB and 200 MB). A large
        document is parsed a few runs at a time (:func:`_split_document`) unless
        ``known_runs`` asks for a look at every run first."""
        data = holder.pop()
        if max_entries is not None:
            JsonTally(len(data), max_entries, source).add(data)
        split = (
            _split_document(data) if len(data) > PARSE_PIECE_BYTES and not known_runs else None
        )
        if split is not None:
            header, pieces = split
            try:
                with paused_gc():
                    return _Validator(source, memo).manifest(header, runs=_runs(data, pieces))
            except _SplitFailed:
                pass  # not cut where runs meet after all: parsed whole below
        try:
            with paused_gc():
                document = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
        del data
        with paused_gc():
            return _Validator(source, memo, known_runs).manifest(document, consume=True)

    @classmethod
    def from_gzip(
        cls,
        data: bytes,
        *,
        source: str = "manifest",
        max_decompressed: int = ManifestFormat.MAX_DECOMPRESSED_BYTES,
        max_entries: int | None = ManifestFormat.MAX_ENTRIES,
        memo: ValidationMemo | None = None,
        known_runs: Mapping[str, bytes] | None = None,
    ) -> SyncManifest:
        """Decompress and parse a ``.json.gz`` manifest, refusing it while it inflates when
        it passes ``max_decompressed`` bytes or ``max_entries`` runs and files: memory stays
        bounded whatever the stream holds (:func:`~.compression.decompress_capped`)."""
        if not known_runs:
            size, pieces = decompress_pieces(
                data, max_decompressed, source=source, max_entries=max_entries
            )
            if size <= PARSE_PIECE_BYTES:
                return cls._parse([b"".join(pieces)], source, None, memo, known_runs)
            # The text is parsed as it inflates, a few runs at a time, and never held whole.
            try:
                with paused_gc():
                    header, runs = _streamed_document(pieces)
                    return _Validator(source, memo).manifest(header, runs=runs)
            except _SplitFailed:
                pass  # not the shape this package writes: inflated again and parsed whole
            finally:
                del pieces
        # held by the list alone, so that parsing frees the text as soon as it is parsed
        text = [decompress_capped(data, max_decompressed, source=source, max_entries=max_entries)]
        return cls._parse(text, source, None, memo, known_runs)

    @classmethod
    def from_dict(cls, document: Any, *, source: str = "manifest") -> SyncManifest:
        with paused_gc():
            return _Validator(source).manifest(document)


def encode_experiments(experiments: Iterable[ExperimentEntry]) -> bytes:
    """The ``experiments`` array of a manifest's JSON, byte for byte as published."""
    return orjson.dumps([exp.to_dict() for exp in experiments])


_HEADER_FIELD = re.compile(
    rb'"(revision|snapshot_id|manifest_type|format_version)"[ \t\r\n]*:[ \t\r\n]*("[^"]*"|-?\d+)'
)
"""A header field, compact (ours) or with JSON whitespace (0.5.x generators indent theirs)."""


def read_header(prefix: bytes) -> dict[str, Any] | None:
    """Pull ``format_version, manifest_type, revision, snapshot_id`` out of the first bytes of
    a manifest's JSON, before the experiments list starts.

    This lets a client learn that nothing changed from one small read. ``None`` when the
    prefix does not hold all four before ``"experiments"`` (another generator's field order,
    or a prefix too short): the caller then reads the whole manifest.
    """
    end = prefix.find(b'"experiments"')
    if end < 0:
        return None
    found: dict[str, Any] = {}
    for match in _HEADER_FIELD.finditer(prefix, 0, end):
        key = match.group(1).decode()
        raw = match.group(2)
        found.setdefault(key, raw[1:-1].decode("utf-8", "replace") if raw[:1] == b'"' else int(raw))
    if len(found) != 4 or not isinstance(found["revision"], int):
        return None
    return found


def _is_safe_component(part: str) -> bool:
    """A project, experiment name or run id: one visible path component.

    Hidden names are refused too: the generator never lists them, and it keeps the cache's
    own state directory (a dot name) out of reach of any manifest path.
    """
    return bool(part) and not part.startswith(".") and "/" not in part and "\0" not in part


_BAD_REST_OF_PATH = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|\x00")
"""An empty, '.' or '..' component or a NUL in the part after the run prefix."""

_PLAIN_PATH_LENGTH = min(names.MAX_NAME_BYTES, names.MAX_PATH_BYTES)


def _refused_path(path: str) -> str | None:
    """Why the name rule refuses a listed path, or ``None``; a short printable ASCII path
    without a backslash or the client's temp prefix, and not too deep, is cleared without
    looking further (none of its names can be too long). (A drive letter on top was refused
    as absolute before.)"""
    if (
        len(path) <= _PLAIN_PATH_LENGTH
        and path.count("/") < names.MAX_DEPTH
        and path.isascii()
        and path.isprintable()
        and "\\" not in path
        and TEMP_PREFIX not in path
    ):
        return None
    return names.path_problem(path)


def _run_key(raw: Any) -> bytes | None:
    """A run's JSON as the memo's key; ``None`` for what is not an object (the validator
    then says what is wrong)."""
    if type(raw) is not dict:
        return None
    try:
        return orjson.dumps(raw)
    except TypeError:  # orjson.JSONEncodeError too: not what orjson.loads gives
        return None


def run_digest(run_json: bytes) -> bytes:
    """What a reader compares to know a run unchanged (``known_runs`` of
    :meth:`SyncManifest.from_json`): a 128-bit BLAKE2b of the run's JSON as ``orjson``
    writes it, which for a run this generator published is ``orjson.dumps(exp.to_dict())``."""
    return hashlib.blake2b(run_json, digest_size=16).digest()


def _leave_out(
    experiments: list[Any], known_runs: Mapping[str, bytes]
) -> dict[int, tuple[str, str, str, str, int, int]]:
    """The runs of ``experiments`` listed exactly as ``known_runs`` holds them, by index:
    ``(project, name, run_id, prefix, files, bytes)``. A run whose directory lies inside or
    around another listed run's is never left out (the paths they may both claim are
    checked on built runs only)."""
    candidates: dict[int, tuple[str, str, str, str, int, int]] = {}
    prefixes: set[str] = set()
    runs_path = False
    for index, raw in enumerate(experiments):
        if type(raw) is not dict:
            continue
        project, name, run_id = raw.get("project"), raw.get("name"), raw.get("run_id")
        if not (type(project) is str and type(name) is str and type(run_id) is str):
            continue
        prefix = run_prefix(project, name, run_id)
        prefixes.add(prefix)
        runs_path = runs_path or project == RUNS_DIRNAME
        digest = known_runs.get(prefix)
        if digest is None or run_digest(orjson.dumps(raw)) != digest:
            continue
        # the same JSON as a run validated before: its files are a list of valid objects
        files = raw["files"]
        candidates[index] = (
            project, name, run_id, prefix, len(files), sum(f["size"] for f in files)
        )
    if not candidates or not runs_path:
        # project-name run directories all lie at the same depth: none nests in another
        return candidates
    enclosing: set[str] = set()
    for prefix in prefixes:
        cut = prefix.find("/")
        while 0 <= cut < len(prefix) - 1:
            enclosing.add(prefix[: cut + 1])
            cut = prefix.find("/", cut + 1)
    return {
        index: found
        for index, found in candidates.items()
        if found[3] not in enclosing
        and not any(
            found[3][: cut + 1] in prefixes for cut in _slash_positions(found[3][:-1])
        )
    }


def _slash_positions(text: str) -> Iterator[int]:
    cut = text.find("/")
    while cut >= 0:
        yield cut
        cut = text.find("/", cut + 1)


def _well_formed_file(raw: Any, prefix: str, prefix_length: int) -> FileEntry | None:
    """The common case of :meth:`_Validator.file` in one tight function.

    Accepts only what the full validator accepts (exact JSON types, safe path under the
    run's prefix); returns ``None`` for anything else, and the caller then runs the full
    validator for its precise error message. Validating a million entries stays seconds,
    not minutes.
    """
    if type(raw) is not dict:
        return None
    path = raw.get("path")
    size = raw.get("size")
    mtime = raw.get("mtime")
    if (
        type(path) is not str
        or not path.startswith(prefix)
        or _BAD_REST_OF_PATH.search(path[prefix_length:])
        or path[1:2] == ":"
        or type(size) is not int
        or not 0 <= size <= ManifestFormat.MAX_SIZE
        or type(mtime) is not float
        or mtime - mtime != 0.0  # NaN and infinities
    ):
        return None
    priority = raw.get("priority", 4)
    append_only = raw.get("is_append_only", False)
    tail_hash = raw.get("tail_hash")
    if type(priority) is not int or not 1 <= priority <= 4 or type(append_only) is not bool:
        return None
    if tail_hash is not None and (
        type(tail_hash) is not str or len(tail_hash) != 32 or not _HEX.match(tail_hash)
    ):
        return None
    return FileEntry(path, size, mtime, priority, append_only, tail_hash)


@dataclass(slots=True, frozen=True)
class _CheckedRun:
    """What validating one run gave, kept as immutable values so every manifest that reuses
    it gets objects of its own."""

    fields: tuple[str, str, str, str, float, float]
    """``ExperimentEntry``'s fields before ``files``: run id, project, name, status, times."""
    files: tuple[tuple[str, int, float, int, bool, str | None], ...]
    tags: tuple[str, ...] | None
    path: str | None
    paths: tuple[str, ...]
    """Every listed file path (the kept and the skipped), for the duplicate check."""
    reason: str | None
    skipped: tuple[tuple[str, str, int], ...]
    """Files the name rule left out: path, reason, size."""


class ValidationMemo:
    """The runs of the last manifest decoded with this memo, keyed by their JSON.

    A client that keeps a server's active manifest fresh decodes it again at every change,
    and between two publications most runs are byte for byte the same. A run whose JSON
    (as ``orjson`` writes the parsed object: types, values and key order) equals one
    validated last time cannot validate differently: only what spans runs (a run or a file
    listed twice) is checked again. The memo holds the runs of the newest manifest decoded
    with it, so its size follows one manifest; one thread at a time may use it.
    """

    __slots__ = ("_runs",)

    def __init__(self) -> None:
        self._runs: dict[bytes, _CheckedRun] = {}

    def __len__(self) -> int:
        return len(self._runs)


PARSE_PIECE_BYTES = 4 * 1024 * 1024
"""A manifest's JSON larger than this is parsed a few megabytes of runs at a time, where it
can be cut between runs (:func:`_split_document`): the parsed document of a 100,000-run lab
is some 400 MB of dictionaries, and is then never held whole."""

_RUN_BOUNDARY = b'},{"run_id":'
"""Where one run's object ends and the next begins in the experiments array this package
writes (``run_id`` first)."""


class _SplitFailed(Exception):
    """A piece cut from the experiments array did not parse: parse the document whole."""


def _split_document(
    data: bytes | bytearray,
) -> tuple[dict[str, Any], list[tuple[int, int]]] | None:
    """The header of a compact manifest whose last key is ``experiments`` (as this package
    writes it), and the spans of its array's inside, each a run of whole runs of about
    :data:`PARSE_PIECE_BYTES`; ``None`` for any other shape (parsed whole).

    A cut can only be wrong inside a string or a nested value, and then a piece cannot
    parse (a string left open, a bracket left unclosed), which :func:`_runs` turns into
    :class:`_SplitFailed`: the pieces that parse are exactly the runs the whole would give.
    """
    key_at = data.find(EXPERIMENTS_KEY)
    start = key_at + len(EXPERIMENTS_KEY)
    if key_at < 0 or data[start : start + 1] != b"[" or not data.endswith(b"]}"):
        return None
    try:
        header = orjson.loads(bytes(data[:key_at]) + b"}")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(header, dict) or "experiments" in header:
        return None
    position, end = start + 1, len(data) - 2
    if end <= position:
        return None
    pieces: list[tuple[int, int]] = []
    while end - position > PARSE_PIECE_BYTES:
        cut = data.find(_RUN_BOUNDARY, position + PARSE_PIECE_BYTES, end)
        if cut < 0:
            break
        pieces.append((position, cut + 1))
        position = cut + 2
    pieces.append((position, end))
    return header, pieces


def _runs(data: bytes | bytearray, pieces: list[tuple[int, int]]) -> Iterator[Any]:
    """The runs of the experiments array, one parsed piece at a time."""
    view = memoryview(data)
    for start, end in pieces:
        try:
            parsed = orjson.loads(b"".join((b"[", view[start:end], b"]")))
        except orjson.JSONDecodeError:
            raise _SplitFailed from None
        if not isinstance(parsed, list):
            raise _SplitFailed
        yield from parsed


def _streamed_document(pieces: Iterator[bytes]) -> tuple[dict[str, Any], Iterator[Any]]:
    """:func:`_split_document` and :func:`_runs` over text that arrives in pieces: the
    header, and the runs of the experiments array parsed about :data:`PARSE_PIECE_BYTES` at
    a time as the text comes, so that only a few pieces of it are ever held.

    Raises :class:`_SplitFailed` (now or while the runs are read) where the text is not
    the shape :func:`_split_document` accepts, or a cut does not parse.
    """
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        key_at = buffer.find(EXPERIMENTS_KEY)
        if key_at >= 0 and len(buffer) > key_at + len(EXPERIMENTS_KEY):
            break
    else:
        raise _SplitFailed
    start = key_at + len(EXPERIMENTS_KEY)
    if buffer[start : start + 1] != b"[":
        raise _SplitFailed
    try:
        header = orjson.loads(bytes(buffer[:key_at]) + b"}")
    except orjson.JSONDecodeError:
        raise _SplitFailed from None
    if not isinstance(header, dict) or "experiments" in header:
        raise _SplitFailed
    del buffer[: start + 1]
    return header, _streamed_runs(buffer, pieces)


def _streamed_runs(buffer: bytearray, pieces: Iterator[bytes]) -> Iterator[Any]:
    """The runs of an experiments array whose inside starts ``buffer`` and continues in
    ``pieces``, up to the document's closing ``]}``."""
    searched = PARSE_PIECE_BYTES  # no boundary before this offset of ``buffer`` is wanted
    for piece in pieces:
        buffer += piece
        del piece  # not held while the runs it completes are read
        while len(buffer) > searched:
            cut = buffer.find(_RUN_BOUNDARY, searched)
            if cut < 0:  # a run longer than a piece: search on from here next time
                searched = max(searched, len(buffer) - len(_RUN_BOUNDARY) + 1)
                break
            runs = _parsed_runs(buffer, cut + 1)
            del buffer[: cut + 2]
            searched = PARSE_PIECE_BYTES
            yield from runs
            del runs
    if not buffer.endswith(b"]}") or len(buffer) <= 2:
        raise _SplitFailed
    yield from _parsed_runs(buffer, len(buffer) - 2)


def _parsed_runs(buffer: bytearray, end: int) -> list[Any]:
    """The runs of one cut of the experiments array: its inside, ``buffer[:end]``."""
    try:
        with memoryview(buffer) as view:  # released before the buffer is cut
            text = b"".join((b"[", view[:end], b"]"))
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _SplitFailed from None
    if not isinstance(parsed, list):
        raise _SplitFailed
    return parsed


class _Validator:
    """Walks a decoded JSON document and builds the model, failing on the first problem.

    A run or file whose path the name rule refuses (:mod:`runicorn.format.names`) is not a
    problem of the document: it is left out, recorded in :attr:`SyncManifest.skipped`, and
    the rest of the manifest is used."""

    def __init__(
        self,
        source: str,
        memo: ValidationMemo | None = None,
        known_runs: Mapping[str, bytes] | None = None,
    ) -> None:
        self.source = source
        self.memo = memo
        self.known_runs = known_runs
        self.left_out = [0, 0, 0]
        """Runs, files and bytes left out as unchanged (``known_runs``)."""
        self.checked: dict[bytes, _CheckedRun] = {}
        """The runs validated this time, by their JSON: the memo's next contents."""
        self.skipped: list[tuple[str, str]] = []
        self.skipped_runs = 0
        self.skipped_files = 0
        self.skipped_bytes = 0

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.source}: {where}: {message}")

    def require(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing required field {key!r}")
        return obj[key]

    def string(self, value: Any, where: str, *, nonempty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {type(value).__name__}")
        if nonempty and not value:
            raise self.fail(where, "must not be empty")
        return value

    def integer(
        self, value: Any, where: str, *, low: int = 0, high: int = ManifestFormat.MAX_SIZE
    ) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise self.fail(where, f"{value} is outside the allowed range {low}..{high}")
        return value

    def number(self, value: Any, where: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(where, f"expected a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(where, f"expected a finite number, got {value!r}")
        return number

    def component(self, value: Any, where: str) -> str:
        text = self.string(value, where, nonempty=True)
        if not _is_safe_component(text):
            raise self.fail(where, f"{text!r} is not a safe path component")
        return text

    def snapshot_list(self, value: Any, where: str) -> list[str] | None:
        """An optional list of snapshot ids (``changes_since``)."""
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.fail(where, "expected a list of snapshot ids (non-empty strings)")
        if len(value) > MAX_CHANGES_SINCE:
            raise self.fail(where, f"{len(value)} snapshot ids; at most {MAX_CHANGES_SINCE}")
        return value

    def run_path(self, value: Any, where: str) -> str:
        """A runs-path run's ``path``: ``""`` or visible components joined by ``/``."""
        if value is None:
            raise self.fail(
                where,
                f"project {RUNS_DIRNAME!r} is the runs-path layout (runs/<path>/<run_id>/) and "
                "needs the field 'path' (a manifest of an older generator listing a project "
                "named 'runs'? regenerate it with this version)",
            )
        text = self.string(value, f"{where}.path")
        if text and not all(_is_safe_component(part) for part in text.split("/")):
            raise self.fail(f"{where}.path", f"{text!r} is not a safe relative path")
        return text

    def manifest(
        self, doc: Any, *, consume: bool = False, runs: Iterable[Any] | None = None
    ) -> SyncManifest:
        """The manifest ``doc`` describes; ``consume``: drop each run's JSON from ``doc``'s
        ``experiments`` once it is validated (a document only the caller holds); ``runs``:
        the experiments, parsed piece by piece, for a ``doc`` that is only the header
        (never with ``known_runs``, which looks at every run first)."""
        if not isinstance(doc, dict):
            raise self.fail("top level", f"expected an object, got {type(doc).__name__}")
        version = self.string(self.require(doc, "format_version", "header"), "format_version")
        if version.split(".")[0] != ManifestFormat.SUPPORTED_MAJOR:
            raise self.fail(
                "format_version", f"unsupported version {version!r} (this reader knows 1.x)"
            )
        raw_type = self.require(doc, "manifest_type", "header")
        try:
            manifest_type = ManifestType(raw_type)
        except ValueError:
            raise self.fail(
                "manifest_type", f"expected 'full' or 'active', got {raw_type!r}"
            ) from None
        algorithm = doc.get("tail_hash_algorithm")
        if algorithm is not None and algorithm not in (
            ManifestFormat.TAIL_HASH_ALGORITHM,
            ManifestFormat.LEGACY_TAIL_HASH_ALGORITHM,
        ):
            raise self.fail("tail_hash_algorithm", f"unsupported algorithm {algorithm!r}")
        window = doc.get("tail_hash_window")
        if window is not None and window != ManifestFormat.TAIL_HASH_WINDOW:
            raise self.fail("tail_hash_window", f"unsupported window {window!r}")
        manifest = SyncManifest(
            manifest_type=manifest_type,
            revision=self.integer(self.require(doc, "revision", "header"), "revision"),
            snapshot_id=self.string(self.require(doc, "snapshot_id", "header"), "snapshot_id"),
            generated_at=self.number(self.require(doc, "generated_at", "header"), "generated_at"),
            server_hostname=self.string(
                self.require(doc, "server_hostname", "header"), "server_hostname"
            ),
            remote_root=self.string(self.require(doc, "remote_root", "header"), "remote_root"),
            format_version=version,
            generator_version=self.string(doc.get("generator_version", ""), "generator_version"),
            tail_hash_algorithm=algorithm,
            tail_hash_window=window,
            changes_since=self.snapshot_list(doc.get("changes_since"), "changes_since"),
        )
        experiments: list[Any] | None = None
        if runs is None:
            experiments = self.require(doc, "experiments", "header")
            if not isinstance(experiments, list):
                raise self.fail(
                    "experiments", f"expected a list, got {type(experiments).__name__}"
                )
            runs = experiments
        manifest.problems = self.problems(doc.get("problems"))
        seen_runs: set[tuple[str, str, str]] = set()
        seen_paths: set[str] = set()
        known = self.memo._runs if self.memo is not None else None
        unchanged = (
            _leave_out(experiments, self.known_runs)
            if self.known_runs and experiments is not None
            else {}
        )
        for index, raw in enumerate(runs):
            if consume and experiments is not None:
                experiments[index] = None
            same = unchanged.get(index)
            if same is not None:
                project, name, run_id, prefix, files, size = same
                if (project, name, run_id) in seen_runs:
                    raise self.fail(f"experiments[{index}]", f"run {prefix!r} is listed twice")
                seen_runs.add((project, name, run_id))
                manifest.unchanged.append(prefix)
                self.left_out[0] += 1
                self.left_out[1] += files
                self.left_out[2] += size
                continue
            json_key = _run_key(raw) if known is not None else None
            hit = known.get(json_key) if json_key is not None and known is not None else None
            if json_key is not None and hit is not None and seen_paths.isdisjoint(hit.paths):
                exp, reason = self.reuse(hit, seen_paths)
                self.checked[json_key] = hit
            else:
                exp, reason = self.experiment(raw, f"experiments[{index}]", seen_paths, json_key)
            key = (exp.project, exp.name, exp.run_id)
            if key in seen_runs:
                raise self.fail(f"experiments[{index}]", f"run {exp.prefix!r} is listed twice")
            seen_runs.add(key)
            if reason is None:
                manifest.experiments.append(exp)
            else:
                self.skip(exp.prefix[:-1], reason, exp.files, run=True)
        manifest.skipped = self.skipped
        stats = doc.get("statistics")
        if stats is not None:
            self.check_statistics(stats, manifest)
        if self.memo is not None:
            self.memo._runs = self.checked
        return manifest

    def reuse(self, hit: _CheckedRun, seen_paths: set[str]) -> tuple[ExperimentEntry, str | None]:
        """A run validated before, rebuilt, its file skips recorded again."""
        seen_paths.update(hit.paths)
        for path, reason, size in hit.skipped:
            self.skipped.append((path, reason))
            self.skipped_files += 1
            self.skipped_bytes += size
        run_id, project, name, status, created_at, updated_at = hit.fields
        exp = ExperimentEntry(
            run_id,
            project,
            name,
            status,
            created_at,
            updated_at,
            list(starmap(FileEntry, hit.files)),
            None if hit.tags is None else list(hit.tags),
            hit.path,
        )
        return exp, hit.reason

    def problems(self, raw: Any) -> list[tuple[str, str]] | None:
        """The optional ``problems`` list: objects with a string ``path`` and ``reason``."""
        if raw is None:
            return None
        if not isinstance(raw, list):
            raise self.fail("problems", f"expected a list, got {type(raw).__name__}")
        problems: list[tuple[str, str]] = []
        for index, item in enumerate(raw):
            where = f"problems[{index}]"
            if not isinstance(item, dict):
                raise self.fail(where, f"expected an object, got {type(item).__name__}")
            problems.append(
                (
                    self.string(self.require(item, "path", where), f"{where}.path"),
                    self.string(self.require(item, "reason", where), f"{where}.reason"),
                )
            )
        return problems

    def skip(self, path: str, reason: str, files: list[FileEntry], *, run: bool) -> None:
        """Leave a run (with its files) or one file out, counted for the statistics check."""
        self.skipped.append((path, reason))
        self.skipped_runs += run
        self.skipped_files += len(files)
        self.skipped_bytes += sum(entry.size for entry in files)

    def experiment(
        self, raw: Any, where: str, seen_paths: set[str], key: bytes | None = None
    ) -> tuple[ExperimentEntry, str | None]:
        """The run, and why the name rule refuses its directory (``None`` when it does not:
        then each file is checked on its own)."""
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected an object, got {type(raw).__name__}")
        project = self.component(self.require(raw, "project", where), f"{where}.project")
        raw_path = raw.get("path")
        if project == RUNS_DIRNAME or raw_path is not None:
            path = self.run_path(raw_path, where)
            name = self.string(self.require(raw, "name", where), f"{where}.name")
            if project != RUNS_DIRNAME or name != path:
                raise self.fail(
                    where,
                    f"a runs-path run has project {RUNS_DIRNAME!r} and name equal to its path; "
                    f"got project {project!r}, name {name!r}, path {path!r}",
                )
        else:
            path = None
            name = self.component(self.require(raw, "name", where), f"{where}.name")
        exp = ExperimentEntry(
            run_id=self.component(self.require(raw, "run_id", where), f"{where}.run_id"),
            project=project,
            name=name,
            status=self.string(self.require(raw, "status", where), f"{where}.status"),
            created_at=self.number(self.require(raw, "created_at", where), f"{where}.created_at"),
            updated_at=self.number(self.require(raw, "updated_at", where), f"{where}.updated_at"),
            path=path,
        )
        where = f"{where} (run {exp.prefix.rstrip('/')})"
        tags = raw.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise self.fail(f"{where}.tags", "expected a list of strings")
            exp.tags = tags
        files = self.require(raw, "files", where)
        if not isinstance(files, list):
            raise self.fail(f"{where}.files", f"expected a list, got {type(files).__name__}")
        prefix = exp.prefix
        prefix_length = len(prefix)
        append = exp.files.append
        run_reason = _refused_path(prefix[:-1])
        paths: list[str] = []
        dropped: list[tuple[str, str, int]] = []
        for index, raw_file in enumerate(files):
            entry = _well_formed_file(raw_file, prefix, prefix_length)
            if entry is None:  # the slow path says precisely what is wrong
                entry = self.file(raw_file, f"{where}.files[{index}]", prefix)
            if entry.path in seen_paths:
                raise self.fail(f"{where}.files[{index}].path", f"{entry.path!r} is listed twice")
            seen_paths.add(entry.path)
            paths.append(entry.path)
            reason = None if run_reason is not None else _refused_path(entry.path)
            if reason is None:
                append(entry)
            else:
                self.skip(entry.path, reason, [entry], run=False)
                dropped.append((entry.path, reason, entry.size))
        if key is not None:
            self.checked[key] = _CheckedRun(
                fields=(
                    exp.run_id,
                    exp.project,
                    exp.name,
                    exp.status,
                    exp.created_at,
                    exp.updated_at,
                ),
                files=tuple(
                    (e.path, e.size, e.mtime, e.priority, e.is_append_only, e.tail_hash)
                    for e in exp.files
                ),
                tags=None if exp.tags is None else tuple(exp.tags),
                path=exp.path,
                paths=tuple(paths),
                reason=run_reason,
                skipped=tuple(dropped),
            )
        return exp, run_reason

    def file(self, raw: Any, where: str, prefix: str) -> FileEntry:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected an object, got {type(raw).__name__}")
        path = self.string(self.require(raw, "path", where), f"{where}.path", nonempty=True)
        check_relative_path(path, prefix, lambda message: self.fail(f"{where}.path", message))
        tail_hash = raw.get("tail_hash")
        if tail_hash is not None:
            tail_hash = self.string(tail_hash, f"{where}.tail_hash")
            if len(tail_hash) != 2 * 16 or not _HEX.match(tail_hash):
                raise self.fail(f"{where}.tail_hash", "expected 32 lowercase hex characters")
        append_only = raw.get("is_append_only", False)
        if not isinstance(append_only, bool):
            raise self.fail(f"{where}.is_append_only", "expected true or false")
        return FileEntry(
            path=path,
            size=self.integer(self.require(raw, "size", where), f"{where}.size"),
            mtime=self.number(self.require(raw, "mtime", where), f"{where}.mtime"),
            priority=self.integer(raw.get("priority", 4), f"{where}.priority", low=1, high=4),
            is_append_only=append_only,
            tail_hash=tail_hash,
        )

    def check_statistics(self, stats: Any, manifest: SyncManifest) -> None:
        if not isinstance(stats, dict):
            raise self.fail("statistics", f"expected an object, got {type(stats).__name__}")
        skipped = {
            "total_experiments": self.skipped_runs + self.left_out[0],
            "total_files": self.skipped_files + self.left_out[1],
            "total_bytes": self.skipped_bytes + self.left_out[2],
        }
        for key, listed in manifest.statistics.items():
            actual = listed + skipped[key]
            if key in stats and stats[key] != actual:
                raise self.fail(
                    f"statistics.{key}",
                    f"says {stats[key]!r} but the manifest lists {actual} "
                    "(truncated or edited manifest)",
                )


def check_relative_path(path: str, prefix: str, fail: Callable[[str], Exception]) -> None:
    """Enforce spec section 3.9 on one path; ``fail(message)`` builds the exception."""
    if "\0" in path:
        raise fail(f"{path!r} contains a NUL")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise fail(f"{path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise fail(f"{path!r} has an empty, '.' or '..' component")
    if not path.startswith(prefix) or len(path) == len(prefix):
        raise fail(f"{path!r} does not lie under its run directory {prefix!r}")

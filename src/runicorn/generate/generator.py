"""ManifestGenerator: scan an experiments root and publish one manifest of every run's files.

One generation is: take the output's lock, scan (one stat per file, through the active
backend), derive each run's status and times, tail-hash the append-only logs that changed,
and publish ``<type>_manifest.json`` and ``.json.gz`` atomically -- but only when the content
differs from the previous manifest of that type, in which case the revision goes up by one.
A generation that fails or is interrupted leaves the previous manifest in place.

The runs come by one of two paths: a scan of the whole root (a one-shot generation), or the
publisher's live tree (:meth:`ManifestGenerator.keep_tree`), which rescans only what changed
and holds every run encoded. Both end in one publish tail
(:meth:`ManifestGenerator._publish_tail`: journal, selection, encoding, revision,
publication, state); each path hands it its runs through the same small interface
(:class:`_BuiltRuns`), so the two publish the same bytes for the same tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from blake3 import blake3

from runicorn._sys.atomic import (
    Document,
    LinkRefusedError,
    exclusive_lock,
    pieces_of,
    temp_prefix_for,
    write_atomically,
)
from runicorn._sys.gcpause import paused_gc
from runicorn.core.backend import Backend, active_backend
from runicorn.core.memo import FileMemo, StatKey
from runicorn.core.scan import POLICY_REASONS, FileStat, Problem, RunScan, ScanResult
from runicorn.format import layout, names
from runicorn.format.compression import compress
from runicorn.format.delta import delta_filename, write_delta
from runicorn.format.models import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
    read_header,
)
from runicorn.format.published import PublishedManifest
from runicorn.generate.journal import (
    ChangeJournal,
    FullRecord,
    Observation,
    RunSignature,
    RunsSource,
    Signature,
    signature,
    signatures_of,
)
from runicorn.generate.state import GeneratorState, RunMemo
from runicorn.generate.tree import (
    EncodedRuns,
    LiveTree,
    Refresh,
    RunKey,
    RunState,
    pack_memos,
)

if TYPE_CHECKING:
    from runicorn.core.entries import Entries, RunFiles

logger = logging.getLogger(__name__)

# getattr: the demo runs the generator on a client, and Windows has neither flag.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

MAX_LOGGED_PROBLEMS = 50
"""Problems beyond this many are counted in the summary, not logged one by one."""

HEADER_PROBE_BYTES = 4096

LEGACY_STATE_FILENAME = ".manifest_state.json"
"""The revision counter a 0.5.x generator keeps beside its manifests (``last_revision``,
one for both types) and reads instead of the published manifest. We count it among the
revisions found on disk and raise it to each revision we publish, so neither generator makes
the revision go back on a root both publish to."""

LEGACY_STATE_MARK = ("raised_by", "runicorn")
"""Written into the 0.5.x counter with our raise. The 0.5.x generator rewrites the whole file,
so the mark says whether the value is still ours: ours is not counted again (it would tie the
full and active revisions together), theirs is."""

MAX_LEGACY_STATE_BYTES = 65536

RUN_METADATA = ("meta.json", "status.json")
"""The run files a generation parses (status, creation time)."""

FINGERPRINT_RUNS_PER_UPDATE = 512
"""The scan fingerprint hashes the records of this many runs at a time: a 100,000-run lab's
records are 75 MB of JSON, which would otherwise be built whole only to be hashed."""

MEMO_SAVE_SECONDS = 300.0
"""With a live tree (:meth:`ManifestGenerator.keep_tree`), how often the memo file is
rewritten: it only spares a restarted generator rehashing, and at 100,000 runs it is tens of
megabytes of JSON, too much to write with every publication."""

REBUILD_CHUNK_RUNS = 1000
"""A generation from the live tree rebuilds changed runs this many at a time."""

REASON_VANISHED_WHILE_READ = "vanished or shrank while it was read"
"""An append-only file left out of a manifest because its tail could not be hashed."""

REUSE_MARGIN_NS = 2_000_000_000
"""A file is reused only if its mtime is this much older than the previous scan's start.

File systems stamp mtimes from a coarser clock than ``time.time_ns()`` (Linux: the tick;
NFS: the server's clock), so "older than the scan" needs slack to mean it.
"""


@dataclass
class _ActiveSelection:
    """The runs the last active manifest from the tree listed, and what it was weighed
    against; ``rebuilt`` gathers the runs rebuilt since, by any generation."""

    listed: set[RunKey]
    rebuilt: set[RunKey]
    unlisted: set[str]
    changed: set[str]


_ListedRun = tuple[bytes, list[str] | None, RunState]
"""A run an active manifest from the tree lists: its encoded entry, its tags, its state."""
_UNKNOWN_SIGNATURE: Signature = (-1, 0, 2**62)
"""For a run whose records this process has not seen: counts as changed."""


@dataclass
class _Target:
    """One generation's destination: the manifest type it makes, where it publishes it,
    the state file beside it, the state the last generation there left, and the report
    this one fills in. Both generation paths and their shared tail work towards it."""

    manifest_type: ManifestType
    output: Path
    state_path: Path
    previous: GeneratorState
    report: GenerationReport


class _BuiltRuns(Protocol):
    """The runs a generation path built, as :meth:`ManifestGenerator._publish_tail` takes
    them. The scan path holds an entry object per run, the live tree each run encoded; so
    each path says how its runs are told to the change journal, selected and encoded, and
    what follows a publication, while the tail around them is one."""

    now: float
    """The generation's clock: the manifest's time and the end of the active window."""
    next_state: GeneratorState
    """What this generation saves for the next one (its memos among it)."""

    def observe(self, journal: ChangeJournal) -> Observation | None:
        """Tell ``journal`` the runs as they are now (:func:`_observe`)."""
        ...

    def encode(self, manifest_type: ManifestType, changed: set[str]) -> tuple[SyncManifest, bytes]:
        """The manifest of ``manifest_type`` (no revision yet) and its experiments as they
        are published; ``changed``: the runs (prefixes) the journal says an active manifest
        must list whatever their age."""
        ...

    def published(self, manifest: SyncManifest, output: Path) -> None:
        """What follows the publication of ``manifest`` at ``output``, before the state is
        saved."""
        ...


@dataclass
class _ScannedRuns:
    """The scan path's runs: an entry object per listed run, every one built just now."""

    generator: ManifestGenerator
    scanned: list[RunScan]
    """The scan's records, whose signatures the change journal compares."""
    experiments: list[ExperimentEntry]
    tags: dict[str, list[str]]
    now: float
    next_state: GeneratorState

    def observe(self, journal: ChangeJournal) -> Observation | None:
        """Every run, with the signature of its records in this scan."""
        return _observe(
            journal, signatures_of(self.scanned), self.tags, self.next_state.scan_started_ns
        )

    def encode(self, manifest_type: ManifestType, changed: set[str]) -> tuple[SyncManifest, bytes]:
        """The entries this type lists (:meth:`ManifestGenerator._select_for_type`), encoded
        by the backend."""
        generator = self.generator
        experiments = generator._select_for_type(manifest_type, self.experiments, self.now, changed)
        self.experiments = experiments  # the rest go now: at 100,000 runs, most of the memory
        self.next_state.append_only_files = _count_append_only(experiments)
        return generator._encode(manifest_type, experiments, self.now)

    def published(self, manifest: SyncManifest, output: Path) -> None:
        """Nothing: a delta is built on the previous active publication's runs, which only a
        generator keeping its tree remembers."""


@dataclass
class _TreeRuns:
    """The live tree's runs: every run held encoded, few of them rebuilt just now."""

    generator: ManifestGenerator
    kept: list[tuple[RunKey, RunState]]
    """Every run of the tree, in manifest order."""
    runs: dict[RunKey, RunState]
    rebuilt: list[RunKey]
    """The runs this generation rebuilt: the only ones the journal need compare."""
    unlisted: set[str]
    """The directories the scan could not list: runs below them are left out."""
    tags: dict[str, list[str]]
    signatures: dict[RunKey, Signature]
    scan_started_ns: int
    now: float
    next_state: GeneratorState
    listed: dict[RunKey, _ListedRun] = field(default_factory=dict)
    """The runs an active manifest lists, filled by :meth:`encode` for its delta."""

    def observe(self, journal: ChangeJournal) -> Observation | None:
        """Only the rebuilt runs are reported for comparison, unless they are most of the
        tree (a walk), when the journal compares them all anyway."""
        runs = self.runs
        reported = None
        if 2 * len(self.rebuilt) <= len(runs):
            reported = list(self._signed(key for key in self.rebuilt if key in runs))
        return _observe(
            journal,
            lambda: self._signed(runs),
            self.tags,
            self.scan_started_ns,
            reported=reported,
            run_count=len(runs),
        )

    def _signed(self, keys: Iterable[RunKey]) -> Iterator[RunSignature]:
        """``keys`` as the journal takes them, each with the signature of the scan that last
        rebuilt it (a run this process has not seen counts as changed)."""
        signatures = self.signatures
        for key in keys:
            yield layout.run_prefix(*key), key[2], signatures.get(key, _UNKNOWN_SIGNATURE)

    def encode(self, manifest_type: ManifestType, changed: set[str]) -> tuple[SyncManifest, bytes]:
        """An active manifest weighs only the runs that may have entered or left it since
        the last one (:meth:`ManifestGenerator._active_candidates`), and remembers what it
        listed for the next one's candidates and delta."""
        if manifest_type is not ManifestType.ACTIVE:
            return self._assemble(manifest_type, self.kept, changed, None)
        generator = self.generator
        candidates = generator._active_candidates(self.kept, self.unlisted, changed)
        assembled = self._assemble(manifest_type, candidates, changed, self.listed)
        generator._active_selection = _ActiveSelection(
            set(self.listed), set(), self.unlisted, changed
        )
        return assembled

    def _assemble(
        self,
        manifest_type: ManifestType,
        candidates: list[tuple[RunKey, RunState]],
        changed: set[str],
        listed: dict[RunKey, _ListedRun] | None,
    ) -> tuple[SyncManifest, bytes]:
        """What :meth:`ManifestGenerator._select_for_type` and
        :meth:`~ManifestGenerator._encode` make of entry objects, made of the encoded runs
        without decoding one: the manifest and its experiments as published. ``listed``
        receives each run listed."""
        generator = self.generator
        active = manifest_type is ManifestType.ACTIVE
        horizon = self.now - generator.active_window_seconds
        unlisted = self.unlisted
        tags = self.tags
        array = EncodedRuns()
        for key, state in candidates:
            encoded = state.encoded
            if encoded is None or (unlisted and layout.run_prefix(*key)[:-1] in unlisted):
                continue
            if (
                active
                and state.status != "running"
                and state.updated_at < horizon
                and not (changed and layout.run_prefix(*key) in changed)
            ):
                continue
            run_tags = tags.get(key[2])
            array.add(encoded, run_tags, state)
            if listed is not None:
                listed[key] = (encoded, run_tags, state)
        self.next_state.append_only_files = array.append_only
        return array.manifest(
            manifest_type, self.now, generator.hostname, str(generator.remote_root)
        )

    def published(self, manifest: SyncManifest, output: Path) -> None:
        """An active publication gets its delta at once, before the state is saved: a pushed
        client is waiting for it."""
        if manifest.manifest_type is ManifestType.ACTIVE:
            self.generator._publish_delta(manifest, self.listed, output)


class ManifestGenerationError(OSError):
    """The manifest could not be generated; the previous one, if any, is still in place."""


@dataclass
class GenerationReport:
    """What one ``generate()`` call did, for the CLI summary and for monitoring."""

    manifest_type: ManifestType
    output_path: Path
    compressed_path: Path
    published: bool = False
    """False when the content was unchanged and the previous files were left as they were."""
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    runs_scanned: int = 0
    runs_rescanned: int = 0
    """Runs whose directories this generation scanned: all of them, except from a live tree
    (:meth:`ManifestGenerator.keep_tree`), which rescans only what changed."""
    files_hashed: int = 0
    files_reused: int = 0
    files_vanished: int = 0
    duration: float = 0.0
    run_layout: str = layout.LAYOUT_NONE
    """Which run layouts the root holds (:func:`runicorn.format.layout.layout_name`)."""


def _stat_key(record: tuple[str, int, int, int, int]) -> StatKey:
    """``(size, mtime_ns, ctime_ns, inode)`` of a scan record (a slice: no Python loop)."""
    return record[1:]


class ManifestGenerator:
    """Generates full and active manifests of one experiments root.

    ``backend``, ``clock``, ``uuid_factory`` and ``hostname`` are injectable so tests get
    byte-identical manifests; ``scan_threads`` scans projects concurrently (useful on
    network file systems where every stat is a round trip); ``None`` lets the backend
    choose (:meth:`Backend.default_scan_threads`). The manifest is the same either way.
    """

    def __init__(
        self,
        remote_root: Path,
        output_dir: Path | None = None,
        active_window_seconds: int = 3600,
        incremental: bool = True,
        *,
        backend: Backend | None = None,
        scan_threads: int | None = None,
        clock: Callable[[], float] = time.time,
        uuid_factory: Callable[[], str] = lambda: str(uuid.uuid4()),
        hostname: str | None = None,
    ) -> None:
        if active_window_seconds < 0:
            raise ValueError(f"active_window_seconds must be >= 0, got {active_window_seconds}")
        self.remote_root = Path(os.path.abspath(remote_root))
        self._root_str = str(self.remote_root)
        self.output_dir = (
            Path(output_dir) if output_dir else self.remote_root / layout.MANIFEST_DIRNAME
        )
        self.active_window_seconds = active_window_seconds
        self.incremental = incremental
        self.backend = backend or active_backend()
        if scan_threads is not None and scan_threads < 1:
            raise ValueError(f"scan_threads must be at least 1, got {scan_threads}")
        self.scan_threads = scan_threads or self.backend.default_scan_threads()
        self.clock = clock
        self.uuid_factory = uuid_factory
        self.hostname = hostname or socket.gethostname()
        self.last_report: GenerationReport | None = None
        self.tree: LiveTree | None = None
        self._active_selection: _ActiveSelection | None = None
        """What the last active manifest from the tree weighed (:meth:`_active_candidates`)."""
        self._tags_read: tuple[bytes, dict[str, list[str]]] | None = None
        """The tags file's content when last read, and the tags it held."""
        self._active_published: tuple[int, str, dict[RunKey, _ListedRun]] | None = None
        """The active manifest this generator published last (revision, snapshot, the runs
        it listed), the base of the next one's delta."""
        self._tree_signatures: dict[RunKey, Signature] = {}
        """Per run of the live tree, its signature for the change journal, kept from the
        scan that last rebuilt it (the tree keeps no records)."""

    # -- public API ---------------------------------------------------------------------

    def generate(
        self,
        manifest_type: ManifestType = ManifestType.FULL,
        output_path: Path | None = None,
    ) -> tuple[SyncManifest, Path]:
        """Generate (and publish when changed) a manifest; returns it and its JSON path.

        Raises :class:`ManifestGenerationError` when the root cannot be read or the
        manifest cannot be written; the previously published manifest stays in place.
        """
        started = time.monotonic()
        manifest_type = ManifestType(manifest_type)
        output = Path(output_path) if output_path else self.output_dir / manifest_type.filename
        output = Path(os.path.abspath(output))
        report = GenerationReport(
            manifest_type=manifest_type,
            output_path=output,
            compressed_path=output.with_name(output.name + ManifestFormat.GZIP_SUFFIX),
        )
        self.last_report = report
        self._check_root_and_output_dir(output)
        state_path = output.with_name(f".{output.name}.state")
        try:
            with self._acquire_lock(output):
                manifest = self._generate_locked(manifest_type, output, state_path, report)
        except ManifestGenerationError:
            raise
        except OSError as error:
            raise ManifestGenerationError(f"manifest generation failed: {error}") from error
        report.duration = time.monotonic() - started
        return manifest, output

    def keep_tree(self) -> LiveTree:
        """Keep the tree in memory from now on, for a caller that reports what changes.

        Generations then rescan only what was reported to the returned tree
        (:meth:`LiveTree.changed`), or walk it all when told (:meth:`LiveTree.rescan`), and
        rebuild only the runs whose scan records changed. What they publish is what a
        generation from scratch would publish for the same tree; only the scan fingerprint
        of the full manifest's fast path is not kept (a one-shot run beside it then builds
        the manifest, finds it unchanged and publishes nothing). Not with
        ``incremental=False``, which asks for everything to be recomputed.
        """
        if not self.incremental:
            raise ValueError("a live tree reuses what it built: not with incremental=False")
        if self.tree is None:
            self.tree = LiveTree(self._root_str, REUSE_MARGIN_NS)
        return self.tree

    # -- one generation, stage by stage ---------------------------------------------------

    def _check_root_and_output_dir(self, output: Path) -> None:
        """Fail early, with a message a user can act on, when there is nothing to scan or
        nowhere to publish; creates the output directory."""
        if not self.remote_root.is_dir():
            raise ManifestGenerationError(
                f"experiments root {self.remote_root} is not a readable directory; "
                "pass the directory that holds your projects with --root"
            )
        if output.parent.is_symlink():
            raise ManifestGenerationError(
                f"the manifest directory {output.parent} is a symbolic link; refusing to "
                "publish through it (whoever can change the link could point the manifests, "
                "their state and lock anywhere): replace it with a directory, or pass the "
                "real directory with --output"
            )
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ManifestGenerationError(
                f"cannot create the manifest directory {output.parent}: {error.strerror}"
            ) from error

    @staticmethod
    @contextlib.contextmanager
    def _acquire_lock(output: Path) -> Iterator[None]:
        """Hold the output's lock, so generators racing for one manifest take turns and a
        revision is never published twice. The cyclic GC is paused meanwhile: a generation
        builds up to millions of entries that hold no cycles (see :mod:`runicorn._sys.gcpause`)."""
        lock = output.with_name(f".{output.name}{layout.LOCK_SUFFIX}")
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive_lock(lock))
            except LinkRefusedError as error:
                raise ManifestGenerationError(
                    f"{error.filename}: {error.strerror}; nothing was published"
                ) from error
            held.enter_context(paused_gc())
            yield

    def _generate_locked(
        self,
        manifest_type: ManifestType,
        output: Path,
        state_path: Path,
        report: GenerationReport,
    ) -> SyncManifest:
        """The stages of one generation, run under the output's lock. Until :meth:`_publish`
        nothing published changes, so a failure or an interrupt leaves the previous manifest."""
        _remove_leftover_temp_files(
            output, report.compressed_path, state_path, GeneratorState.memo_path_for(state_path)
        )
        legacy_state = output.parent / LEGACY_STATE_FILENAME
        with _legacy_state_lock(legacy_state):  # shared by the full and active generations
            _remove_leftover_temp_files(legacy_state)
        previous = self._load_previous_state(state_path, report)
        target = _Target(manifest_type, output, state_path, previous, report)
        if self.tree is not None:
            return self._generate_from_tree(self.tree, target)
        return self._generate_from_scan(target)

    def _generate_from_scan(self, target: _Target) -> SyncManifest:
        """A generation from a scan of the whole tree (cron, or a publisher without a live
        tree): the published manifest as it is when the scan proves nothing changed, else
        every run built again, reusing what the memos vouch for, then :meth:`_publish_tail`."""
        previous, report = target.previous, target.report
        scan_started_ns, scan = self._scan(previous, report)
        now = self.clock()
        tags = self._read_tags(report)
        fingerprint = self._scan_fingerprint(target.manifest_type, scan, tags)
        unchanged_manifest = self._reuse_unchanged_manifest(fingerprint, scan, target)
        if unchanged_manifest is not None:
            return unchanged_manifest
        next_state = GeneratorState(scan_started_ns=scan_started_ns, scan_fingerprint=fingerprint)
        experiments = self._build_experiments(scan, tags, previous, next_state, report)
        built = _ScannedRuns(self, scan.runs, experiments, tags, now, next_state)
        del experiments  # built alone holds them, and lets go what an active manifest leaves out
        return self._publish_tail(built, target)

    def _build_experiments(
        self,
        scan: ScanResult,
        tags: dict[str, list[str]],
        previous: GeneratorState,
        next_state: GeneratorState,
        report: GenerationReport,
    ) -> list[ExperimentEntry]:
        """Every listed run's experiment entry, built from the scan: its files, status and
        times, with the tails no memo vouches for hashed now."""
        memo = self._reuse_memos(previous, report)
        runs = _listed_runs(scan)
        built = self._build_file_entries(runs, memo, next_state, report)
        experiments = self._describe_runs(
            runs, built, scan.contents, tags, memo, next_state, report
        )
        if built.stale:
            self._hash_stale_tails(built.stale, experiments, next_state, report)
        report.runs_scanned = report.runs_rescanned = len(scan.runs)
        return experiments

    def _generate_from_tree(self, tree: LiveTree, target: _Target) -> SyncManifest:
        """A generation from the live tree: rescan and rebuild only what changed
        (:meth:`_rebuild_from_tree`), then :meth:`_publish_tail`. Any failure makes the tree
        walk everything next time: a tree updated half-way is never trusted."""
        try:
            built = self._rebuild_from_tree(tree, target)
            manifest = self._publish_tail(built, target)
            if not built.next_state.keep_memo_file:
                state_file = str(target.state_path)
                tree.memo_saved[state_file] = built.next_state.scan_started_ns
                tree.memo_saved_at[state_file] = time.monotonic()
        except BaseException:
            tree.rescan()
            raise
        return manifest

    def _rebuild_from_tree(self, tree: LiveTree, target: _Target) -> _TreeRuns:
        """Refresh the tree (rescan what was reported changed, or walk it) and rebuild the
        runs whose scan records changed; the rest stay as the tree holds them, encoded."""
        report = target.report
        disk_memo = None if tree.seeded else self._reuse_memos(target.previous, report)
        read = RUN_METADATA if disk_memo is not None and not disk_memo.runs else ()
        refresh = self._refresh_tree(tree, read, report)
        rebuilt = self._note_rebuilt(refresh)
        unlisted = {path for path, _ in report.problems}
        tags = self._read_tags(report)
        self._rebuild_dirty_runs(tree, refresh, disk_memo, unlisted, report)
        kept = tree.ordered()
        runs_path_runs = sum(key[0] == layout.RUNS_DIRNAME for key, _ in kept)
        report.runs_scanned = len(kept)
        report.runs_rescanned = refresh.rescanned_runs
        report.run_layout = layout.layout_name(len(kept) - runs_path_runs, runs_path_runs)
        now = self.clock()
        signatures = self._tree_signatures
        if len(signatures) > len(tree.runs):
            self._tree_signatures = signatures = {key: signatures[key] for key in tree.runs}
        next_state = self._tree_state(tree, target.state_path, refresh)
        return _TreeRuns(
            generator=self,
            kept=kept,
            runs=tree.runs,
            rebuilt=rebuilt,
            unlisted=unlisted,
            tags=tags,
            signatures=signatures,
            scan_started_ns=refresh.scan_started_ns,
            now=now,
            next_state=next_state,
        )

    def _note_rebuilt(self, refresh: Refresh) -> list[RunKey]:
        """The runs the refresh found new or changed. Their signatures are kept for the
        change journal (the tree keeps no scan records), and the active selection learns
        they were rebuilt: it is forgotten after a walk, which may have changed any run."""
        rebuilt: list[RunKey] = []
        signatures = self._tree_signatures
        for run, _digest in refresh.dirty:
            key = (run[0], run[1], run[2])
            signatures[key] = signature(run[3])
            rebuilt.append(key)
        if self._active_selection is not None:
            self._active_selection.rebuilt.update(rebuilt)
            if refresh.full_walk:
                self._active_selection = None  # (cheap next to the walk)
        return rebuilt

    def _publish_tail(self, built: _BuiltRuns, target: _Target) -> SyncManifest:
        """What every generation does with the runs it built, whichever path built them:
        tell the change journal, select and encode the runs this type lists, decide the
        revision from that encoding, publish when it changed, and save the state.

        The journal comes first because an active manifest also lists the runs it saw
        change since the full manifests it names; the state comes last, so a generation
        killed on the way is redone, never trusted half-way."""
        manifest_type = target.manifest_type
        journal = ChangeJournal(target.output.parent)
        observation = built.observe(journal)
        changes_since, changed = self._changes_since(observation, built.now)
        manifest, experiments_json = built.encode(manifest_type, changed)
        manifest.problems = manifest_problems(target.report.problems)
        if manifest_type is ManifestType.ACTIVE and changes_since:
            manifest.changes_since = changes_since
        digest = self._content_digest(manifest, experiments_json)
        memos: bytes | None = None
        if self._decide_revision(manifest, digest, target):
            memos = self._publish(manifest, experiments_json, built.next_state, target)
            built.published(manifest, target.output)
        if manifest_type is ManifestType.FULL and observation is not None:
            self._record_full(journal, manifest, observation.seq, built.now)
        self._save_state(built.next_state, manifest, digest, memos, target)
        return manifest

    def _active_candidates(
        self,
        kept: list[tuple[RunKey, RunState]],
        unlisted: set[str],
        changed: set[str],
    ) -> list[tuple[RunKey, RunState]]:
        """The runs an active manifest may list now, in order: those the previous active
        manifest listed, those rebuilt since, and those the journal reports changed.

        A run outside all three is as it was when the previous active manifest left it out,
        and the window has only moved on since, so it is left out again; when that cannot be
        vouched for (the first time, after a walk, problems that came or went, a run
        reported changed without being rebuilt) every run is weighed."""
        previous = self._active_selection
        if previous is None or unlisted != previous.unlisted:
            return kept
        rebuilt = previous.rebuilt
        new = changed - previous.changed
        if new and not new <= {layout.run_prefix(*key) for key in rebuilt}:
            return kept
        candidates = previous.listed | rebuilt
        return [item for item in kept if item[0] in candidates]

    def _publish_delta(
        self, manifest: SyncManifest, listed: dict[RunKey, _ListedRun], output: Path
    ) -> None:
        """Write the delta of the active manifest just published (:mod:`runicorn.format.delta`):
        the runs it lists otherwise than the active manifest this generator published before
        it. Nothing without such a predecessor (the first publication); a failure is
        logged, and the client reads the whole manifest."""
        base, self._active_published = self._active_published, None
        path = output.with_name(delta_filename(output.name))
        if base is None or base[0] >= manifest.revision:
            with contextlib.suppress(OSError):
                path.unlink()  # an older process's: its base is no publication of ours
        else:
            before = base[2]
            array = EncodedRuns()
            for key, run in listed.items():
                seen = before.get(key)
                if seen is None or seen[0] != run[0] or seen[1] != run[1]:
                    array.add(*run)
            delta, delta_json = array.manifest(
                ManifestType.ACTIVE,
                manifest.generated_at,
                manifest.server_hostname,
                manifest.remote_root,
            )
            delta.revision = manifest.revision
            delta.snapshot_id = manifest.snapshot_id
            delta.changes_since = manifest.changes_since
            delta.problems = manifest.problems
            try:
                write_atomically(
                    path, write_delta(base[0], base[1], delta.to_json_pieces(delta_json))
                )
            except OSError as error:
                logger.warning("cannot write the active manifest delta %s: %s", path, error)
                with contextlib.suppress(OSError):
                    path.unlink()
                return
            logger.debug(
                "active manifest delta %d -> %d: %d of %d runs",
                base[0],
                manifest.revision,
                array.experiments,
                len(listed),
            )
        self._active_published = (manifest.revision, manifest.snapshot_id, listed)

    def _refresh_tree(
        self, tree: LiveTree, read: tuple[str, ...], report: GenerationReport
    ) -> Refresh:
        """Rescan what changed (everything on a walk); the tree's problems go to the report,
        and are logged when they differ from the last ones logged."""
        try:
            refresh = tree.refresh(self.backend, self.scan_threads, read)
        except OSError as error:
            raise ManifestGenerationError(
                f"cannot read the experiments root {self.remote_root}: {error.strerror or error}"
            ) from error
        problems = tree.problems()
        report.problems.extend(problems)
        if problems != tree.logged_problems:
            tree.logged_problems = problems
            self._log_problems(problems)
        return refresh

    def _rebuild_dirty_runs(
        self,
        tree: LiveTree,
        refresh: Refresh,
        disk_memo: GeneratorState | None,
        unlisted: set[str],
        report: GenerationReport,
    ) -> None:
        """Build the entries of the runs the refresh found new or changed, with the stages
        of a full generation, and store them in the tree with their memos.

        :data:`REBUILD_CHUNK_RUNS` runs at a time, each chunk's scan records, metadata and
        disk memos let go once it is stored: on a walk of 100,000 runs the records, the
        entry objects and the encoded entries of every run would otherwise all be alive at
        once, most of a gigabyte."""
        dirty, refresh.dirty = refresh.dirty, []
        dirty.reverse()  # taken from the end: each chunk's records go with it
        while dirty:
            chunk: list[tuple[RunScan, bytes]] = []
            while dirty and len(chunk) < REBUILD_CHUNK_RUNS:
                run, digest = dirty.pop()
                key: RunKey = (run[0], run[1], run[2])
                if unlisted and layout.run_prefix(*key)[:-1] in unlisted:
                    tree.store(key, b"", 0, None, None, b"")  # left out until it can be listed
                else:
                    chunk.append((run, digest))
            if chunk:
                self._rebuild_chunk(tree, chunk, refresh, disk_memo, report)

    def _rebuild_chunk(
        self,
        tree: LiveTree,
        listed: list[tuple[RunScan, bytes]],
        refresh: Refresh,
        disk_memo: GeneratorState | None,
        report: GenerationReport,
    ) -> None:
        memo = disk_memo if disk_memo is not None else self._memos_of(tree, listed)
        next_state = GeneratorState(scan_started_ns=refresh.scan_started_ns)
        runs = [run for run, _ in listed]
        built = self._build_file_entries(runs, memo, next_state, report)
        entries: list[ExperimentEntry | None] = []
        contents = refresh.contents
        for (project, name, run_id, _records), run_files in zip(runs, built.runs, strict=True):
            if run_files is None:
                entries.append(None)  # soft-deleted
                continue
            entries.append(
                self._describe_run(
                    project, name, run_id, run_files, contents, memo, next_state, report
                )
            )
        rebuilt = [entry for entry in entries if entry is not None]
        listed_files = [len(entry.files) for entry in rebuilt]
        if built.stale:
            self._hash_stale_tails(built.stale, rebuilt, next_state, report)
        complete = iter([len(e.files) == n for e, n in zip(rebuilt, listed_files, strict=True)])
        file_memos = next_state.files
        for (run, digest), entry in zip(listed, entries, strict=True):
            key = (run[0], run[1], run[2])
            prefix = layout.run_prefix(*key)
            encoded = None
            memos: list[tuple[str, FileMemo]] = []
            if entry is not None:
                memos = [(f.path, file_memos[f.path]) for f in entry.files if f.path in file_memos]
                if not next(complete):
                    digest = b""  # a file vanished while hashed: build the run again next time
                # the array of one entry, without its brackets and closing brace (the tags
                # and the brace are added as the manifest is assembled)
                encoded = zlib.compress(self.backend.encode_experiments([entry])[1:-2], 1)
            run_memo = next_state.runs.get(prefix)
            packed = pack_memos(run_memo, memos) if run_memo is not None or memos else b""
            tree.store(key, digest, refresh.scan_started_ns, entry, encoded, packed)
            for filename in RUN_METADATA:
                contents.pop(prefix + filename, None)
            if disk_memo is not None:
                disk_memo.runs.pop(prefix, None)
                for record in run[3]:
                    disk_memo.files.pop(prefix + record[0], None)

    @staticmethod
    def _memos_of(tree: LiveTree, runs: list[tuple[RunScan, bytes]]) -> GeneratorState:
        """The memos the tree holds for ``runs``, with the oldest of their scans as the
        reuse boundary (valid for each of them)."""
        memo = GeneratorState()
        boundary: int | None = None
        for run, _ in runs:
            state = tree.runs.get((run[0], run[1], run[2]))
            if state is None or not state.scanned_ns:
                continue
            boundary = state.scanned_ns if boundary is None else min(boundary, state.scanned_ns)
            run_memo, file_memos = state.unpack_memos()
            memo.files.update(file_memos)
            if run_memo is not None:
                memo.runs[layout.run_prefix(run[0], run[1], run[2])] = run_memo
        memo.scan_started_ns = boundary or 0
        return memo

    @staticmethod
    def _tree_state(tree: LiveTree, state_path: Path, refresh: Refresh) -> GeneratorState:
        """The state saved after a generation from the tree: every memo the tree holds the
        first time and every :data:`MEMO_SAVE_SECONDS`, else a header vouching for the memo
        file written last (its memos stay true: a memo never expires, it only stops
        matching)."""
        key = str(state_path)
        saved = tree.memo_saved.get(key)
        saved_at = tree.memo_saved_at.get(key, float("-inf"))
        if saved is not None and time.monotonic() - saved_at < MEMO_SAVE_SECONDS:
            return GeneratorState(scan_started_ns=saved, keep_memo_file=True)
        boundary = tree.memo_boundary_ns()
        return GeneratorState(scan_started_ns=boundary, encoded_memos=tree.encode_memos(boundary))

    def _load_previous_state(self, state_path: Path, report: GenerationReport) -> GeneratorState:
        """The last generation's bookkeeping: its revision, fingerprints and where its memos
        are. An unusable state is a warning, not an error: everything is recomputed."""
        previous = GeneratorState.load(state_path)
        if previous.warning:
            report.warnings.append(previous.warning)
            logger.warning("%s", previous.warning)
        return previous

    def _scan(self, previous: GeneratorState, report: GenerationReport) -> tuple[int, ScanResult]:
        """One stat per file through the backend; returns the scan's start (the reuse
        boundary of the next generation) and its result, problems reported and logged."""
        # Without memos every run's metadata is parsed: let the scan read it while it holds
        # the run's directory. With memos most runs are reused and only changed ones are read.
        read = () if self.incremental and previous.memo_path is not None else RUN_METADATA
        scan_started_ns = time.time_ns()
        try:
            scan = self.backend.scan_experiments(str(self.remote_root), self.scan_threads, read)
        except OSError as error:
            raise ManifestGenerationError(
                f"cannot read the experiments root {self.remote_root}: {error.strerror or error}"
            ) from error
        report.problems.extend(scan.problems)
        self._log_problems(scan.problems)
        runs_path_runs = sum(run[0] == layout.RUNS_DIRNAME for run in scan.runs)
        report.run_layout = layout.layout_name(len(scan.runs) - runs_path_runs, runs_path_runs)
        return scan_started_ns, scan

    def _reuse_unchanged_manifest(
        self, fingerprint: str, scan: ScanResult, target: _Target
    ) -> SyncManifest | None:
        """The fast path of an incremental full generation: the published manifest when the
        tree is provably unchanged (see :meth:`_unchanged_since`), with the report filled
        in; ``None`` when the manifest must be built."""
        if not (self.incremental and target.manifest_type is ManifestType.FULL):
            return None
        unchanged_manifest = self._unchanged_since(fingerprint, scan, target)
        if unchanged_manifest is not None:
            report = target.report
            report.runs_scanned = report.runs_rescanned = len(scan.runs)
            reused = target.previous.append_only_files
            if reused is None:
                reused = _count_append_only(unchanged_manifest.experiments)
            report.files_reused = reused
        return unchanged_manifest

    def _reuse_memos(self, previous: GeneratorState, report: GenerationReport) -> GeneratorState:
        """What the last generation learnt per file and per run, read only now that the
        fast path has missed (it never needs them); an empty memory when not incremental."""
        if not self.incremental:
            return GeneratorState()
        memo_warning = previous.load_memos()
        if memo_warning:
            report.warnings.append(memo_warning)
            logger.warning("%s", memo_warning)
        return previous

    def _build_file_entries(
        self,
        runs: list[RunScan],
        memo: GeneratorState,
        next_state: GeneratorState,
        report: GenerationReport,
    ) -> Entries:
        """Every listed file's entry, in one backend call; append-only files a memo vouches
        for keep their recorded size and tail hash, the others come back as stale."""
        reuse_before = memo.scan_started_ns - REUSE_MARGIN_NS
        built = self.backend.build_file_entries(runs, memo.files, reuse_before, RUN_METADATA)
        next_state.files.update(built.reused)
        report.files_reused += len(built.reused)
        return built

    def _describe_runs(
        self,
        runs: list[RunScan],
        built: Entries,
        contents: dict[str, bytes],
        tags: dict[str, list[str]],
        memo: GeneratorState,
        next_state: GeneratorState,
        report: GenerationReport,
    ) -> list[ExperimentEntry]:
        """One experiment entry per run that is not soft-deleted: its files, its tags, and
        its status and times (see :meth:`_describe_run`)."""
        experiments: list[ExperimentEntry] = []
        for (project, name, run_id, _records), run_files in zip(runs, built.runs, strict=True):
            if run_files is None:
                continue  # soft-deleted: the user no longer wants it listed
            exp = self._describe_run(
                project, name, run_id, run_files, contents, memo, next_state, report
            )
            exp.tags = tags.get(run_id)
            experiments.append(exp)
        return experiments

    def _hash_stale_tails(
        self,
        stale: list[tuple[FileEntry, FileStat]],
        experiments: list[ExperimentEntry],
        next_state: GeneratorState,
        report: GenerationReport,
    ) -> None:
        """Hash the tails of the append-only files no memo vouches for, in one backend call;
        a file that vanished or shrank meanwhile is left out of this manifest."""
        requests = [(entry.path, record[1], True) for entry, record in stale]
        results = self.backend.hash_tails(self._root_str, requests, ManifestFormat.TAIL_HASH_WINDOW)
        vanished: set[str] = set()
        memos = next_state.files
        for (entry, record), result in zip(stale, results, strict=True):
            if result is None:
                vanished.add(entry.path)
                continue
            entry.size, entry.tail_hash = result
            memos[entry.path] = FileMemo(_stat_key(record), *result)
        report.files_hashed += len(stale) - len(vanished)
        if not vanished:
            return
        report.files_vanished += len(vanished)
        for path in sorted(vanished):
            report.problems.append((path, REASON_VANISHED_WHILE_READ))
            logger.warning("%s: %s; left out this time", path, REASON_VANISHED_WHILE_READ)
        for exp in experiments:
            files = [entry for entry in exp.files if entry.path not in vanished]
            if len(files) != len(exp.files):
                exp.files = files
                exp.updated_at = max((e.mtime for e in files), default=exp.created_at)

    def _select_for_type(
        self,
        manifest_type: ManifestType,
        experiments: list[ExperimentEntry],
        now: float,
        changed: set[str],
    ) -> list[ExperimentEntry]:
        """A full manifest lists every run; an active one only the runs still running or
        written to within the active window, so a frequent sync stays small, and the runs
        the journal saw change since the full manifests it names (``changed``, prefixes)."""
        if manifest_type is not ManifestType.ACTIVE:
            return experiments
        horizon = now - self.active_window_seconds
        return [
            exp
            for exp in experiments
            if exp.status == "running" or exp.updated_at >= horizon or exp.prefix in changed
        ]

    def _changes_since(
        self, observation: Observation | None, now: float
    ) -> tuple[list[str], set[str]]:
        """The full manifests an active manifest generated now names, and the runs
        (prefixes) it must list for them (see :mod:`runicorn.generate.journal`)."""
        if observation is None:
            return [], set()
        return observation.changes_since(now - self.active_window_seconds)

    def _record_full(
        self, journal: ChangeJournal, manifest: SyncManifest, seq: int, now: float
    ) -> None:
        """Tell the journal which full manifest is published now, built from observation
        ``seq``. A failure costs clients their shortcut, never the generation (logged)."""
        try:
            journal.record_full(
                FullRecord(manifest.snapshot_id, manifest.revision, seq, manifest.generated_at),
                now - 2 * self.active_window_seconds,
            )
        except OSError as error:
            logger.warning("cannot record the full manifest in %s: %s", journal.path, error)

    def _encode(
        self, manifest_type: ManifestType, experiments: list[ExperimentEntry], now: float
    ) -> tuple[SyncManifest, bytes]:
        """The manifest (revision not decided yet) and its experiments encoded once: the
        same bytes decide the revision and get published."""
        manifest = SyncManifest(
            manifest_type=manifest_type,
            revision=0,
            snapshot_id="",
            generated_at=now,
            server_hostname=self.hostname,
            remote_root=str(self.remote_root),
            experiments=experiments,
        )
        return manifest, self.backend.encode_experiments(experiments)

    def _decide_revision(self, manifest: SyncManifest, digest: str, target: _Target) -> bool:
        """Give ``manifest`` its revision and snapshot; ``True`` when it must be published.

        Unchanged content keeps the previous revision, snapshot and time, so clients see
        nothing new. Changed content goes one above the remembered revision, the published
        one and a 0.5.x generator's counter: a lost or stale state file, or another
        generator publishing on the same root, never makes a revision go back or repeat.
        """
        previous, output = target.previous, target.output
        published_revision = self._published_revision(output)
        unchanged = (
            previous.digest == digest
            and published_revision == previous.revision
            and _published_hash(output, target.report.compressed_path) == previous.published_hash
        )
        if unchanged:
            manifest.revision = previous.revision
            manifest.snapshot_id = previous.snapshot_id
            manifest.generated_at = previous.generated_at
            logger.info(
                "%s manifest unchanged at revision %d; nothing published",
                manifest.manifest_type.value,
                manifest.revision,
            )
            return False
        legacy_revision = _legacy_revision(output.parent / LEGACY_STATE_FILENAME)
        manifest.revision = (
            max(previous.revision, published_revision or 0, legacy_revision or 0) + 1
        )
        manifest.snapshot_id = self.uuid_factory()
        return True

    def _publish(
        self,
        manifest: SyncManifest,
        experiments_json: bytes,
        next_state: GeneratorState,
        target: _Target,
    ) -> bytes:
        """Write the ``.json`` then the ``.json.gz``, each atomically; returns the encoded
        memos, made here because their encoding overlaps the compression."""
        output, report = target.output, target.report
        data = manifest.to_json_pieces(experiments_json)
        # zlib releases the GIL: while the gzip is made, write the JSON and encode the
        # memos (the files still appear in the order .json, .json.gz, state)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="runicorn-gzip") as pool:
            packing = pool.submit(compress, data)
            write_atomically(output, data)
            memos = next_state.encode_memos()
            packed = packing.result()
        write_atomically(report.compressed_path, packed)
        next_state.published_hash = _hash_pair(data, packed)
        report.published = True
        _raise_legacy_revision(output.parent / LEGACY_STATE_FILENAME, manifest.revision)
        logger.info(
            "published %s manifest revision %d: %d runs, %d files",
            manifest.manifest_type.value,
            manifest.revision,
            manifest.total_experiments,
            manifest.total_files,
        )
        return memos

    @staticmethod
    def _save_state(
        next_state: GeneratorState,
        manifest: SyncManifest,
        digest: str,
        memos: bytes | None,
        target: _Target,
    ) -> None:
        """Remember this generation for the next one, after publishing: a generation killed
        before this point is redone in full, never trusted half-way."""
        next_state.revision = manifest.revision
        next_state.snapshot_id = manifest.snapshot_id
        next_state.generated_at = manifest.generated_at
        next_state.digest = digest
        if not target.report.published:
            next_state.published_hash = target.previous.published_hash
        next_state.save(target.state_path, memos)

    def _describe_run(
        self,
        project: str,
        name: str,
        run_id: str,
        run_files: RunFiles,
        contents: dict[str, bytes],
        memo: GeneratorState,
        next_state: GeneratorState,
        report: GenerationReport,
    ) -> ExperimentEntry:
        """Status and creation time from meta.json / status.json (cached while unchanged;
        their bytes come from ``contents`` when the scan read them)."""
        prefix = layout.run_prefix(project, name, run_id)
        meta_record, status_record = run_files.watched
        meta_key = None if meta_record is None else _stat_key(meta_record)
        status_key = None if status_record is None else _stat_key(status_record)
        known = memo.runs.get(prefix)
        reuse_before = memo.scan_started_ns - REUSE_MARGIN_NS
        if (
            known is not None
            and (meta_key is None or meta_key[1] < reuse_before)
            and (status_key is None or status_key[1] < reuse_before)
            and known.meta_key == meta_key
            and known.status_key == status_key
        ):
            run_memo = known
        else:
            meta_doc = self._read_run_json(prefix, "meta.json", meta_key, contents, report)
            status_doc = self._read_run_json(prefix, "status.json", status_key, contents, report)
            created = layout.derive_created_at(meta_doc, status_doc, fallback=float("nan"))
            run_memo = RunMemo(
                meta_key=meta_key,
                status_key=status_key,
                status=layout.derive_status(status_doc),
                created_at=None if created != created else created,
            )
        next_state.runs[prefix] = run_memo
        created_at = run_memo.created_at if run_memo.created_at is not None else run_files.oldest
        return ExperimentEntry(
            run_id=run_id,
            project=project,
            name=name,
            status=run_memo.status,
            created_at=created_at,
            updated_at=run_files.newest if run_files.files else created_at,
            files=run_files.files,
            path=layout.run_path_of(project, name),
        )

    def _read_run_json(
        self,
        prefix: str,
        filename: str,
        key: StatKey | None,
        contents: dict[str, bytes],
        report: GenerationReport,
    ) -> dict[str, Any] | None:
        if key is None:
            return None
        data = contents.get(prefix + filename)
        try:
            if data is None:  # not read by the scan: large, unreadable there, or memoised
                data = _read_small_file(os.path.join(self._root_str, prefix, filename), key[0])
        except OSError as error:
            message = f"{prefix}{filename}: cannot be read ({error.strerror}); using defaults"
            report.warnings.append(message)
            logger.warning("%s", message)
            return None
        doc = layout.parse_json_object(data)
        if doc is None:
            message = (
                f"{prefix}{filename}: not a valid JSON object (being rewritten?); using defaults"
            )
            report.warnings.append(message)
            logger.warning("%s", message)
        return doc

    def _read_tags(self, report: GenerationReport) -> dict[str, list[str]]:
        """Tags by run id, from the root's experiments metadata file; a missing, unreadable
        or invalid file costs the runs their tags (with a warning), never the generation."""
        path = self.remote_root / layout.EXPERIMENTS_METADATA_FILENAME
        try:
            data = _read_small_file(path)
        except FileNotFoundError:
            return {}
        except OSError as error:
            message = f"{path.name}: cannot be read ({error.strerror}); runs get no tags"
            report.warnings.append(message)
            logger.warning("%s", message)
            return {}
        if self._tags_read is not None and self._tags_read[0] == data:
            return self._tags_read[1]  # (a publisher reads it at every generation)
        doc = layout.parse_json_object(data)
        if doc is None:
            message = f"{path.name}: not a valid JSON object; runs get no tags"
            report.warnings.append(message)
            logger.warning("%s", message)
            return layout.tags_by_run(doc)
        tags = layout.tags_by_run(doc)
        self._tags_read = (data, tags)
        return tags

    def _scan_fingerprint(
        self, manifest_type: ManifestType, scan: ScanResult, tags: dict[str, list[str]]
    ) -> str:
        """Everything a full manifest's content is derived from, hashed: every stat record
        (size, mtime, ctime, inode of every file), the scan's problems and the tags."""
        hasher = blake3()
        hasher.update(orjson.dumps([manifest_type.value, self.hostname, str(self.remote_root)]))
        runs = scan.runs
        for start in range(0, len(runs), FINGERPRINT_RUNS_PER_UPDATE):
            hasher.update(orjson.dumps(runs[start : start + FINGERPRINT_RUNS_PER_UPDATE]))
        hasher.update(
            orjson.dumps([(names.json_safe(path), reason) for path, reason in scan.problems])
        )
        hasher.update(orjson.dumps(tags))
        return hasher.hexdigest()

    def _unchanged_since(
        self, fingerprint: str, scan: ScanResult, target: _Target
    ) -> SyncManifest | None:
        """The published manifest, when the tree is provably as it was when it was made.

        The fast path of an incremental run with nothing changed: no entry is rebuilt, no tail
        read and no state rewritten. It needs the same scan fingerprint, every file older than
        that scan by :data:`REUSE_MARGIN_NS` (so no write can hide inside one mtime tick),
        and the published files to be byte for byte what it wrote.
        """
        previous = target.previous
        if not previous.scan_fingerprint or previous.scan_fingerprint != fingerprint:
            return None
        settled_before = previous.scan_started_ns - REUSE_MARGIN_NS
        if scan.newest_mtime_ns is not None and scan.newest_mtime_ns >= settled_before:
            return None
        try:
            data = target.output.read_bytes()
            packed = target.report.compressed_path.read_bytes()
        except OSError:
            return None
        if _hash_pair(data, packed) != previous.published_hash:
            return None  # edited, corrupted or replaced since we published it
        try:
            manifest = PublishedManifest(data)
        except (ValueError, KeyError, TypeError):
            return None
        if manifest.revision != previous.revision:
            return None
        logger.info(
            "%s manifest unchanged at revision %d (tree identical to the last scan)",
            manifest.manifest_type.value,
            manifest.revision,
        )
        return manifest

    @staticmethod
    def _content_digest(manifest: SyncManifest, experiments_json: bytes) -> str:
        """A fingerprint of everything but the per-generation header fields: the problems, the
        experiments exactly as they are published (so the bytes are encoded once for both),
        and the full manifests an active one names (a client needs the newest named)."""
        hasher = blake3()
        hasher.update(
            orjson.dumps([manifest.server_hostname, manifest.remote_root, manifest.problems])
        )
        if manifest.changes_since is not None:
            hasher.update(orjson.dumps(manifest.changes_since))
        hasher.update(experiments_json)
        return hasher.hexdigest()

    @staticmethod
    def _published_revision(output: Path) -> int | None:
        """The revision of the manifest currently published at ``output``, if readable.

        Ours has it in the first bytes; another generator's (0.5.x indents its JSON, and may
        order the fields otherwise) is read whole when the header is not found early."""
        try:
            with open(output, "rb") as handle:
                probe = handle.read(HEADER_PROBE_BYTES)
                header = read_header(probe)
                if header is None and len(probe) == HEADER_PROBE_BYTES:
                    probe += handle.read(ManifestFormat.MAX_DECOMPRESSED_BYTES)
        except OSError:
            return None
        if header is not None:
            return int(header["revision"])
        return _revision_of(probe)

    @staticmethod
    def _log_problems(problems: list[Problem]) -> None:
        """Log the scan's problems, the first :data:`MAX_LOGGED_PROBLEMS` one by one."""
        for path, reason in problems[:MAX_LOGGED_PROBLEMS]:
            logger.warning("skipped %s: %s", path, reason)
        if len(problems) > MAX_LOGGED_PROBLEMS:
            logger.warning("... and %d more problems", len(problems) - MAX_LOGGED_PROBLEMS)


def _observe(
    journal: ChangeJournal,
    runs: RunsSource,
    tags: dict[str, list[str]],
    started_ns: int,
    *,
    reported: list[RunSignature] | None = None,
    run_count: int | None = None,
) -> Observation | None:
    """This scan, told to the change journal; ``None`` (logged) when the journal cannot
    be written: clients then lose their shortcut for a while, not the manifest.
    ``reported``: the runs rebuilt since the previous generation (see
    :meth:`ChangeJournal.observe`)."""
    try:
        return journal.observe(runs, tags, started_ns, reported=reported, run_count=run_count)
    except OSError as error:
        logger.warning("cannot update the change journal %s: %s", journal.path, error)
        return None


def manifest_problems(problems: list[Problem]) -> list[tuple[str, str]]:
    """The problems a manifest lists: those that are gaps in what the generation read (not
    the scan's rules, :data:`~runicorn.core.scan.POLICY_REASONS`), sorted, each path as JSON
    can carry it (:func:`runicorn.format.names.json_safe`)."""
    return sorted(
        {
            (names.json_safe(path), reason)
            for path, reason in problems
            if reason not in POLICY_REASONS
        }
    )


def _hash_pair(data: Document, packed: bytes) -> str:
    """Fingerprint of a published ``.json`` (whole or in pieces) and ``.json.gz`` pair."""
    hasher = blake3()
    for piece in pieces_of(data):
        hasher.update(piece)
    return hasher.hexdigest() + blake3(packed).hexdigest()


def _revision_of(document: bytes) -> int | None:
    """``revision`` of a whole JSON manifest, ``None`` when it is not one."""
    try:
        revision = orjson.loads(document).get("revision")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return revision if type(revision) is int and revision >= 0 else None


def _read_legacy_state(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            doc = layout.parse_json_object(handle.read(MAX_LEGACY_STATE_BYTES))
    except OSError:
        return None
    return doc


def _legacy_revision(path: Path) -> int | None:
    """A 0.5.x generator's ``last_revision`` (:data:`LEGACY_STATE_FILENAME`), if any and
    not our own raise."""
    doc = _read_legacy_state(path)
    key, mark = LEGACY_STATE_MARK
    if doc is None or doc.get(key) == mark:
        return None
    revision = doc.get("last_revision")
    return revision if type(revision) is int and revision >= 0 else None


def _legacy_state_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """The lock our generations take to change the 0.5.x counter: the full and the active
    generation hold different locks, and both write it. (The 0.5.x generator takes none.)"""
    return exclusive_lock(path.with_name(path.name + layout.LOCK_SUFFIX))


def _raise_legacy_revision(path: Path, revision: int) -> None:
    """Raise the 0.5.x counter to ``revision`` (creating it if missing), so that generator's
    next revision comes after ours: it reads only its own counter. Its other keys are kept;
    a counter that is not a JSON object is left alone; a failure is logged, never fatal
    (the manifest is published already)."""
    try:
        with _legacy_state_lock(path):
            doc: dict[str, Any] | None = {}
            if path.exists():
                doc = _read_legacy_state(path)
            if doc is None:
                return
            current = doc.get("last_revision")
            if type(current) is int and current >= revision:
                return
            doc["last_revision"] = revision
            doc[LEGACY_STATE_MARK[0]] = LEGACY_STATE_MARK[1]
            write_atomically(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    except OSError as error:
        logger.warning("cannot raise the 0.5.x revision counter %s: %s", path, error.strerror)


def _published_hash(output: Path, compressed: Path) -> str | None:
    """Fingerprint of what is published now (``None`` if either file is missing): what
    :func:`_hash_pair` gives for the two files' bytes, read a piece at a time (a 100,000-run
    manifest is 150 MB, and is hashed while the new one is in memory too)."""
    try:
        return _hash_file(output) + _hash_file(compressed)
    except OSError:
        return None


HASH_READ_BYTES = 1 << 20


def _hash_file(path: Path) -> str:
    hasher = blake3()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_READ_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _count_append_only(experiments: list[ExperimentEntry]) -> int:
    """How many append-only files the experiments list (the report's reuse count)."""
    return sum(entry.is_append_only for exp in experiments for entry in exp.files)


def _listed_runs(scan: ScanResult) -> list[RunScan]:
    """The scanned runs whose directories could be listed.

    A run whose directory could not be listed would otherwise appear with no files, as if it
    were empty: it is left out (its problem is reported) rather than published that way.
    """
    unlisted = {path for path, _ in scan.problems}
    return [run for run in scan.runs if layout.run_prefix(*run[:3])[:-1] not in unlisted]


def _remove_leftover_temp_files(*targets: Path) -> None:
    """Delete temp files a killed generation (SIGKILL, power loss) left for these targets.

    Safe because the caller holds the output's lock: no live generator is writing them, and
    other programs' temp files in the same directory have other prefixes.
    """
    prefixes = tuple(temp_prefix_for(target) for target in targets)
    try:
        leftovers = [e for e in os.scandir(targets[0].parent) if e.name.startswith(prefixes)]
    except OSError:
        return
    for entry in leftovers:
        try:
            os.unlink(entry.path)
            logger.info("removed %s left by an interrupted generation", entry.path)
        except OSError:
            pass


MAX_METADATA_BYTES = 16 * 1024 * 1024
"""A run's metadata file larger than this is read only this far (and then fails to parse)."""


def _read_small_file(path: str | Path, size_hint: int = 65536) -> bytes:
    """Read a metadata file without following a symbolic link.

    ``size_hint`` (the scanned size) sizes the read buffer; a file that grew since is still
    read whole, up to :data:`MAX_METADATA_BYTES`.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        chunks = []
        remaining = MAX_METADATA_BYTES
        while remaining > 0:
            wanted = min(remaining, max(size_hint, 4096) + 1)
            chunk = os.read(fd, wanted)
            chunks.append(chunk)
            remaining -= len(chunk)
            if len(chunk) < wanted:
                break  # a short read of a regular file is its end: no second read to learn it
        return b"".join(chunks)
    finally:
        os.close(fd)

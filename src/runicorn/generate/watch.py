"""The long-running publisher: republish manifests as the experiments tree changes.

It learns of changes from a change source (:mod:`runicorn.generate.changes`: inotify, or
polling where inotify cannot see every write) and turns them into generations through the
ordinary :meth:`ManifestGenerator.generate` -- same lock, same atomic publish, same
content-based revisions -- so a cron generation beside it, and every client, stay correct.

Scheduling: a change that follows ``debounce`` seconds of quiet is published at once (the
leading edge: a lone line written by a run reaches the active manifest one generation after
its write, not a debounce later). A change that comes within ``debounce`` of the previous
one belongs to a burst: the **active** manifest is then generated ``debounce`` seconds after
the burst's last change, and at most ``max_delay`` seconds after its first, so hundreds of
runs appending at once make one publication and a steady stream still gets one every
``max_delay``. The **full** manifest follows within ``full_interval`` seconds of a change,
at most once per interval, and only when something changed; since on a large lab it takes
seconds during which no active manifest is published, it waits for a pause in the changes
(:data:`FULL_QUIET_SECONDS`) as long as that bound allows. Each published full manifest is
followed at once by an active one that names it (its ``changes_since``), so a client
applies that small manifest in place of the whole full one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runicorn.format.models import ManifestType, SyncManifest
from runicorn.generate.changes import (
    WATCH_HEADROOM_FRACTION,
    Changes,
    ChangeSource,
    ChangeSourceFailed,
    InotifySource,
    PollingSource,
    Waker,
    WatchBudgetExceeded,
    polling_reason,
    watch_budget,
)
from runicorn.generate.generator import (
    GenerationReport,
    ManifestGenerationError,
    ManifestGenerator,
)

logger = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.2
MAX_DELAY_SECONDS = 1.0
FULL_INTERVAL_SECONDS = 60.0
FULL_QUIET_SECONDS = 5.0
"""A full generation waits for this long without a change, or until ``full_interval`` after
the first change it has to publish, whichever comes first: at 100,000 runs it takes several
seconds, and a line written meanwhile would wait for it."""
POLL_INTERVAL_SECONDS = 5.0
RESCAN_INTERVAL_SECONDS = 900.0
"""With inotify, how often the whole tree is walked anyway (a generation that rescans only
what was reported would never see a change inotify missed: a write through a hard link from
outside the tree, another host's write to a file system not known to be shared)."""
RETRY_SECONDS = 5.0
"""After a failed generation (root gone, disk full), how long until the next attempt."""
ACTIVE_PACE = 1.0
"""After an active generation that took T seconds, the next starts no sooner than
``ACTIVE_PACE * T`` later: on a lab so large that a generation outlasts ``max_delay``, a
steady stream of changes costs at most half a core, not a whole one."""

SOURCE_AUTO = "auto"
SOURCE_INOTIFY = "inotify"
SOURCE_POLL = "poll"

PublishCallback = Callable[[GenerationReport, SyncManifest], None]


class ManifestPublisher:
    """Keeps ``<root>/.runicorn/{active,full}_manifest.json`` current until :meth:`stop`.

    ``source`` is ``"auto"`` (inotify unless the file system or the watch limit rules it
    out), ``"inotify"`` (the same, but a refusal is an error) or ``"poll"``. ``outputs``
    overrides where each manifest type is published. ``on_generation`` is called after
    every generation, published or not, on the thread running :meth:`run`.

    :meth:`run` blocks; :meth:`stop` and :meth:`request_rescan` may be called from any
    thread or from a signal handler.
    """

    def __init__(
        self,
        generator: ManifestGenerator,
        *,
        source: str = SOURCE_AUTO,
        full_interval: float = FULL_INTERVAL_SECONDS,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        debounce: float = DEBOUNCE_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        outputs: dict[ManifestType, Path] | None = None,
        on_generation: PublishCallback | None = None,
    ) -> None:
        if source not in (SOURCE_AUTO, SOURCE_INOTIFY, SOURCE_POLL):
            raise ValueError(f"source must be auto, inotify or poll, got {source!r}")
        for label, value in (("full_interval", full_interval), ("debounce", debounce)):
            if value < 0:
                raise ValueError(f"{label} must be >= 0, got {value}")
        if max_delay < debounce:
            raise ValueError(f"max_delay ({max_delay}) must be >= debounce ({debounce})")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self.generator = generator
        self.requested_source = source
        self.full_interval = full_interval
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.max_delay = max_delay
        self.outputs = {
            kind: (outputs or {}).get(kind) or generator.output_dir / kind.filename
            for kind in (ManifestType.ACTIVE, ManifestType.FULL)
        }
        self.on_generation = on_generation
        self.source: ChangeSource | None = None
        self._waker = Waker()
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._started = threading.Event()
        self._last_duration = 0.0
        self._last_published = False
        # Generations rescan only what the source reports (a full walk when it cannot
        # tell); with --no-incremental every generation recomputes everything, as asked.
        self._tree = generator.keep_tree() if generator.incremental else None

    # -- control (any thread) ------------------------------------------------------------

    def stop(self) -> None:
        """End :meth:`run` after the generation in progress, if any."""
        self._stop.set()
        self._waker.wake()

    def request_rescan(self) -> None:
        """Re-establish the watches and regenerate both manifests now (what SIGHUP does)."""
        self._rescan.set()
        self._waker.wake()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until the source watches the tree and the first manifests are published."""
        return self._started.wait(timeout)

    @property
    def source_name(self) -> str | None:
        return None if self.source is None else self.source.name

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Watch and publish until :meth:`stop`. Raises :class:`ChangeSourceFailed` only
        when inotify was demanded (``source="inotify"``) and cannot be used."""
        try:
            self.source = self._open_source()
            self._loop()
        finally:
            if self.source is not None:
                self.source.close()
            self._waker.close()

    def _loop(self) -> None:
        assert self.source is not None
        # The first generations come after the watches are in place, so nothing written
        # meanwhile is missed.
        active_due: float | None = time.monotonic()
        first_change: float | None = active_due
        full_due: float | None = active_due
        full_forced = True  # (due now, not postponed by changes: the first, a rescan)
        full_pending: float | None = None  # the first change not in a full manifest yet
        last_full = float("-inf")
        earliest_active = float("-inf")
        last_change = float("-inf")
        leading_pending = False  # a leading-edge publication is due and not yet made
        started = False
        while not self._stop.is_set():
            now = time.monotonic()
            deadlines = [due for due in (active_due, full_due, self._walk_due()) if due]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            changes = self._wait(timeout)
            if self._stop.is_set():
                break
            now = time.monotonic()
            requested = self._rescan.is_set()
            if requested:
                self._rescan.clear()
                logger.info("rescan requested: re-watching and regenerating")
                self._rescan_source()
                changes.rescan = True
                active_due = full_due = first_change = now
                full_forced = True
            else:
                walk_due = self._walk_due()
                if walk_due is not None and now >= walk_due:
                    logger.debug("walking the whole tree (every %g s)", RESCAN_INTERVAL_SECONDS)
                    changes.rescan = True
            self._report_to_tree(changes)
            if changes and not requested:
                # After a quiet spell the change is published at once; inside a burst it
                # waits for the burst to pause (or for max_delay).
                leading = first_change is None and now - last_change >= self.debounce
                last_change = now
                if first_change is None:
                    first_change = now
                # The rest of the write that opened the burst (its close, a second batch of
                # events) must not push a publication already due at once into the debounce.
                leading_pending = leading_pending or leading
                quiet = now if changes.rescan or leading_pending else now + self.debounce
                active_due = max(min(first_change + self.max_delay, quiet), earliest_active)
                if full_pending is None:
                    full_pending = now
                if not full_forced:
                    paused = min(now + FULL_QUIET_SECONDS, full_pending + self.full_interval)
                    full_due = max(active_due, last_full + self.full_interval, paused)
            if active_due is not None and now >= active_due:
                if self._generate(ManifestType.ACTIVE):
                    active_due = first_change = None
                    leading_pending = False
                    took = self._last_duration
                    earliest_active = time.monotonic() + ACTIVE_PACE * took
                    if isinstance(self.source, PollingSource) and started:
                        # (not after the first: it builds the tree and the memos, and is
                        # many times slower than a poll's walk)
                        self.source.pace(took)
                else:
                    active_due = first_change = now + RETRY_SECONDS
            if full_due is not None and time.monotonic() >= full_due:
                if self._generate(ManifestType.FULL):
                    full_due = full_pending = None
                    full_forced = False
                    last_full = time.monotonic()
                    if started and self._last_published:
                        # An active manifest naming the new full one (``changes_since``):
                        # a client applies it in place of the whole full manifest.
                        self._generate(ManifestType.ACTIVE)
                else:
                    full_due = now + RETRY_SECONDS
            if not started and active_due is None and full_due is None:
                started = True
                logger.info("manifests up to date; waiting for changes")
                self._started.set()

    def _walk_due(self) -> float | None:
        """When the next walk of the whole tree is due under inotify (``None``: not kept,
        not walked yet, or a walk already pending)."""
        tree = self._tree
        if tree is None or tree.full_walk_at is None or tree.walk_pending:
            return None
        if not isinstance(self.source, InotifySource):
            return None  # polling walks the tree on every tick
        return tree.full_walk_at + RESCAN_INTERVAL_SECONDS

    def _report_to_tree(self, changes: Changes) -> None:
        """Tell the generator's tree what the next generation must rescan."""
        if self._tree is None or not changes:
            return
        if changes.rescan:
            self._tree.rescan()
        else:
            self._tree.changed(changes.directories)

    def _wait(self, timeout: float | None) -> Changes:
        """The next changes; a failing inotify source is replaced by polling here."""
        assert self.source is not None
        try:
            return self.source.wait(timeout)
        except ChangeSourceFailed as error:
            self._fall_back(str(error))
            return Changes(rescan=True)

    def _rescan_source(self) -> None:
        assert self.source is not None
        try:
            self.source.rescan()
        except ChangeSourceFailed as error:
            self._fall_back(str(error))

    def _fall_back(self, reason: str) -> None:
        assert self.source is not None
        if self.requested_source == SOURCE_INOTIFY:
            raise ChangeSourceFailed(reason)
        self.source.close()
        logger.warning(
            "inotify stopped working (%s); falling back to polling every %g s",
            reason,
            self.poll_interval,
        )
        self.source = self._polling()

    def _open_source(self) -> ChangeSource:
        root = self.generator.remote_root
        if self.requested_source == SOURCE_POLL:
            logger.info("polling %s every %g s (polling was asked for)", root, self.poll_interval)
            return self._polling()
        reason = polling_reason(root)
        if reason is None:
            available, used, limit = watch_budget()
            source = InotifySource(
                root,
                self._waker,
                outputs=self.outputs.values(),
                budget=available,
            )
            try:
                source.start()
            except WatchBudgetExceeded:
                needed = source.needed_watches()
                source.close()
                reason = (
                    f"the tree needs {needed} inotify watches (one per directory) but only "
                    f"{available} are free (limit {limit}, {used} in use by this user's "
                    "processes, 10% left to others); to watch it, raise the limit as root "
                    f"(`sysctl fs.inotify.max_user_watches={suggested_limit(needed, used)}`, "
                    "and the same line in /etc/sysctl.d/ to keep it) and restart"
                )
            except ChangeSourceFailed as error:
                source.close()
                reason = str(error)
            else:
                logger.info(
                    "watching %s with inotify: %d directories (%s watches free of %s)",
                    root,
                    source.watch_count,
                    "?" if available is None else available,
                    "?" if limit is None else limit,
                )
                return source
        if self.requested_source == SOURCE_INOTIFY:
            raise ChangeSourceFailed(f"cannot watch {root} with inotify: {reason}")
        logger.warning("polling %s every %g s: %s", root, self.poll_interval, reason)
        return self._polling()

    def _polling(self) -> PollingSource:
        source = PollingSource(self._waker, self.poll_interval)
        source.start()
        return source

    def _generate(self, manifest_type: ManifestType) -> bool:
        """One generation; ``False`` (logged) when it failed and should be retried."""
        try:
            manifest, _ = self.generator.generate(manifest_type, self.outputs[manifest_type])
        except ManifestGenerationError as error:
            logger.error(
                "%s manifest not published (retrying in %g s): %s",
                manifest_type.value,
                RETRY_SECONDS,
                error,
            )
            return False
        report = self.generator.last_report
        assert report is not None
        self._last_duration = report.duration
        self._last_published = report.published
        if report.published:
            logger.info(
                "published %s manifest revision %d: %d runs, %d files (%.3f s)",
                manifest_type.value,
                manifest.revision,
                manifest.total_experiments,
                manifest.total_files,
                report.duration,
            )
        else:
            logger.debug("%s manifest unchanged (%.3f s)", manifest_type.value, report.duration)
        if self.on_generation is not None:
            self.on_generation(report, manifest)
        return True


def suggested_limit(needed: int, used: int) -> int:
    """A ``max_user_watches`` that fits ``needed`` watches beside the ``used`` ones with the
    10 % headroom left to other programs, and room for the tree to double: rounded up to
    a multiple of 65,536, the way the limit is usually written."""
    wanted = (2 * needed + used) / (1 - WATCH_HEADROOM_FRACTION)
    step = 65536
    return max(step, -(-int(wanted) // step) * step)

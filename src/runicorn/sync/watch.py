"""Keep a cache fresh until told to stop: the loop behind ``ManifestSyncClient.watch``.

One connection, one client. The first pass is an ordinary sync (the full manifest, the
active one when newer). Then the client learns of publications in one of two ways:

* **pushed** (the default, over SSH): a small command on the server, on an exec channel of the
  same connection (:mod:`runicorn.transport.change_feed`), says when a manifest file was
  replaced and sends the active manifest itself -- or, where the publisher writes one, its
  delta (:mod:`runicorn.format.delta`), which the pass applies when the cache holds the
  delta's base and reads the whole active manifest otherwise; the pass starts one one-way
  delay after the publication, and an idle watch sends no SFTP request between the full
  checks;
* **polled**, where the server cannot run that command (no ``python3``, no exec channels),
  until it can, or when ``push`` is off (``RUNICORN_WATCH_PUSH=0``): every ``interval``
  seconds the **active** manifest's header is probed -- three SFTP requests, nothing more
  while nothing changes -- and applied when it moved.

Every ``full_interval`` seconds the **full** manifest is checked as well, which brings runs
created and removed outside the active window, and anything a missed active revision held:
the full manifest lists every run, so nothing that falls between two active manifests is
lost, pushed or not.

A failing pass (the connection dropped, the server's manifest unreadable) is reported to
``on_error`` and retried after a backoff (1 s, doubling to ``max_backoff``); with a
``reconnect`` factory the client gets a fresh SFTP session first. :meth:`CacheWatcher.stop`
may be called from any thread or a signal handler: the pass in progress finishes (its
state commits as files land, so even an abandoned one leaves a consistent cache).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from runicorn.format.delta import delta_filename
from runicorn.format.layout import MANIFEST_DIRNAME
from runicorn.format.models import ManifestFormat, ManifestType

if TYPE_CHECKING:
    import paramiko

    from runicorn.sync.stats import ProgressCallback, SyncStats
    from runicorn.transport.change_feed import ChangeFeed


class WatchedClient(Protocol):
    """What the loop needs of a :class:`~runicorn.sync.client.ManifestSyncClient` (which
    imports this module: naming it here would make an import cycle)."""

    remote_root: str
    manifest_type: str
    jitter_max: float
    sftp_client: paramiko.SFTPClient | None
    pushed_active: bytes | None

    def sync(self, progress_callback: ProgressCallback | None = None) -> SyncStats: ...

    def use_sftp_client(self, sftp_client: paramiko.SFTPClient) -> None: ...


logger = logging.getLogger("runicorn.remote_storage.manifest_sync")

INTERVAL_SECONDS = 1.7
"""Between two probes of the active manifest when polling: a probe is three SFTP requests
(OPEN, READ, CLOSE), and a full check every 30 s three more, so an idle watch costs under 2
a second."""
PUSH_ENV = "RUNICORN_WATCH_PUSH"
"""``0`` turns the push channel off: the watch polls, as on a server that cannot push."""
FULL_INTERVAL_SECONDS = 30.0
FULL_SETTLE_SECONDS = 10.0
"""Pushed, how long the pass for a new full manifest waits for the active publication that
follows it (the publisher republishes the active manifest after each full one, naming it):
that pass then applies the active manifest in place of the full one, not the whole full
manifest, while appended lines wait behind it. On a large lab under load that active
generation takes seconds; a full manifest no active one follows (a cron generation) is
read when the wait is over."""
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0

_DELTA = 4
"""The index of the active manifest's delta among the feed's paths (see _start_feed)."""

SyncCallback = Callable[["SyncStats"], None]
ErrorCallback = Callable[[BaseException, float], None]
"""``(error, seconds until the next attempt)``."""


class CacheWatcher:
    """Runs :meth:`ManifestSyncClient.sync` passes until :meth:`stop` (see the module)."""

    def __init__(
        self,
        client: WatchedClient,
        *,
        interval: float = INTERVAL_SECONDS,
        full_interval: float = FULL_INTERVAL_SECONDS,
        on_sync: SyncCallback | None = None,
        on_error: ErrorCallback | None = None,
        reconnect: Callable[[], paramiko.SFTPClient] | None = None,
        max_backoff: float = MAX_BACKOFF_SECONDS,
        stop_event: threading.Event | None = None,
        push: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if interval <= 0 or full_interval < interval:
            raise ValueError(
                f"need 0 < interval <= full_interval, got {interval} and {full_interval}"
            )
        if max_backoff < FIRST_BACKOFF_SECONDS:
            raise ValueError(f"max_backoff must be >= {FIRST_BACKOFF_SECONDS}, got {max_backoff}")
        self.client = client
        self.interval = interval
        self.full_interval = full_interval
        self.on_sync = on_sync
        self.on_error = on_error
        self.on_progress = on_progress
        """Handed to each pass's ``sync()``: the files of a long pass as they land."""
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.push = push_default() if push is None else push
        self.passes = 0
        self._stop = stop_event or threading.Event()
        # Set by stop() and by the change feed: what ends a wait between two passes.
        self._wake = threading.Event()
        self._full_changed = False
        self._feed: ChangeFeed | None = None
        self._pushed: bytes | None = None
        """The active manifest's content the feed pushed last, until a pass takes it."""
        self._pushed_lock = threading.Lock()
        self._full_settle_at: float | None = None
        self._active_again = False
        self._pushed_unused = False
        self._feed_given_up = False
        self._feed_retry_at = 0.0

    def stop(self) -> None:
        """End :meth:`run` once the pass in progress, if any, is over."""
        self._stop.set()
        self._wake.set()

    @property
    def pushed(self) -> bool:
        """Whether the server is telling this watch of its publications right now."""
        feed = self._feed
        return feed is not None and feed.ready.is_set() and feed.alive

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Sync, then keep syncing until :meth:`stop`; never raises for a failed pass."""
        try:
            self._run()
        finally:
            self._close_feed()

    def _run(self) -> None:
        next_full = time.monotonic()
        backoff = FIRST_BACKOFF_SECONDS
        while not self._stop.is_set():
            now = time.monotonic()
            settle = self._full_settle_at
            # A new full manifest waits for the active publication that names it, unless the
            # push is gone or the wait is over (see FULL_SETTLE_SECONDS).
            waiting = settle is not None and now < settle and self._pushed is None and self.pushed
            full = now >= next_full or (self._full_changed and not waiting)
            if full:
                self._full_changed = False
                self._full_settle_at = None
            try:
                stats = self._pass(full)
            except Exception as error:
                self._report(error, backoff)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.max_backoff)
                next_full = time.monotonic()  # whatever happened meanwhile, catch up whole
                if self.reconnect is not None and _is_connection_error(error):
                    self._close_feed()
                    self._reconnect()
                continue
            backoff = FIRST_BACKOFF_SECONDS
            self.passes += 1
            if full:
                next_full = time.monotonic() + self.full_interval
            if self.on_sync is not None:
                self.on_sync(stats)
            if (
                self._pushed_unused
                and not stats.get("skipped")
                and stats.get("manifest_type") == ManifestType.FULL.value
            ):
                # The full manifest was applied, not the (newer) active one pushed for this
                # pass: look at the active one again now.
                self._active_again = True
            self._start_feed()
            if self._active_again:
                self._active_again = False
                continue
            if self.pushed:
                settle = self._full_settle_at
                wake_at = next_full if settle is None else min(next_full, settle)
                self._sleep(wake_at - time.monotonic())
            else:
                self._sleep(self.interval)

    def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` have passed, the feed reported a change, or :meth:`stop`; not
        at all while pushed content waits for a pass."""
        if seconds > 0 and not self._stop.is_set() and self._pushed is None:
            self._wake.wait(seconds)
        self._wake.clear()

    # -- the push channel -----------------------------------------------------------------

    def _start_feed(self) -> None:
        """Start the change feed once the connection allows it (SFTP over SSH only)."""
        if not self.push or self._feed_given_up:
            return
        if self._feed is not None and self._feed.alive:
            return
        if time.monotonic() < self._feed_retry_at:
            return
        sftp = self.client.sftp_client
        channel = None if sftp is None else sftp.get_channel()
        transport = None if channel is None else channel.get_transport()
        if transport is None or not transport.is_active():
            return
        from runicorn.transport.change_feed import ChangeFeed  # late: polling never needs it

        root = self.client.remote_root.rstrip("/") or "."
        paths = [
            f"{root}/{MANIFEST_DIRNAME}/{kind.filename}{suffix}"
            for kind in (ManifestType.ACTIVE, ManifestType.FULL)
            for suffix in (ManifestFormat.GZIP_SUFFIX, "")
        ]
        paths.append(f"{root}/{MANIFEST_DIRNAME}/{delta_filename(ManifestType.ACTIVE.filename)}")
        feed = ChangeFeed(
            transport,
            paths,
            on_change=self._on_change,
            on_ready=self._on_ready,
            on_end=self._on_end,
            on_content=self._on_content,
            # the active manifest's .gz, and its delta in its place when one follows it
            inline=[0, _DELTA],
            deltas={0: _DELTA},
        )
        self._feed = feed
        feed.start()

    def _on_content(self, index: int, data: bytes) -> None:
        with self._pushed_lock:
            self._pushed = data
        self._wake.set()

    def _on_change(self, index: int) -> None:
        if index in (0, _DELTA):
            # Published, but not pushed (too large, or unreadable): the pass reads it.
            with self._pushed_lock:
                self._pushed = None
        elif index == 1:
            # The plain copy, written just before the .gz by the generator: the .gz's
            # content follows, and waking now would only read the server's copy early. (A
            # server that publishes no .gz is followed by the full checks.)
            return
        if index in (2, 3):  # the full manifest's files
            self._full_changed = True
            if self.pushed:
                # The active publication that follows wakes the pass (see FULL_SETTLE_SECONDS).
                if self._full_settle_at is None:
                    self._full_settle_at = time.monotonic() + FULL_SETTLE_SECONDS
                return
        self._wake.set()

    def _on_ready(self) -> None:
        logger.info("the server pushes manifest changes; polling stops")
        # A publication between the last pass and the feed's first look is in no line:
        # one more pass catches it.
        self._wake.set()

    def _on_end(self, reason: str) -> None:
        feed = self._feed
        if reason == "closed":
            return
        level = logging.INFO
        if feed is not None and not feed.ready.is_set():
            # It never worked on this connection: do not try again until a reconnection.
            self._feed_given_up = True
            level = logging.WARNING
        else:  # it worked, then ended: try again, but not at every pass
            self._feed_retry_at = time.monotonic() + self.full_interval
        logger.log(
            level,
            "no pushed changes from the server (%s); polling every %g s",
            reason,
            self.interval,
        )
        self._wake.set()

    def _take_pushed(self) -> bytes | None:
        """The pushed content not used yet, if any; the feed may then send the next."""
        with self._pushed_lock:
            pushed, self._pushed = self._pushed, None
        feed = self._feed
        if pushed is not None and feed is not None:
            feed.grant()
        return pushed

    def _close_feed(self) -> None:
        with self._pushed_lock:
            self._pushed = None
        feed, self._feed = self._feed, None
        self._feed_given_up = False
        self._feed_retry_at = 0.0
        if feed is not None:
            feed.close()

    def _pass(self, full: bool) -> SyncStats:
        """One sync: the client's own mode when ``full``, else the active manifest only."""
        client = self.client
        mode, jitter = client.manifest_type, client.jitter_max
        if not full:
            client.manifest_type = ManifestType.ACTIVE.value
        if not full or mode == "auto":
            # (a full pass that reads only the full manifest leaves it to the active pass
            # that follows at once: see _sleep)
            client.pushed_active = self._take_pushed()
        self._pushed_unused = full and client.pushed_active is not None
        if self.passes:
            client.jitter_max = 0.0  # the jitter spreads a fleet's first sync, not each pass
        try:
            return client.sync() if self.on_progress is None else client.sync(self.on_progress)
        finally:
            client.manifest_type, client.jitter_max = mode, jitter
            client.pushed_active = None

    def _report(self, error: BaseException, retry_in: float) -> None:
        # A caller with on_error reports it itself; otherwise the log is the only trace.
        level = logging.INFO if self.on_error is not None else logging.WARNING
        logger.log(level, "sync failed (%s); retrying in %g s", error, retry_in)
        if self.on_error is not None:
            self.on_error(error, retry_in)

    def _reconnect(self) -> None:
        assert self.reconnect is not None
        try:
            sftp = self.reconnect()
        except Exception as error:
            logger.warning("reconnecting failed: %s", error)
            return  # the next pass fails fast and backs off further
        logger.info("reconnected to %s", self.client.remote_root)
        self.client.use_sftp_client(sftp)


def push_default() -> bool:
    """Whether a watch asks the server to push changes unless told: yes, unless
    ``RUNICORN_WATCH_PUSH`` is ``0``, ``off``, ``false`` or ``no``."""
    value = os.environ.get(PUSH_ENV, "").strip().lower()
    return value not in ("0", "off", "false", "no")


def _is_connection_error(error: BaseException) -> bool:
    """Errors that a fresh connection may cure: the transport's, not a bad manifest's."""
    if isinstance(error, (OSError, EOFError)):
        return True
    return type(error).__module__.split(".")[0] == "paramiko"

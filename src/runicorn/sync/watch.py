"""Keep a cache fresh until told to stop: the loop behind ``ManifestSyncClient.watch``.

One connection, one client. The first pass is an ordinary sync (the full manifest, the
active one when newer). Then, every ``interval`` seconds, only the **active** manifest's
header is probed -- a few SFTP requests, nothing more while nothing changes -- and applied
when it moved: a line appended on the server arrives with the next active publication. Every
``full_interval`` seconds the **full** manifest is checked as well, which brings runs created
and removed outside the active window, and anything a missed active revision held: the full
manifest lists every run, so nothing that falls between two active manifests is lost.

A failing pass (the connection dropped, the server's manifest unreadable) is reported to
``on_error`` and retried after a backoff (1 s, doubling to ``max_backoff``); with a
``reconnect`` factory the client gets a fresh SFTP session first. :meth:`CacheWatcher.stop`
may be called from any thread or a signal handler: the pass in progress finishes (its
state commits as files land, so even an abandoned one leaves a consistent cache).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from runicorn.format.models import ManifestType

if TYPE_CHECKING:
    import paramiko

    from runicorn.sync.stats import SyncStats


class WatchedClient(Protocol):
    """What the loop needs of a :class:`~runicorn.sync.client.ManifestSyncClient` (which
    imports this module: naming it here would make an import cycle)."""

    remote_root: str
    manifest_type: str
    jitter_max: float

    def sync(self) -> SyncStats: ...

    def use_sftp_client(self, sftp_client: paramiko.SFTPClient) -> None: ...


logger = logging.getLogger("runicorn.remote_storage.manifest_sync")

INTERVAL_SECONDS = 1.7
"""Between two probes of the active manifest: a probe is three SFTP requests (OPEN, READ,
CLOSE), and a full check every 30 s three more, so an idle watch costs under 2 a second."""
FULL_INTERVAL_SECONDS = 30.0
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0

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
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.passes = 0
        self._stop = stop_event or threading.Event()

    def stop(self) -> None:
        """End :meth:`run` once the pass in progress, if any, is over."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Sync, then keep syncing until :meth:`stop`; never raises for a failed pass."""
        next_full = time.monotonic()
        backoff = FIRST_BACKOFF_SECONDS
        while not self._stop.is_set():
            full = time.monotonic() >= next_full
            try:
                stats = self._pass(full)
            except Exception as error:
                self._report(error, backoff)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.max_backoff)
                next_full = time.monotonic()  # whatever happened meanwhile, catch up whole
                if self.reconnect is not None and _is_connection_error(error):
                    self._reconnect()
                continue
            backoff = FIRST_BACKOFF_SECONDS
            self.passes += 1
            if full:
                next_full = time.monotonic() + self.full_interval
            if self.on_sync is not None:
                self.on_sync(stats)
            self._stop.wait(self.interval)

    def _pass(self, full: bool) -> SyncStats:
        """One sync: the client's own mode when ``full``, else the active manifest only."""
        client = self.client
        mode, jitter = client.manifest_type, client.jitter_max
        if not full:
            client.manifest_type = ManifestType.ACTIVE.value
        if self.passes:
            client.jitter_max = 0.0  # the jitter spreads a fleet's first sync, not each pass
        try:
            return client.sync()
        finally:
            client.manifest_type, client.jitter_max = mode, jitter

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


def _is_connection_error(error: BaseException) -> bool:
    """Errors that a fresh connection may cure: the transport's, not a bad manifest's."""
    if isinstance(error, (OSError, EOFError)):
        return True
    return type(error).__module__.split(".")[0] == "paramiko"

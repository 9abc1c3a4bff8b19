"""``runicorn sync SOURCE CACHE --watch``: one connection, a cache kept fresh until a signal.

The loop is :meth:`ManifestSyncClient.watch`; this module connects, hands each pass and the
runs it changed to a reporter (:mod:`.live_view`: the live table, plain lines or JSON
Lines), reports reconnections on stderr, and turns SIGTERM and Ctrl+C into a clean stop with
exit 0.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from runicorn.cli._common import EXIT_FAILURE, EXIT_HOST_KEY, EXIT_OK, error
from runicorn.cli.live_view import Reporter, reporter_for

if TYPE_CHECKING:
    import paramiko

    from runicorn.sync.client import ManifestSyncClient
    from runicorn.sync.selection import RunSelection
    from runicorn.sync.stats import SyncStats


@dataclass(frozen=True)
class SshOptions:
    port: int | None
    identities: tuple[str, ...]
    ssh_config: str
    known_hosts: str | None
    timeout: float
    compress: bool | None = None
    stream: bool | None = None
    """The file stream: on, off, or automatic (``None``; ``runicorn.transport.file_stream``)."""
    stream_python: str | None = None
    """The server's interpreter that runs the file stream (``None``: ``python3``)."""


class _Connection:
    """The SSH connection a watch lives on, re-established when it dropped."""

    def __init__(self, destination: str, options: SshOptions) -> None:
        self.destination = destination
        self.options = options
        self.ssh: paramiko.SSHClient | None = None

    def connect(self) -> paramiko.SSHClient:
        from runicorn.transport.ssh import connect

        options = self.options
        self.ssh = connect(
            self.destination,
            port=options.port,
            config_path=options.ssh_config,
            known_hosts=options.known_hosts,
            identity_files=options.identities,
            timeout=options.timeout,
            compress=options.compress,
        )
        return self.ssh

    def sftp(self) -> paramiko.SFTPClient:
        """A fresh SFTP session, on a new SSH connection if the old one is gone."""
        transport = None if self.ssh is None else self.ssh.get_transport()
        if transport is None or not transport.is_active():
            self.close()
            self.connect()
            assert self.ssh is not None
            click.echo(f"reconnected to {self.destination}", err=True)
        assert self.ssh is not None
        return self.ssh.open_sftp()

    def close(self) -> None:
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                self.ssh.close()
            self.ssh = None


def watch_cache(
    destination: str | None,
    root: str,
    cache_dir: Path,
    ssh: SshOptions,
    *,
    workers: int | None,
    jitter: float,
    delete: bool,
    allow_mass_delete: bool,
    verify: bool,
    as_json: bool,
    interval: float,
    full_interval: float,
    selection: RunSelection | None = None,
    caps: dict[str, float] | None = None,
    viewer_url: str | None = None,
) -> int:
    """Watch until SIGTERM or Ctrl+C; the exit code (0, or 1/4 when the first connection
    cannot be made). With ``viewer_url`` the viewer is told of every pass's changes."""
    from runicorn.sync.client import ManifestSyncClient

    connection = None if destination is None else _Connection(destination, ssh)
    options: dict[str, Any] = {
        "max_workers": workers,
        "delete": delete,
        "allow_mass_delete": allow_mass_delete,
        "verify": verify,
        "selection": selection,
        "timeout": ssh.timeout,
        **(caps or {}),
    }
    if connection is None:
        from runicorn.transport.local_remote import LocalRemote

        client = ManifestSyncClient(
            None, root, cache_dir, jitter, remote=LocalRemote(root), **options
        )
        reconnect = None
    else:
        code, sftp, resolved = _first_connection(connection, root, as_json)
        if sftp is None:
            return code
        client = ManifestSyncClient(
            sftp,
            resolved,
            cache_dir,
            jitter,
            stream=ssh.stream,
            stream_python=ssh.stream_python,
            **options,
        )
        reconnect = connection.sftp
    source = root if destination is None else f"{destination}:{client.remote_root}"
    click.echo(f"watching {source} into {cache_dir}", err=True)
    reporter = reporter_for(cache_dir, source, as_json=as_json)
    viewer = None if viewer_url is None else _Viewer(viewer_url, cache_dir, client)
    try:
        with _signals_stop(client), reporter:
            client.watch(
                interval=interval,
                full_interval=full_interval,
                on_sync=lambda stats: _after_pass(client, stats, reporter, viewer),
                on_error=reporter.record_error,
                reconnect=reconnect,
                on_progress=reporter.on_progress,
            )
    except KeyboardInterrupt:
        pass  # a second signal: the pass in progress was abandoned; its files are kept
    finally:
        client.close()
        if connection is not None:
            connection.close()
    click.echo("stopped; the cache is consistent", err=True)
    return EXIT_OK


def _first_connection(
    connection: _Connection, root: str, as_json: bool
) -> tuple[int, paramiko.SFTPClient | None, str]:
    """Connect and open the session; on failure the exit code and ``None``."""
    import paramiko

    from runicorn.transport.ssh import HostKeyError, SshConfigError

    try:
        ssh = connection.connect()
        sftp = ssh.open_sftp()
    except HostKeyError as exc:
        error(str(exc))
        return EXIT_HOST_KEY, None, root
    except (SshConfigError, paramiko.SSHException, OSError) as exc:
        error(f"cannot connect to {connection.destination}: {exc}")
        return EXIT_FAILURE, None, root
    root = root or "."
    root = "." if root == "~" else root.removeprefix("~/")
    resolved = root if root.startswith("/") else sftp.normalize(root)
    return EXIT_OK, sftp, resolved


def _after_pass(
    client: ManifestSyncClient, stats: SyncStats, reporter: Reporter, viewer: _Viewer | None
) -> None:
    # --verify checks every cached file once, on the first pass, not every few seconds.
    client.verify = False
    if viewer is not None and not stats.get("skipped"):
        viewer.tell()
    reporter.record_pass(stats, client.last_run_changes)


class _Viewer:
    """``--viewer`` during a watch: told of each applied pass's changes, as a plain sync
    tells it once. A viewer that did not answer (not started yet, restarting) is asked
    again after :attr:`RETRY_SECONDS`, not on every pass, with everything it missed."""

    RETRY_SECONDS = 60.0

    def __init__(self, url: str, cache_dir: Path, client: ManifestSyncClient) -> None:
        self.url = url
        self.cache_dir = cache_dir
        self.client = client
        self._failed_at: float | None = None
        self._added: set[str] = set()
        self._changed: set[str] = set()
        self._renew()

    def _renew(self) -> None:
        from runicorn.sync.viewer import ViewerNotifier

        # The client asks it to drop runs before deleting them, and to restore runs from
        # its recycle bin, during the pass; the refresh comes after the pass.
        self.client.viewer = ViewerNotifier(self.url, self.cache_dir)

    def tell(self) -> None:
        import time

        from runicorn.sync.viewer import ViewerChanges

        notifier = self.client.viewer
        if notifier is None:
            return
        self._added.update(self.client.last_changes.added)
        self._changed.update(self.client.last_changes.changed)
        if notifier.report.problem is not None:
            now = time.monotonic()
            if self._failed_at is None:
                self._failed_at = now
            if now - self._failed_at < self.RETRY_SECONDS:
                return
            self._failed_at = None
            self._renew()
            notifier = self.client.viewer
            assert notifier is not None
        notifier.refresh(ViewerChanges(tuple(sorted(self._added)), tuple(sorted(self._changed))))
        if notifier.report.problem is None:
            self._added.clear()
            self._changed.clear()


@contextlib.contextmanager
def _signals_stop(client: ManifestSyncClient) -> Iterator[None]:
    """SIGTERM and SIGINT stop the watch after its pass; a second one abandons the pass."""
    stops = 0

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            raise KeyboardInterrupt
        client.stop_watch()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

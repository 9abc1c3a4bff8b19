"""Telling a running upstream Runicorn viewer what a sync changed in the cache it serves.

The upstream viewer (``runicorn viewer --storage CACHE``, the registry package of that name)
keeps an index of the runs it serves in ``CACHE/runicorn.db`` and fills it from the files
only when it starts. A run a later sync brings is missing from its run list, and a run the
sync removes stays listed (and answers 404) until the viewer is told. Everything here goes
through the viewer's public HTTP API, with the standard library only:

* ``GET /api/health`` first: it names the directory the viewer serves, and nothing is sent
  unless that is this cache (a viewer of another directory must never be touched);
* runs the sync **added**: ``POST /api/import/archive`` with an empty archive. Importing
  nothing writes nothing, and the viewer then indexes every run on disk it does not know,
  before it answers. (``POST /api/config/user_root_dir`` re-indexes too, but it also
  rewrites the viewer user's default storage root, where that user's training scripts would
  then write: never used.)
* runs whose files **changed**: ``POST /api/status/check``, which re-reads ``status.json`` of
  the runs the index holds as running (the rest of a run's page is read from its files);
* runs the sync **removes**: ``DELETE /api/runs/{id}/permanent``, sent *before* the cache
  deletes them, since the viewer can only drop a run from its index while the run's
  directory is still there. The viewer then deletes the directory itself (and anything
  under the cache's ``archive/`` that only this run used: nothing the sync put there, since
  ``archive/`` is not synced);
* runs the viewer had moved to its recycle bin (``runs/.recycle``) and the server still has:
  the sync moves them back itself, to where the server has them (the viewer would move a
  ``<project>/<name>/runs/<id>`` run to ``runs/<project>/<name>/<id>``), and
  ``POST /api/recycle-bin/restore`` then clears the viewer's deleted mark, in its index
  as on disk.

No viewer answering is a warning (in :attr:`ViewerReport.problem` and the log), never an
error: the sync itself succeeded. Addresses other than loopback are allowed (a viewer on
another machine serving the same NFS directory is unusual, but the health check decides).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VIEWER_URL_ENV",
    "ViewerChanges",
    "ViewerNotifier",
    "ViewerReport",
    "normalize_viewer_url",
    "notify_viewer",
    "viewer_url_from_env",
]

logger = logging.getLogger(__name__)

VIEWER_URL_ENV = "RUNICORN_VIEWER_URL"
"""Environment variable holding the default viewer URL of ``runicorn sync``."""

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for the viewer per request (a re-index of a large cache takes a while)."""

_MAX_BATCH = 50
"""Run ids per recycle-bin request (the viewer refuses larger batches)."""

# An empty ZIP archive: the end-of-central-directory record alone.
_EMPTY_ZIP = b"PK\x05\x06" + b"\x00" * 18


@dataclass(frozen=True)
class ViewerChanges:
    """What one sync changed in a cache, by run id."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass
class ViewerReport:
    """What telling the viewer achieved: ``problem`` is ``None`` when everything was told."""

    url: str
    reached: bool = False
    reindexed: bool = False
    status_checked: bool = False
    forgotten: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    problem: str | None = None

    def add_problem(self, message: str) -> None:
        self.problem = message if self.problem is None else f"{self.problem}; {message}"


def viewer_url_from_env() -> str | None:
    """The URL in ``RUNICORN_VIEWER_URL``, or ``None`` when it is unset or empty."""
    value = os.environ.get(VIEWER_URL_ENV, "").strip()
    return value or None


def normalize_viewer_url(url: str) -> str:
    """``url`` as the notifier uses it (``http://`` added when no scheme is given, no
    trailing slash); ``ValueError`` when it is not an http(s) address."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"viewer URL {url!r} is not an http:// or https:// address")
    return url


def _same_directory(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class ViewerNotifier:
    """One viewer at ``url`` that should serve ``cache_dir``; every call is best effort.

    :meth:`check` must succeed (the viewer answers and serves ``cache_dir``) before any
    other call sends anything; until then, and after a failure, the calls do nothing. The
    outcome of all calls accumulates in :attr:`report`.
    """

    def __init__(
        self, url: str, cache_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.url = normalize_viewer_url(url)
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.timeout = timeout
        self.report = ViewerReport(url=self.url)
        self._checked: bool | None = None

    # -- HTTP -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        import http.client  # late: only a sync with a viewer pays for importing these
        import urllib.request

        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except http.client.HTTPException as error:  # something else listens there
            raise OSError(f"not an HTTP answer ({type(error).__name__}: {error})") from error
        return json.loads(payload) if payload else None

    def _post_json(self, path: str, document: Any) -> Any:
        return self._request(
            "POST", path, body=json.dumps(document).encode(), content_type="application/json"
        )

    def _fail(self, what: str, error: BaseException) -> None:
        import urllib.error

        if isinstance(error, urllib.error.HTTPError):
            detail = error.read()[:300].decode("utf-8", "replace")
            reason = f"HTTP {error.code} {detail}".strip()
        elif isinstance(error, urllib.error.URLError):
            reason = str(error.reason)
        else:
            reason = str(error) or type(error).__name__
        self.report.add_problem(f"{what}: {reason}")
        logger.warning("viewer at %s: %s: %s", self.url, what, reason)

    # -- the calls ------------------------------------------------------------------------

    def check(self) -> bool:
        """Whether a viewer answers at the URL and serves this cache (asked once)."""
        if self._checked is not None:
            return self._checked
        self._checked = False
        try:
            health = self._request("GET", "/api/health")
        except (OSError, ValueError) as error:
            self._fail("no viewer answered", error)
            return False
        served = health.get("storage") if isinstance(health, dict) else None
        if not isinstance(served, str):
            self.report.add_problem("the answer of /api/health names no storage directory")
            logger.warning("viewer at %s: /api/health names no storage directory", self.url)
            return False
        self.report.reached = True
        if not _same_directory(served, self.cache_dir):
            message = (
                f"it serves {served}, not this cache ({self.cache_dir}); told it nothing "
                f"(start it with: runicorn viewer --storage {self.cache_dir})"
            )
            self.report.add_problem(message)
            logger.warning("viewer at %s: %s", self.url, message)
            return False
        self._checked = True
        return True

    def forget_runs(self, run_ids: Iterable[str]) -> list[str]:
        """Before the cache deletes these runs: have the viewer drop them (and their
        directories); returns the ids it dropped."""
        ids = sorted(set(run_ids))
        if not ids or not self.check():
            return []
        dropped: list[str] = []
        for run_id in ids:
            try:
                quoted = urllib.parse.quote(run_id, safe="")
                self._request("DELETE", f"/api/runs/{quoted}/permanent")
            except (OSError, ValueError) as error:
                self._fail(f"could not remove run {run_id} from its index", error)
                continue
            dropped.append(run_id)
        self.report.forgotten.extend(dropped)
        return dropped

    def restore_runs(self, run_ids: Iterable[str]) -> list[str]:
        """Runs the viewer moved to its recycle bin that the server still has: have the
        viewer put them back; returns the ids it restored."""
        ids = sorted(set(run_ids))
        if not ids or not self.check():
            return []
        restored: list[str] = []
        for start in range(0, len(ids), _MAX_BATCH):
            batch = ids[start : start + _MAX_BATCH]
            try:
                answer = self._post_json("/api/recycle-bin/restore", {"run_ids": batch})
            except (OSError, ValueError) as error:
                self._fail("could not restore runs from its recycle bin", error)
                continue
            results = answer.get("results", {}) if isinstance(answer, dict) else {}
            restored.extend(
                run_id
                for run_id in batch
                if isinstance(results.get(run_id), dict) and results[run_id].get("success")
            )
        self.report.restored.extend(restored)
        return restored

    def refresh(self, changes: ViewerChanges) -> None:
        """After the sync: index the runs it added, re-read statuses of those it changed."""
        if not (changes.added or changes.changed) or not self.check():
            return
        if changes.added:
            self._reindex()
        if changes.changed or changes.added:
            try:
                self._request("POST", "/api/status/check")
                self.report.status_checked = True
            except (OSError, ValueError) as error:
                self._fail("could not have it re-read run statuses", error)

    def _reindex(self) -> None:
        boundary = f"runicorn-sync-{secrets.token_hex(12)}"
        body = b"".join(
            [
                f"--{boundary}\r\n".encode(),
                b'Content-Disposition: form-data; name="mode"\r\n\r\nmerge\r\n',
                f"--{boundary}\r\n".encode(),
                b'Content-Disposition: form-data; name="file"; filename="nothing.zip"\r\n',
                b"Content-Type: application/zip\r\n\r\n",
                _EMPTY_ZIP,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        try:
            answer = self._request(
                "POST",
                "/api/import/archive",
                body=body,
                content_type=f"multipart/form-data; boundary={boundary}",
            )
        except (OSError, ValueError) as error:
            self._fail("could not have it index the new runs", error)
            return
        if isinstance(answer, dict) and answer.get("imported_files"):
            # Never expected (the archive is empty); said, not hidden, if it ever happens.
            logger.warning("viewer at %s reported importing files from an empty archive", self.url)
        self.report.reindexed = True


def notify_viewer(
    url: str,
    changes: ViewerChanges,
    *,
    cache_dir: str | os.PathLike[str],
    timeout: float = DEFAULT_TIMEOUT,
) -> ViewerReport:
    """Tell the viewer at ``url`` (serving ``cache_dir``) what a sync changed.

    Call it for removed runs *before* deleting their directories (the viewer drops a run
    from its index only while the directory exists; it then deletes the directory itself),
    and for added and changed runs after they landed. :class:`MetadataSyncService` with
    ``viewer_url=`` does both at the right moments. Never raises for an unreachable viewer:
    the report's ``problem`` says what could not be told.
    """
    notifier = ViewerNotifier(url, cache_dir, timeout=timeout)
    notifier.forget_runs(changes.removed)
    notifier.refresh(changes)
    return notifier.report

"""The fetch engine both remotes share: a job queue in priority order for the worker threads,
and the event queue that brings their results back to the caller's thread.

Workers (one per SFTP channel, or per local reader thread) take jobs and post events; the
thread that called ``fetch`` runs :meth:`FetchRun.dispatch`, which calls each job's sink and
``on_result``, so callers need no locks (the threading contract in :mod:`.remote`).
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from runicorn.transport.remote import FetchCancelled, FetchJob, FetchResult

__all__ = ["FetchRun", "copy_error", "run_fetch"]

# Events waiting for the caller's thread, bounded by the bytes they carry (memory, when sinks
# are slower than the network) rather than by their number: a cold sync starts with thousands
# of tiny files whose local work (temp file, rename, state) keeps the caller's thread busy,
# and a queue bounded by a small count of events would make the workers stop reading while
# the link stands idle. The length bound only caps the bookkeeping of tiny events.
_EVENT_QUEUE_BYTES = 64 * 1024 * 1024
_EVENT_QUEUE_LENGTH = 16384
POLL_SECONDS = 0.05
"""How often a waiting thread looks at ``cancel`` and at the fetch stopping."""

_DATA, _DONE, _EXIT = 0, 1, 2  # event kinds


class FetchRun:
    """One ``fetch`` call: the job queue, the event queue to the caller, and its bookkeeping.

    Workers take jobs in (priority, submission) order and post events; the caller's thread
    runs :meth:`dispatch`, which calls sinks and ``on_result``.
    """

    def __init__(
        self,
        jobs: Iterable[FetchJob],
        on_result: Callable[[FetchResult], None],
        cancel: threading.Event | None,
    ) -> None:
        self.jobs = list(jobs)
        self.on_result = on_result
        self.cancel = cancel
        self._heap = [(job.priority, index) for index, job in enumerate(self.jobs)]
        heapq.heapify(self._heap)
        self._lock = threading.Lock()
        self.events: queue.Queue[tuple[int, int, Any, Any]] = queue.Queue(_EVENT_QUEUE_LENGTH)
        self._queued_bytes = 0
        self._room = threading.Condition()
        self.stopping = threading.Event()
        self.aborted: set[int] = set()  # jobs whose sink failed: workers drop them
        self.reported: set[int] = set()
        self.last_worker_error: BaseException | None = None

    def take(self) -> int | None:
        """The next job for a worker, or None when none is left (or we are stopping)."""
        if self.stopping.is_set():
            return None
        with self._lock:
            if not self._heap:
                return None
            return heapq.heappop(self._heap)[1]

    def post(self, kind: int, index: int, a: Any = None, b: Any = None) -> None:
        """Hand an event to the caller's thread; dropped once the fetch is stopping."""
        while not self.stopping.is_set():
            try:
                self.events.put((kind, index, a, b), timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def data(self, index: int, offset: int, data: bytes) -> None:
        """Post received bytes, waiting while the queue holds :data:`_EVENT_QUEUE_BYTES`."""
        size = len(data)
        with self._room:
            while self._queued_bytes and self._queued_bytes + size > _EVENT_QUEUE_BYTES:
                if self.stopping.is_set():
                    return
                self._room.wait(POLL_SECONDS)
            self._queued_bytes += size
        self.post(_DATA, index, offset, data)

    def _taken(self, size: int) -> None:
        """The caller's thread took ``size`` queued bytes: wake a worker waiting for room."""
        with self._room:
            self._queued_bytes -= size
            self._room.notify()

    def done(self, index: int, error: BaseException | None, received: int) -> None:
        self.post(_DONE, index, error, received)

    def abandoned(self, index: int) -> bool:
        return index in self.aborted or self.stopping.is_set()

    def worker_exit(self, error: BaseException | None) -> None:
        if error is not None:
            self.last_worker_error = error
        self.post(_EXIT, -1, error)

    def _report(self, index: int, error: BaseException | None, received: int) -> None:
        self.reported.add(index)
        self.on_result(FetchResult(self.jobs[index], error, received))

    def dispatch(self, worker_count: int) -> None:
        """Run callbacks until every job is reported or ``cancel`` is set (caller's thread)."""
        remaining = len(self.jobs)
        running = worker_count
        cancel = self.cancel
        while len(self.reported) < remaining:
            if cancel is not None and cancel.is_set():
                self.stopping.set()
                return
            try:
                kind, index, a, b = self.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == _EXIT:
                running -= 1
                if running == 0:
                    self._fail_leftovers()
                continue
            if kind == _DATA:
                self._taken(len(b))
            if index in self.reported:
                continue
            if kind == _DATA:
                try:
                    self.jobs[index].sink(a, b)
                except Exception as error:  # the sink's failure is this job's failure
                    self.aborted.add(index)
                    self._report(index, error, a + len(b) - self.jobs[index].offset)
            else:
                self._report(index, a, b)

    def _fail_leftovers(self) -> None:
        """Every worker ended (their channels died): the jobs never started fail too."""
        error = self.last_worker_error or ConnectionError("no transfer channel is left")
        while True:
            index = self.take()
            if index is None:
                break
            if index not in self.reported:
                self._report(index, copy_error(error), 0)
        # Each worker posted its exit after its last event, so nothing of theirs is queued.
        for index in range(len(self.jobs)):
            if index not in self.reported:
                self._report(index, copy_error(error), 0)

    def report_cancelled(self) -> None:
        for index in range(len(self.jobs)):
            if index not in self.reported:
                self._report(index, FetchCancelled("the fetch was cancelled"), 0)


def copy_error(error: BaseException) -> BaseException:
    """A fresh exception per job (one instance must not collect tracebacks of many)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return type(error)(str(error))
    return ConnectionError(str(error))


def run_fetch(
    run: FetchRun,
    targets: Sequence[Callable[[], None]],
    interrupt: Callable[[], None],
) -> None:
    """Start one thread per target, dispatch callbacks, and always join every thread."""
    threads = [
        threading.Thread(target=target, name=f"runicorn-fetch-{number}", daemon=True)
        for number, target in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    completed = False
    try:
        run.dispatch(len(threads))
        completed = True
    finally:
        run.stopping.set()
        if not completed or (run.cancel is not None and run.cancel.is_set()):
            interrupt()  # otherwise the workers are only closing handles: let them
        for thread in threads:
            thread.join()
    if run.cancel is not None and run.cancel.is_set():
        run.report_cancelled()

"""A child process's output stream, read line by line on a thread, for waits with a deadline.

Tests that drive ``runicorn … --watch`` as a subprocess wait for a line that says something
happened; reading on a thread lets them give up at a deadline instead of blocking on a pipe.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import IO

import pytest


class ChildLines:
    """Lines of ``stream`` as they arrive; :meth:`expect` waits at most ``deadline`` s."""

    def __init__(self, stream: IO[str], deadline: float) -> None:
        self.deadline = deadline
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the end of the stream (the child has exited), before it is closed."""
        self._thread.join(self.deadline)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, condition: Callable[[str], bool]) -> str:
        """The first line from now on for which ``condition`` holds; fails the test at the
        deadline or at the end of the stream, listing what was seen."""
        deadline = time.monotonic() + self.deadline
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no expected line; saw {self.seen}")
            self.seen.append(line)
            if condition(line):
                return line

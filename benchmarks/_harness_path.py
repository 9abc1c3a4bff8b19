"""Puts ``tests/`` on ``sys.path``, so that ``python benchmarks/X.py`` finds the test harness.

The sshd launcher and the WAN emulator live in ``tests/harness`` (outside the wheel). pytest
finds them through ``pythonpath`` in ``pyproject.toml``; a script run directly has only its own
folder on the path, so each script imports this module before ``harness``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parents[1] / "tests")

if TESTS_DIR not in sys.path:
    sys.path.insert(1, TESTS_DIR)

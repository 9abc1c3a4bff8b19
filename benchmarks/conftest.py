"""Benchmark fixtures: every benchmark runs once per backend, like every test.

Run with ``pytest benchmarks --benchmark-only`` to measure, or with ``--benchmark-disable``
to run each benchmark once as a correctness check; ``--no-native`` deselects the compiled
half here too.
"""

from __future__ import annotations

from harness.backends import (  # noqa: F401
    backend,
    pytest_addoption,
    pytest_generate_tests,
)

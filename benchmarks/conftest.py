"""Benchmark fixtures: every benchmark runs once per backend, like every test.

Run with ``pytest benchmarks --benchmark-only`` to measure, or with ``--benchmark-disable``
to run each benchmark once as a correctness check; ``--no-native`` deselects the compiled
half here too. The harness comes from ``tests/`` (``pythonpath`` in ``pyproject.toml``).
"""

from __future__ import annotations

# The backend parametrization (the ``backend`` fixture, --no-native), shared with the tests.
pytest_plugins = ["harness.backends"]

"""Shared fixtures. Every behavioural test takes ``backend`` (directly or through a fixture
that does), so it runs once against the compiled core and once against pure Python."""

from __future__ import annotations

# The backend parametrization (and --no-native) is shared with the benchmarks.
from harness.backends import (  # noqa: F401
    backend,
    pytest_addoption,
    pytest_generate_tests,
)

# Real-sshd fixtures (sshd_server, sshd_factory, ssh_client, sftp).
from harness.sshd_fixtures import *  # noqa: F403

"""Runicorn manifest-based sync: publish one manifest of every run on a lab server, and
mirror the runs onto a laptop over SSH by fetching only what changed.

This module is the public facade: every name in ``__all__`` is supported API, documented
in ``docs/reference/python-api.md``; anything reached through a deeper module path is
internal, except the paths the API document names (:mod:`runicorn.manifest`,
:mod:`runicorn.remote_storage` and its ``manifest_sync`` and ``cache_manager`` modules).
Names resolve on first use, so ``import runicorn`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from runicorn._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from runicorn.core.backend import Backend, active_backend
    from runicorn.format.models import (
        ExperimentEntry,
        FileEntry,
        ManifestFormat,
        ManifestType,
        SyncManifest,
    )
    from runicorn.generate.generator import (
        GenerationReport,
        ManifestGenerationError,
        ManifestGenerator,
    )
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.client import ManifestSyncClient
    from runicorn.sync.service import MetadataSyncService, SyncProgress
    from runicorn.sync.stats import ProgressCallback, SyncStats
    from runicorn.transport.local_remote import LocalRemote
    from runicorn.transport.remote import Remote
    from runicorn.transport.sftp_remote import SftpRemote
    from runicorn.transport.ssh import HostKeyError, SshConfigError, connect

_HOMES = {
    "Backend": "runicorn.core.backend",
    "active_backend": "runicorn.core.backend",
    "ExperimentEntry": "runicorn.format.models",
    "FileEntry": "runicorn.format.models",
    "ManifestFormat": "runicorn.format.models",
    "ManifestType": "runicorn.format.models",
    "SyncManifest": "runicorn.format.models",
    "GenerationReport": "runicorn.generate.generator",
    "ManifestGenerationError": "runicorn.generate.generator",
    "ManifestGenerator": "runicorn.generate.generator",
    "LocalCacheManager": "runicorn.sync.cache",
    "ManifestSyncClient": "runicorn.sync.client",
    "MetadataSyncService": "runicorn.sync.service",
    "SyncProgress": "runicorn.sync.service",
    "ProgressCallback": "runicorn.sync.stats",
    "SyncStats": "runicorn.sync.stats",
    "LocalRemote": "runicorn.transport.local_remote",
    "Remote": "runicorn.transport.remote",
    "SftpRemote": "runicorn.transport.sftp_remote",
    "HostKeyError": "runicorn.transport.ssh",
    "SshConfigError": "runicorn.transport.ssh",
    "connect": "runicorn.transport.ssh",
}

__all__ = [
    "Backend",
    "ExperimentEntry",
    "FileEntry",
    "GenerationReport",
    "HostKeyError",
    "LocalCacheManager",
    "LocalRemote",
    "ManifestFormat",
    "ManifestGenerationError",
    "ManifestGenerator",
    "ManifestSyncClient",
    "ManifestType",
    "MetadataSyncService",
    "ProgressCallback",
    "Remote",
    "SftpRemote",
    "SshConfigError",
    "SyncManifest",
    "SyncProgress",
    "SyncStats",
    "__version__",
    "active_backend",
    "connect",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

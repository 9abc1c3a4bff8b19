"""The API document's client-side import paths, kept for code written against it.

``from runicorn.remote_storage import MetadataSyncService`` (and ``LocalCacheManager``, as
code written against Runicorn 0.4.x imports it) and the modules :mod:`.manifest_sync` and
:mod:`.cache_manager` re-export what now lives in :mod:`runicorn.sync`. Names resolve on
first use, so importing this package does not pull in paramiko's transport machinery until
a sync is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runicorn.sync.cache import LocalCacheManager
    from runicorn.sync.service import MetadataSyncService, SyncProgress

__all__ = ["LocalCacheManager", "MetadataSyncService", "SyncProgress"]


def __getattr__(name: str) -> Any:
    if name == "LocalCacheManager":
        from runicorn.sync.cache import LocalCacheManager

        return LocalCacheManager
    if name in __all__:
        from runicorn.sync import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

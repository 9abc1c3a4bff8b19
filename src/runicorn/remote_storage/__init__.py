"""Client side of manifest-based sync: fetch runs from a lab server into a local cache.

Kept light on purpose: ``import runicorn.remote_storage`` must not pull in paramiko's
transport machinery or the transfer engine until a sync is actually built, so the names
below are resolved on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runicorn.remote_storage.service import MetadataSyncService, SyncProgress

__all__ = ["MetadataSyncService", "SyncProgress"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from runicorn.remote_storage import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

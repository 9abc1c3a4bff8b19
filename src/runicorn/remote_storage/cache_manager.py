"""The API document's import path of the local cache (``runicorn.sync.cache_manager``)."""

from runicorn.sync.cache_manager import LocalCacheManager

__all__ = ["LocalCacheManager"]

"""The API document's import path of the local cache (``runicorn.sync.cache``)."""

from runicorn.sync.cache import LocalCacheManager

__all__ = ["LocalCacheManager"]

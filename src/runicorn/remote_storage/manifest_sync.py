"""The API document's import path of the manifest sync client (``runicorn.sync.client``)."""

from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.stats import ProgressCallback

__all__ = ["ManifestSyncClient", "ProgressCallback"]

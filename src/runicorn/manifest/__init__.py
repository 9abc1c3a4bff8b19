"""Server side of manifest-based sync: the manifest model and its generator.

The generator (and the scanning machinery behind it) is imported on first use, so that a
client, which needs only the model, does not pay for it on every sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runicorn.manifest.models import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
)

if TYPE_CHECKING:
    from runicorn.manifest.generator import (
        GenerationReport,
        ManifestGenerationError,
        ManifestGenerator,
    )

_GENERATOR_NAMES = ("GenerationReport", "ManifestGenerationError", "ManifestGenerator")

__all__ = [
    "ExperimentEntry",
    "FileEntry",
    "GenerationReport",
    "ManifestFormat",
    "ManifestGenerationError",
    "ManifestGenerator",
    "ManifestType",
    "SyncManifest",
]


def __getattr__(name: str) -> Any:
    if name in _GENERATOR_NAMES:
        from runicorn.manifest import generator

        return getattr(generator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

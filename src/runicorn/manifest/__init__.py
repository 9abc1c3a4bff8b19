"""The API document's server-side import path, kept for code written against it.

``from runicorn.manifest import ManifestGenerator, ManifestType`` works as the document
says; the model lives in :mod:`runicorn.format.models` and the generator in
:mod:`runicorn.generate.generator`. The generator (and the scanning machinery behind it) is
imported on first use, so that a client, which needs only the model, does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runicorn.format.models import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
)

if TYPE_CHECKING:
    from runicorn.generate.generator import (
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
        from runicorn.generate import generator

        return getattr(generator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

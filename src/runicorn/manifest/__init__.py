"""Server side of manifest-based sync: the manifest model and its generator."""

from runicorn.manifest.generator import GenerationReport, ManifestGenerationError, ManifestGenerator
from runicorn.manifest.models import (
    ExperimentEntry,
    FileEntry,
    ManifestFormat,
    ManifestType,
    SyncManifest,
)

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

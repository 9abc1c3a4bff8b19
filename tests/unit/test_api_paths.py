"""The API document's import paths and signatures (``/work/shared/spec`` section 1) keep working.

The document names ``runicorn.manifest``, ``runicorn.remote_storage`` and its
``manifest_sync`` and ``cache_manager`` modules; the code lives in the layered packages now,
and these paths are re-export shims. Each name must be the very object of its new home (not a
copy that could drift), and the parameters the document lists must come first, in its order,
with its defaults; anything we added is keyword-only.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import runicorn

# (document's path, name, home module)
DOCUMENT_PATHS = [
    ("runicorn.manifest", "ManifestGenerator", "runicorn.generate.generator"),
    ("runicorn.manifest", "ManifestType", "runicorn.format.models"),
    ("runicorn.manifest", "ManifestFormat", "runicorn.format.models"),
    ("runicorn.manifest", "ExperimentEntry", "runicorn.format.models"),
    ("runicorn.manifest", "FileEntry", "runicorn.format.models"),
    ("runicorn.manifest", "SyncManifest", "runicorn.format.models"),
    ("runicorn.remote_storage", "MetadataSyncService", "runicorn.sync.service"),
    ("runicorn.remote_storage.manifest_sync", "ManifestSyncClient", "runicorn.sync.client"),
    ("runicorn.remote_storage.cache_manager", "LocalCacheManager", "runicorn.sync.cache"),
    # not the document's, but where code written against Runicorn 0.4.x imports it from
    ("runicorn.remote_storage", "LocalCacheManager", "runicorn.sync.cache"),
]

_NO_DEFAULT = inspect.Parameter.empty


@pytest.mark.parametrize(("path", "name", "home"), DOCUMENT_PATHS)
def test_document_path_gives_the_object_of_its_home(path: str, name: str, home: str) -> None:
    shim = importlib.import_module(path)
    value = getattr(shim, name)
    assert value is getattr(importlib.import_module(home), name)
    assert name in shim.__all__, f"{path}.__all__ should list {name}"
    assert getattr(runicorn, name) is value, f"runicorn.{name} differs from {path}.{name}"


def test_from_imports_as_the_document_writes_them() -> None:
    namespace: dict[str, Any] = {}
    exec(  # the document's own lines, verbatim
        "from runicorn.manifest import ManifestGenerator, ManifestType\n"
        "from runicorn.manifest import ManifestFormat, ExperimentEntry, FileEntry, SyncManifest\n"
        "from runicorn.remote_storage.manifest_sync import ManifestSyncClient\n"
        "from runicorn.remote_storage import MetadataSyncService\n"
        "from runicorn.remote_storage.cache_manager import LocalCacheManager\n",
        namespace,
    )
    names = {"ManifestGenerator", "ManifestType", "ManifestFormat", "ExperimentEntry"}
    names |= {"FileEntry", "SyncManifest", "ManifestSyncClient", "MetadataSyncService"}
    names |= {"LocalCacheManager"}
    assert names <= set(namespace)


def _assert_leading_parameters(
    function: Callable[..., Any], expected: list[tuple[str, object]], *, method: bool
) -> None:
    """``expected`` (name, default) come first, positional-or-keyword; the rest keyword-only."""
    parameters = list(inspect.signature(function).parameters.values())
    if method:
        assert parameters[0].name == "self"
        parameters = parameters[1:]
    leading = [(p.name, p.default) for p in parameters[: len(expected)]]
    assert leading == expected, f"{function.__qualname__}: {leading} != {expected}"
    for parameter in parameters[: len(expected)]:
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, parameter
    extras = parameters[len(expected) :]
    positional_extras = [p.name for p in extras if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert not positional_extras, (
        f"{function.__qualname__}: parameters beyond the document's must be keyword-only: "
        f"{positional_extras}"
    )


def test_manifest_generator_signature() -> None:
    from runicorn.manifest import ManifestGenerator, ManifestType

    _assert_leading_parameters(
        ManifestGenerator,
        [
            ("remote_root", _NO_DEFAULT),
            ("output_dir", None),
            ("active_window_seconds", 3600),
            ("incremental", True),
        ],
        method=False,
    )
    _assert_leading_parameters(
        ManifestGenerator.generate,
        [("manifest_type", ManifestType.FULL), ("output_path", None)],
        method=True,
    )
    assert {ManifestType.FULL.value, ManifestType.ACTIVE.value} == {"full", "active"}


def test_sync_manifest_has_total_experiments() -> None:
    from runicorn.manifest import SyncManifest

    assert isinstance(inspect.getattr_static(SyncManifest, "total_experiments"), property)


def test_manifest_sync_client_signature_and_tuning_knobs() -> None:
    from runicorn.remote_storage.manifest_sync import ManifestSyncClient

    _assert_leading_parameters(
        ManifestSyncClient,
        [
            ("sftp_client", _NO_DEFAULT),
            ("remote_root", _NO_DEFAULT),
            ("cache_dir", _NO_DEFAULT),
            ("jitter_max", 5.0),
        ],
        method=False,
    )
    _assert_leading_parameters(ManifestSyncClient.sync, [("progress_callback", None)], method=True)
    assert ManifestSyncClient.__dict__["MAX_WORKERS"] == 3
    assert ManifestSyncClient.__dict__["BATCH_SIZE"] == 5


def test_metadata_sync_service_signature() -> None:
    from runicorn.remote_storage import MetadataSyncService

    _assert_leading_parameters(
        MetadataSyncService,
        [
            ("ssh_session", _NO_DEFAULT),
            ("sftp_client", _NO_DEFAULT),
            ("remote_root", _NO_DEFAULT),
            ("cache_manager", _NO_DEFAULT),
            ("use_manifest_sync", True),
            ("manifest_sync_jitter", 5.0),
        ],
        method=False,
    )
    _assert_leading_parameters(MetadataSyncService.sync_all, [], method=True)


def test_local_cache_manager_signature() -> None:
    from runicorn.remote_storage.cache_manager import LocalCacheManager

    _assert_leading_parameters(LocalCacheManager, [("root_dir", _NO_DEFAULT)], method=False)


@pytest.mark.parametrize("name", runicorn.__all__)
def test_every_name_of_the_facade_resolves(name: str) -> None:
    value = getattr(runicorn, name)
    assert value is not None
    assert name in dir(runicorn)


def test_the_facade_refuses_unknown_names() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = runicorn.no_such_name  # type: ignore[attr-defined]

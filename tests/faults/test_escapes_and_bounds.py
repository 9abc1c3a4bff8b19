"""A server that swaps links into a listed tree, and manifests built to exhaust the client.

Issue 20, items 3 and 4: a run's ``media/`` replaced by a link to another directory (holding
files of the listed names and sizes) after the manifest was made must not get that
directory's content into the cache, over the local remote and over real sshd; a gzip bomb
of 2 GiB is refused with the client's peak memory under 300 MB (measured in a subprocess);
a manifest listing more entries than the reader allows is refused before it is parsed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from harness.lab import Lab, cache_files, make_lab, temp_files
from runicorn._sys import beneath
from runicorn.core.backend import Backend
from runicorn.format.compression import KEEP_BYTES, compress, decompress_capped
from runicorn.format.models import ManifestFormat, SyncManifest
from runicorn.sync.client import ManifestSyncClient
from runicorn.transport.local_remote import LocalRemote

GIB = 1024**3
MIB = 1024 * 1024
SECRET = b"outside the root: must never reach the cache\n"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["local", "local-chain", pytest.param("sftp", marks=pytest.mark.sshd)])
def sync_client(
    request: pytest.FixtureRequest, tmp_path: Path, backend: Backend, monkeypatch
) -> Iterator[Callable[..., ManifestSyncClient]]:
    """Build clients of a lab over the local remote (``openat2``, or the per-component
    chain it falls back to) or over real sshd."""
    kind = request.param
    if kind == "local-chain":
        monkeypatch.setattr(beneath._Openat2, "get", classmethod(lambda cls: None))
    made: list[ManifestSyncClient] = []

    def build(lab: Lab, cache: Path, **options: object) -> ManifestSyncClient:
        if kind == "sftp":
            sftp = request.getfixturevalue("sftp")
            client = ManifestSyncClient(sftp, str(lab.root), cache, 0.0, backend=backend, **options)
        else:
            client = ManifestSyncClient(
                None,
                str(lab.root),
                cache,
                0.0,
                backend=backend,
                remote=LocalRemote(lab.root),
                **options,
            )
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


def _media_run(lab: Lab) -> tuple[str, dict[str, int]]:
    """A run with media files, and their names and sizes as the manifest lists them."""
    document = orjson.loads((lab.manifest_dir / "full_manifest.json").read_bytes())
    for experiment in document["experiments"]:
        media = {
            entry["path"]: entry["size"]
            for entry in experiment["files"]
            if "/media/" in entry["path"]
        }
        if media:
            return next(iter(media)).rsplit("/media/", 1)[0], media
    raise AssertionError("the sample lab has no run with media files")


def _swap_media_for_a_link(lab: Lab, tmp_path: Path) -> tuple[str, dict[str, int], Path]:
    """Replace a run's media/ by a link to a directory holding files of the listed names and
    sizes (secret content), after the manifest was published."""
    run, media = _media_run(lab)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for path, size in media.items():
        (decoy / path.rsplit("/", 1)[1]).write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    shutil.rmtree(lab.root / run / "media")
    os.symlink(decoy, lab.root / run / "media")
    return run, media, decoy


# --------------------------------------------------------------------------- no way out of the root


def test_a_media_directory_swapped_for_a_link_is_not_read_through(
    tmp_path: Path, backend: Backend, sync_client
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    _run, media, _decoy = _swap_media_for_a_link(lab, tmp_path)
    cache = tmp_path / "cache"

    stats = sync_client(lab, cache).sync()

    copied = cache_files(cache)
    assert not [path for path, data in copied.items() if SECRET[:20] in data]
    assert not set(media) & set(copied)
    assert set(stats["failed_files"]) == set(media)
    for message in stats["failed_files"].values():
        assert "symbolic link" in message
    assert stats["files_synced"] == lab.info.listed_files - len(media)
    assert temp_files(cache) == []


def test_a_run_directory_swapped_for_a_link_is_not_read_through(
    tmp_path: Path, backend: Backend, sync_client
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    run, _media = _media_run(lab)
    decoy = tmp_path / "decoy-run"
    shutil.copytree(lab.root / run, decoy)
    for path in decoy.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            path.write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    shutil.rmtree(lab.root / run)
    os.symlink(decoy, lab.root / run)
    cache = tmp_path / "cache"

    stats = sync_client(lab, cache).sync()

    assert not [path for path, data in cache_files(cache).items() if SECRET[:20] in data]
    failed = stats["failed_files"]
    assert failed and all(path.startswith(run + "/") for path in failed)
    assert all("symbolic link" in message for message in failed.values())


def test_local_remote_listdir_refuses_a_linked_directory_on_the_way(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "p").mkdir(parents=True)
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", root / "p" / "link")
    with LocalRemote(root) as remote:
        assert [entry.name for entry in remote.listdir("p")] == ["link"]
        with pytest.raises(OSError, match="symbolic link"):
            remote.listdir("p/link")
        with pytest.raises(OSError, match="symbolic link"):
            remote.read_prefix("p/link/x", 10)


def test_a_local_root_that_is_a_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with LocalRemote(tmp_path / "file") as remote, pytest.raises(NotADirectoryError) as caught:
        remote.listdir("")
    assert str(tmp_path / "file") in str(caught.value)


# --------------------------------------------------------------------------- bounded decode


def _zeros_bomb(path: Path, size: int) -> Path:
    """A valid gzip stream inflating to ``size`` zero bytes, written without ``size`` bytes
    in memory: a 16 MiB block deflated after a full flush is the same piece every time."""
    block = bytes(16 * MIB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    with open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        for _ in range(size // len(block)):
            handle.write(piece)
        handle.write(deflate.flush())
        handle.write(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return path


_MEASURED_SYNC = textwrap.dedent(
    """
    import resource, subprocess, sys
    child = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(child.returncode, peak_kib)
    """
)

_BOMBED_SYNC = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from runicorn.core.backend import load_backend
    from runicorn.sync.client import ManifestSyncClient
    from runicorn.transport.local_remote import LocalRemote
    root, cache, backend = sys.argv[1:]
    client = ManifestSyncClient(
        None, root, Path(cache), 0.0, backend=load_backend(backend), remote=LocalRemote(root)
    )
    try:
        client.sync()
    except ValueError as error:
        print(error)
        sys.exit(7)
    finally:
        client.close()
    """
)


def test_a_two_gibibyte_gzip_bomb_is_refused_within_300_mb_of_client_memory(
    tmp_path: Path, backend: Backend
) -> None:
    lab = make_lab(tmp_path, backend, runs=2)
    for name in ("full_manifest.json", "full_manifest.json.gz"):
        (lab.manifest_dir / name).unlink()
    _zeros_bomb(lab.manifest_dir / "full_manifest.json.gz", 2 * GIB)
    assert (lab.manifest_dir / "full_manifest.json.gz").stat().st_size < 4 * MIB

    measured = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURED_SYNC,
            _BOMBED_SYNC,
            str(lab.root),
            str(tmp_path / "cache"),
            backend.name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    returncode, peak_kib = (int(word) for word in measured.stdout.split()[-2:])
    assert returncode == 7, measured.stdout + measured.stderr
    assert "decompresses to more than" in measured.stdout
    assert peak_kib * 1024 <= 300 * 1000 * 1000, f"peak RSS {peak_kib} KiB"
    assert cache_files(tmp_path / "cache") == {}


def test_a_stream_larger_than_what_is_kept_is_inflated_again_exactly(monkeypatch) -> None:
    monkeypatch.setattr("runicorn.format.compression.KEEP_BYTES", 3 * MIB)
    monkeypatch.setattr("runicorn.format.compression._STEP_BYTES", 256 * 1024)
    data = os.urandom(2 * MIB) + bytes(5 * MIB) + b"end"
    assert bytes(decompress_capped(compress(data), len(data))) == data
    with pytest.raises(ValueError, match=f"more than {len(data) - 1} bytes"):
        decompress_capped(compress(data), len(data) - 1)
    assert KEEP_BYTES >= 64 * MIB  # the default keeps a large lab's manifest in one pass


def _manifest_with(files: int) -> bytes:
    files_json = [
        {"path": f"p/e/runs/r/f{n}", "size": 1, "mtime": 1.0, "priority": 4} for n in range(files)
    ]
    document = {
        "format_version": "1.0",
        "manifest_type": "full",
        "revision": 1,
        "snapshot_id": "s",
        "generated_at": 1.0,
        "server_hostname": "h",
        "remote_root": "/r",
        "experiments": [
            {
                "run_id": "r",
                "project": "p",
                "name": "e",
                "status": "finished",
                "created_at": 1.0,
                "updated_at": 1.0,
                "files": files_json,
            }
        ],
    }
    return orjson.dumps(document)


def test_a_manifest_with_more_entries_than_allowed_is_refused_before_parsing(
    monkeypatch,
) -> None:
    text = _manifest_with(100)  # one run and 100 files: 101 entries
    assert SyncManifest.from_json(text, max_entries=101).total_files == 100
    assert SyncManifest.from_gzip(compress(text), max_entries=101).total_files == 100

    def no_parse(_data: object) -> object:
        raise AssertionError("parsed a manifest the entries cap refuses")

    monkeypatch.setattr("runicorn.format.models.orjson.loads", no_parse)
    for decode in (
        lambda: SyncManifest.from_json(text, max_entries=99),
        lambda: SyncManifest.from_gzip(compress(text), max_entries=99),
    ):
        with pytest.raises(ValueError, match="more than 99 entries"):
            decode()


def test_a_flat_array_of_numbers_is_refused_by_its_value_count() -> None:
    body = b"[" + b"1," * (1024 * 1024) + b"1]"
    with pytest.raises(ValueError, match="more JSON values"):
        SyncManifest.from_gzip(compress(body), max_entries=1000)
    with pytest.raises(ValueError, match="more JSON values"):
        SyncManifest.from_json(body, max_entries=1000)


def test_the_entries_cap_is_a_client_option_and_names_itself(
    tmp_path: Path, backend: Backend, sync_client
) -> None:
    lab = make_lab(tmp_path, backend, runs=4)
    with pytest.raises(ValueError, match="max_manifest_entries, --max-manifest-entries"):
        sync_client(lab, tmp_path / "cache", max_manifest_entries=10).sync()
    assert cache_files(tmp_path / "cache") == {}
    stats = sync_client(lab, tmp_path / "cache", max_manifest_entries=10_000).sync()
    assert stats["files_synced"] == lab.info.listed_files
    assert ManifestFormat.MAX_ENTRIES >= 1_000_000

"""Hostile trees (issue 20): names and depths no sane lab holds, on both backends.

What a server's tree may hold is decided by its users and their tools, not by us. Whatever it
holds, generation must not fail, the manifest must carry only names every client accepts
(the name rule of :mod:`runicorn.format.names`), what was left out must be listed in the
manifest's ``problems``, and a sync after it must succeed. The legacy walk over the same tree
must hold to the same rule. Trees are drawn by hypothesis (raw bytes, every Unicode
category, long names, deep paths, case and normalisation twins); the fixed cases below pin
what each attack gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runicorn.core.backend import Backend
from runicorn.format import names
from runicorn.format.layout import run_prefix
from runicorn.format.models import SyncManifest
from runicorn.generate.generator import ManifestGenerator
from runicorn.sync.cache import LocalCacheManager
from runicorn.sync.cache.tree import remove_tree
from runicorn.sync.client import ManifestSyncClient
from runicorn.sync.legacy import walk_remote
from runicorn.transport.local_remote import LocalRemote
from runicorn.transport.sftp_remote import SftpRemote

NOW = 1_760_000_000.0
NOBODY = 65534

# --------------------------------------------------------------------------- strategies

_BYTE_NAMES = st.binary(min_size=1, max_size=20).filter(
    lambda name: b"/" not in name and b"\0" not in name and name not in (b".", b"..")
)
"""Any bytes a Linux file name may hold: most of them are not UTF-8."""

_TEXT_NAMES = (
    st.text(
        st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=12,
    )
    .filter(lambda name: name not in (".", ".."))
    .map(lambda name: name.encode("utf-8"))
)
"""Names from every Unicode category (controls, formats, separators, unassigned...)."""

_SPECIAL_NAMES = st.sampled_from(
    [
        b".runicorn-tmp-meta.json.1",
        b"back\\slash",
        b"C:",
        b"caf\xc3\xa9",  # NFC
        b"cafe\xcc\x81",  # NFD of the same
        b"Log.txt",
        b"log.txt",
        b"\x1b[2J\x1b[31mred",
        b"ok\nINFO forged line",
        b"rtl\xe2\x80\xaegnp.exe",  # U+202E right-to-left override
        b"zero\xe2\x80\x8bwidth",  # U+200B
        b"line\xe2\x80\xa8sep",  # U+2028
        b"latin1-\xe9",
        b"n" * 255,
        "日本語".encode(),
    ]
)

_NAME = st.one_of(
    st.sampled_from([b"a", b"b", b"meta.json", b"events.jsonl", b"media"]),
    _BYTE_NAMES,
    _TEXT_NAMES,
    _SPECIAL_NAMES,
)

_COMPONENT = st.one_of(st.sampled_from([b"p", b"q", b"e", b"r1", b"r2"]), _NAME)


@st.composite
def _trees(draw: st.DrawFn) -> list[bytes]:
    """Relative paths of files (bytes): runs of both layouts, hostile names at every level,
    files in subdirectories, and now and then a path near or beyond the depth limit."""
    paths: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        project, name, run_id = draw(_COMPONENT), draw(_COMPONENT), draw(_COMPONENT)
        if draw(st.booleans()):
            run = b"/".join([project, name, b"runs", run_id])
        else:
            run = b"/".join([b"runs", name, run_id])
            paths.append(run + b"/meta.json")
        for _ in range(draw(st.integers(1, 5))):
            below = [draw(_NAME) for _ in range(draw(st.integers(0, 2)))]
            paths.append(b"/".join([run, *below, draw(_NAME)]))
        depth = draw(st.sampled_from([0, 0, 0, names.MAX_DEPTH - 6, names.MAX_DEPTH + 3]))
        if depth:
            paths.append(b"/".join([run, *[b"d"] * depth, b"f"]))
    return paths


# --------------------------------------------------------------------------- helpers


def _plant(root: Path, paths: list[bytes]) -> list[bytes]:
    """Create the files (a path that cannot be created is skipped: a file where a directory
    of another path is, and so on); returns those created."""
    made: list[bytes] = []
    top = os.fsencode(root)
    for path in paths:
        full = top + b"/" + path
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "xb") as handle:
                handle.write(b"{}\n")  # valid JSON, and a whole line
        except OSError:
            continue
        made.append(path)
    return made


def _generate(root: Path, backend: Backend) -> SyncManifest:
    ManifestGenerator(root, backend=backend, clock=lambda: NOW, hostname="lab").generate()
    return SyncManifest.from_json((root / ".runicorn" / "full_manifest.json").read_bytes())


def _local_client(root: Path, cache: Path, backend: Backend, **options: object):
    return ManifestSyncClient(
        None, str(root), cache, 0.0, backend=backend, remote=LocalRemote(str(root)), **options
    )


def _cache_files(cache: Path) -> set[str]:
    found = set()
    for directory, dirnames, filenames in os.walk(cache):
        dirnames[:] = [d for d in dirnames if d != ".runicorn-cache"]
        found.update(os.path.relpath(os.path.join(directory, f), cache) for f in filenames)
    return found


def _assert_every_path_is_accepted(manifest: SyncManifest) -> None:
    """What a client would refuse is never listed: no skipped entry, no refused path, no
    two paths (or run directories) that one case-insensitive file system would merge."""
    assert manifest.skipped == []
    paths = [entry.path for entry in manifest.iter_files()]
    assert [path for path in paths if names.path_problem(path) is not None] == []
    assert len({names.fold(path) for path in paths}) == len(paths)
    runs = [exp.prefix for exp in manifest.experiments]
    assert len({names.fold(prefix) for prefix in runs}) == len(runs)


def _refused_visibly(path: str) -> bool:
    """Whether the rule refuses a planted path that no hidden name above the run level keeps
    out silently (below ``runs/`` a run may lie at any depth: any directory there may be a
    layout level)."""
    parts = path.split("/")
    layout_levels = parts[:-1] if parts[0] == "runs" else parts[:4]
    if any(part.startswith(".") for part in layout_levels):
        return False
    return names.path_problem(path) is not None


def _assert_refused_paths_are_reported(planted: list[bytes], manifest: SyncManifest) -> None:
    """Every planted file the rule refuses lies under a problem the manifest lists."""
    problems = [path for path, _ in manifest.problems or ()]
    for raw in planted:
        path = os.fsdecode(raw)
        if not _refused_visibly(path):
            continue
        parts = path.split("/")
        prefixes = {names.json_safe("/".join(parts[:end])) for end in range(1, len(parts) + 1)}
        assert prefixes & set(problems), (path, problems)


# --------------------------------------------------------------------------- properties


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tree=_trees())
def test_any_tree_generates_a_manifest_every_client_accepts_and_syncs(backend, tree):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "lab"
        root.mkdir()
        planted = _plant(root, tree)
        manifest = _generate(root, backend)
        _assert_every_path_is_accepted(manifest)
        _assert_refused_paths_are_reported(planted, manifest)
        cache = Path(scratch) / "cache"
        client = _local_client(root, cache, backend)
        try:
            stats = client.sync()
        finally:
            client.close()
        assert (stats["failed_count"], stats["files_synced"]) == (0, manifest.total_files)
        assert _cache_files(cache) == {entry.path for entry in manifest.iter_files()}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tree=_trees())
def test_the_legacy_walk_of_any_tree_lists_only_accepted_names(tree):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "lab"
        root.mkdir()
        planted = _plant(root, tree)
        report = walk_remote(LocalRemote(str(root)), str(root), hostname="lab", clock=lambda: NOW)
        _assert_every_path_is_accepted(report.manifest)
        if any(_refused_visibly(os.fsdecode(raw)) for raw in planted):
            assert not report.complete  # it says it missed something: it deletes nothing


# --------------------------------------------------------------------------- fixed attacks


def test_a_non_utf8_name_no_longer_stops_the_lab(backend, tmp_path):
    """The attack that stopped a whole lab: one file with a Latin-1 name."""
    root = tmp_path / "lab"
    _plant(root, [b"p/e/runs/r1/meta.json", b"p/e/runs/r1/caf\xe9.png", b"p/e/runs/r2/meta.json"])
    manifest = _generate(root, backend)
    assert [exp.run_id for exp in manifest.experiments] == ["r1", "r2"]
    assert manifest.problems == [("p/e/runs/r1/caf\\xe9.png", names.REASON_NOT_UTF8)]


def test_names_a_client_rejects_are_never_published(backend, tmp_path):
    root = tmp_path / "lab"
    _plant(
        root,
        [
            b"p/e/runs/r/meta.json",
            b"p/e/runs/r/.runicorn-tmp-meta.json.x",  # the client's own temp pattern
            b"p/e/runs/r/a\\b.png",  # a backslash sent every sync to the legacy walk
            b"p/e/runs/r/\x1b]0;owned\x07",
            b"p/e/runs/r/Vision",
            b"p/e/runs/r/vision",
            b"Vision/e/runs/r/meta.json",
            b"vision/e/runs/r/meta.json",
        ],
    )
    manifest = _generate(root, backend)
    assert [entry.path for entry in manifest.iter_files()] == [
        "Vision/e/runs/r/meta.json",
        "p/e/runs/r/Vision",
        "p/e/runs/r/meta.json",
    ]
    assert {path: reason.split(" from ")[0] for path, reason in manifest.problems or ()} == {
        "p/e/runs/r/.runicorn-tmp-meta.json.x": names.REASON_RESERVED,
        "p/e/runs/r/a\\b.png": names.REASON_BACKSLASH,
        "p/e/runs/r/\x1b]0;owned\x07": names.REASON_CONTROL,
        "p/e/runs/r/vision": "differs only in case or Unicode normalisation",
        "vision/e/runs/r": "differs only in case or Unicode normalisation",
    }


DEEP = 1500


def _deep_chain(top: Path, depth: int, leaf: str = "f") -> None:
    """``top/d/d/.../d/leaf`` ``depth`` levels deep, made through descriptors (the path is
    far beyond PATH_MAX)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open(leaf, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied iteratively afterwards: a tree 1,500 levels deep left there
    would break every later recursive walk of pytest's temp directory (``rglob``, its own
    cleanup)."""
    yield tmp_path
    for child in list(tmp_path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)


def test_a_tree_1500_levels_deep_is_reported_and_the_rest_syncs(backend, deep_tmp):
    tmp_path = deep_tmp
    root = tmp_path / "lab"
    _plant(root, [b"p/e/runs/r/meta.json", b"p/e/runs/r2/meta.json"])
    _deep_chain(root / "p/e/runs/r", DEEP)
    _deep_chain(root / "runs/deep", DEEP, "meta.json")
    manifest = _generate(root, backend)
    too_deep = {path for path, reason in manifest.problems or () if reason == names.REASON_TOO_DEEP}
    assert too_deep == {
        "p/e/runs/r/" + "/".join(["d"] * (names.MAX_DEPTH - 3)),
        "runs/deep/" + "/".join(["d"] * (names.MAX_DEPTH - 1)),
    }
    client = _local_client(root, tmp_path / "cache", backend)
    try:
        first, second = client.sync(), client.sync()
    finally:
        client.close()
    assert (first["failed_count"], first["files_synced"]) == (0, 2)
    assert second["failed_count"] == 0


def test_a_cache_holding_a_tree_1500_levels_deep_still_cleans_measures_and_deletes(
    backend, deep_tmp
):
    """What an older version could sync: every later sync then failed with 'maximum
    recursion depth exceeded' (temp-file cleanup, disk usage, remove_run)."""
    tmp_path = deep_tmp
    root = tmp_path / "lab"
    _plant(root, [b"p/e/runs/r/meta.json", b"p/e/runs/gone/meta.json"])
    _generate(root, backend)
    cache = tmp_path / "cache"
    client = _local_client(root, cache, backend, delete=True, allow_mass_delete=True)
    try:
        client.sync()
        _deep_chain(cache / "p/e/runs/gone", DEEP, ".runicorn-tmp-x.1")
        _deep_chain(cache / "p/e/runs/r/deep", DEEP, ".runicorn-tmp-y.1")
        manager = LocalCacheManager(cache)
        assert manager.disk_usage() > 0
        assert len(manager.tree.temp_files()) == 2
        assert manager.tree.clean_temp_files() == 2
        shutil.rmtree(root / "p/e/runs/gone")
        _generate(root, backend)
        stats = client.sync()
    finally:
        client.close()
    assert (stats["failed_count"], stats["deleted_count"]) == (0, 1)
    assert not (cache / "p/e/runs/gone").exists()


def test_escape_sequences_in_names_never_reach_the_terminal(tmp_path):
    root = tmp_path / "lab"
    _plant(root, [b"p/e/runs/r/meta.json", b"p/e/runs/r/\x1b[2J\x1b[31mred\nINFO forged"])
    result = subprocess.run(
        [sys.executable, "-m", "runicorn", "generate-manifest", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "\x1b" not in result.stdout + result.stderr
    assert "\\x1b[2J\\x1b[31mred\\nINFO forged" in result.stdout
    assert "\nINFO forged" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- unreadable project


@pytest.fixture
def shared_lab() -> Iterator[Path]:
    """A lab the unprivileged user ``nobody`` owns, outside pytest's private temp tree."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the generator as the user nobody")
    base = Path(tempfile.mkdtemp(prefix="runicorn-hostile-"))
    base.chmod(0o755)
    try:
        yield base / "lab"
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _generate_as_nobody(root: Path) -> int:
    """``runicorn generate-manifest --root root`` as the user nobody (root reads everything,
    whatever the modes), in a forked child; its exit code."""
    from click.testing import CliRunner

    from runicorn.cli import main

    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = CliRunner().invoke(main, ["generate-manifest", "--root", str(root)])
            code = result.exit_code
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_an_unreadable_project_is_published_as_a_problem_and_sync_delete_keeps_it(
    backend, shared_lab, tmp_path
):
    root = shared_lab
    _plant(
        root,
        [
            b"open/e/runs/r1/meta.json",
            b"open/e/runs/r2/meta.json",
            b"closed/e/runs/r3/meta.json",
            b"closed/e/runs/r4/meta.json",
        ],
    )
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(root)], check=True)
    assert _generate_as_nobody(root) == 0
    cache = tmp_path / "cache"
    client = _local_client(root, cache, backend, delete=True, allow_mass_delete=True)
    try:
        client.sync()
        (root / "closed").chmod(0o000)
        subprocess.run(["rm", "-rf", str(root / "open/e/runs/r2")], check=True)
        assert _generate_as_nobody(root) == 1  # published, with the problem
        manifest = SyncManifest.from_json((root / ".runicorn/full_manifest.json").read_bytes())
        assert manifest.problems == [("closed", "unreadable: Permission denied")]
        stats = client.sync()
    finally:
        (root / "closed").chmod(0o755)
        client.close()
    # r2 left the server and is deleted; what lies in the unreadable project is kept
    assert (stats["deleted_count"], stats.get("deletion_protected")) == (1, 2)
    assert sorted(os.listdir(cache / "closed/e/runs")) == ["r3", "r4"]
    assert not (cache / "open/e/runs/r2").exists()
    assert run_prefix("closed", "e", "r3")[:-1] in {
        f"{p}/{n}/runs/{r}" for p, n, r in LocalCacheManager(cache).runs_of_remote(client.remote_id)
    }


HOSTILE = [
    b"p/e/runs/r/meta.json",
    b"p/e/runs/r/media/ok.png",
    b"p/e/runs/r/latin1-\xe9.png",
    b"p/e/runs/r/\x1b[2Jclear",
    b"p/e/runs/r/rtl\xe2\x80\xaegnp.exe",
    b"p/e/runs/r/a\\b",
    b"p/e/runs/r/.runicorn-tmp-meta.json.1",
    b"p/e/runs/r/Log.txt",
    b"p/e/runs/r/log.txt",
    b"p/e/runs/caf\xc3\xa9/meta.json",
    b"p/e/runs/cafe\xcc\x81/meta.json",
    b"runs/x\xff/r/meta.json",
    b"runs/ok/r/meta.json",
]


def test_a_hostile_tree_syncs_over_sshd_by_manifest_and_by_the_legacy_walk(
    backend, tmp_path, sftp
):
    root = tmp_path / "lab"
    _plant(root, HOSTILE)
    manifest = _generate(root, backend)
    listed = {entry.path for entry in manifest.iter_files()}
    assert listed == {
        "p/e/runs/cafe\u0301/meta.json",
        "p/e/runs/r/Log.txt",
        "p/e/runs/r/media/ok.png",
        "p/e/runs/r/meta.json",
        "runs/ok/r/meta.json",
    }
    by_manifest = ManifestSyncClient(sftp, str(root), tmp_path / "cache", 0.0, backend=backend)
    try:
        stats = by_manifest.sync()
    finally:
        by_manifest.close()
    assert (stats["failed_count"], stats["files_synced"]) == (0, len(listed))
    assert _cache_files(tmp_path / "cache") == listed

    with SftpRemote(sftp, str(root), timeout=20) as remote:
        report = walk_remote(remote, str(root), hostname="lab")
    assert {entry.path for entry in report.manifest.iter_files()} == listed
    assert not report.complete

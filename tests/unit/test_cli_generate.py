"""``runicorn generate-manifest``: every flag, the summary, and the exit codes 0 / 1 / 130.

The command picks its backend with ``active_backend()``; the ``use_backend`` fixture points
that at the backend under test, so the CLI is exercised on both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from runicorn import __version__
from runicorn._sys.atomic import TEMP_PREFIX
from runicorn.cli import main
from runicorn.format.names import REASON_CONTROL, REASON_NOT_UTF8
from runicorn.manifest import ManifestGenerator, SyncManifest

SUMMARY_KEYS = {
    "problems",
    "type",
    "output",
    "compressed",
    "revision",
    "snapshot_id",
    "published",
    "layout",
    "experiments",
    "files",
    "total_bytes",
    "warnings",
    "files_hashed",
    "files_reused",
    "duration",
    "backend",
}


def _write(path: Path, data: str, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def _run(
    root: Path, name: str, run_id: str, *, status: str = "finished", age: float, project="proj"
) -> None:
    run = root / project / name / "runs" / run_id
    _write(run / "meta.json", f'{{"id":"{run_id}"}}', age)
    _write(run / "status.json", f'{{"status":"{status}"}}', age)
    _write(run / "events.jsonl", '{"step":0}\n{"step":1}\n', age)
    _write(run / "logs.txt", "hello\n", age)
    _write(run / "media" / "a.png", "png", age)
    _write(run / "events.jsonl.lock", "", age)


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """Three runs: one finished a day ago, one finished 30 minutes ago, one running."""
    root = tmp_path / "lab"
    _run(root, "old", "20240101_000000_000001", age=86_400)
    _run(root, "recent", "20240101_000000_000002", age=1_800)
    _run(root, "live", "20240101_000000_000003", status="running", age=7_200)
    return root


@pytest.fixture(autouse=True)
def use_backend(backend, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("runicorn.generate.generator.active_backend", lambda: backend)
    return backend


@pytest.fixture
def cli():
    """``cli(*args)``: invoke ``runicorn generate-manifest`` in-process; stdout/stderr apart."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, ["generate-manifest", *args], catch_exceptions=False)

    return invoke


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def _manifest(path: Path) -> SyncManifest:
    return SyncManifest.from_json(path.read_bytes())


# --- flags -----------------------------------------------------------------------------------


def test_root_defaults_to_the_current_directory(lab, cli, monkeypatch):
    monkeypatch.chdir(lab)
    result = cli()
    assert result.exit_code == 0, result.output
    assert _manifest(lab / ".runicorn" / "full_manifest.json").total_experiments == 3
    assert (lab / ".runicorn" / "full_manifest.json.gz").is_file()


def test_root_selects_the_experiments_root(lab, cli):
    summary = _summary(cli("--root", str(lab), "--json"))
    assert summary["output"] == str(lab / ".runicorn" / "full_manifest.json")
    assert summary["experiments"] == 3


def test_output_into_a_missing_directory_creates_it(lab, tmp_path, cli):
    target = tmp_path / "not" / "yet" / "there" / "lab.json"
    summary = _summary(cli("--root", str(lab), "--output", str(target), "--json"))
    assert (summary["output"], summary["compressed"]) == (str(target), str(target) + ".gz")
    assert _manifest(target).total_experiments == 3
    gz = SyncManifest.from_gzip(Path(str(target) + ".gz").read_bytes())
    assert gz == _manifest(target)


def test_full_is_the_default(lab, cli):
    assert _summary(cli("--root", str(lab), "--json"))["type"] == "full"


def test_full_flag_writes_the_full_manifest(lab, cli):
    summary = _summary(cli("--root", str(lab), "--full", "--json"))
    assert (summary["type"], Path(summary["output"]).name) == ("full", "full_manifest.json")


def test_active_flag_writes_the_active_manifest_of_recent_and_running_runs(lab, cli):
    summary = _summary(cli("--root", str(lab), "--active", "--json"))
    assert (summary["type"], Path(summary["output"]).name) == ("active", "active_manifest.json")
    listed = [exp.name for exp in _manifest(Path(summary["output"])).experiments]
    assert listed == ["live", "recent"]


def test_active_window_widens_the_active_selection(lab, cli):
    summary = _summary(cli("--root", str(lab), "--active", "--active-window", "172800", "--json"))
    assert summary["experiments"] == 3


def test_active_window_zero_keeps_only_running_runs(lab, cli):
    summary = _summary(cli("--root", str(lab), "--active", "--active-window", "0", "--json"))
    assert [exp.name for exp in _manifest(Path(summary["output"])).experiments] == ["live"]


def test_negative_active_window_is_a_usage_error(lab, cli):
    assert cli("--root", str(lab), "--active-window", "-5").exit_code == 2


def test_incremental_is_the_default_and_reuses_tails(lab, cli):
    cli("--root", str(lab))
    summary = _summary(cli("--root", str(lab), "--json"))
    assert (summary["files_hashed"], summary["files_reused"]) == (0, 6)


def test_no_incremental_rereads_every_tail_with_the_same_result(lab, cli):
    first = _summary(cli("--root", str(lab), "--json"))
    summary = _summary(cli("--root", str(lab), "--no-incremental", "--json"))
    assert (summary["files_hashed"], summary["files_reused"]) == (6, 0)
    assert (summary["revision"], summary["snapshot_id"]) == (
        first["revision"],
        first["snapshot_id"],
    )


def test_scan_threads_give_the_same_manifest(lab, tmp_path, cli):
    for project in ("a", "b", "c"):
        _run(lab, "exp", "20240101_000000_00000a", age=60, project=project)
    one = _summary(
        cli(
            "--root",
            str(lab),
            "--output",
            str(tmp_path / "1.json"),
            "--scan-threads",
            "1",
            "--json",
        )
    )
    four = _summary(
        cli(
            "--root",
            str(lab),
            "--output",
            str(tmp_path / "4.json"),
            "--scan-threads",
            "4",
            "--json",
        )
    )
    assert one["experiments"] == four["experiments"] == 6
    strip = lambda m: [exp.to_dict() for exp in m.experiments]  # noqa: E731
    assert strip(_manifest(tmp_path / "1.json")) == strip(_manifest(tmp_path / "4.json"))


@pytest.mark.parametrize("threads", ["0", "257", "many"])
def test_scan_threads_out_of_range_is_a_usage_error(lab, cli, threads):
    assert cli("--root", str(lab), "--scan-threads", threads).exit_code == 2


def test_json_prints_one_summary_object_on_stdout(lab, cli, use_backend):
    result = cli("--root", str(lab), "--json")
    summary = _summary(result)
    assert result.stdout.count("\n") == 1
    assert set(summary) == SUMMARY_KEYS
    manifest = _manifest(lab / ".runicorn" / "full_manifest.json")
    assert summary == summary | {
        "type": "full",
        "revision": 1,
        "snapshot_id": manifest.snapshot_id,
        "published": True,
        "layout": "project-name",
        "experiments": 3,
        "files": 15,
        "total_bytes": manifest.total_bytes,
        "warnings": 0,
        "problems": [],
        "backend": use_backend.name,
    }


def test_verbose_logs_progress_on_stderr(lab, cli):
    result = cli("--root", str(lab), "--verbose", "--json")
    assert "published full manifest revision 1" in result.stderr
    assert orjson.loads(result.stdout)["revision"] == 1


def test_without_verbose_stderr_is_quiet(lab, cli):
    result = cli("--root", str(lab), "--json")
    assert result.stderr == ""


# --- the summary block -------------------------------------------------------------------------


def test_summary_block_names_every_field(lab, cli):
    result = cli("--root", str(lab))
    assert result.exit_code == 0
    manifest = _manifest(lab / ".runicorn" / "full_manifest.json")
    lines = result.stdout.splitlines()
    assert lines[1] == "Manifest Generation Complete"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    assert {key: value.strip() for key, value in fields.items()} == {
        "Type": "full",
        "Output": str(lab / ".runicorn" / "full_manifest.json"),
        "Compressed": str(lab / ".runicorn" / "full_manifest.json.gz"),
        "Revision": "1",
        "Snapshot ID": manifest.snapshot_id,
        "Layout": "project-name",
        "Experiments": "3",
        "Files": "15",
        "Total Size": f"{manifest.total_bytes} B",
    }


def test_summary_says_when_nothing_changed(lab, cli):
    cli("--root", str(lab))
    result = cli("--root", str(lab))
    assert result.stdout.splitlines()[1] == "Manifest Unchanged"
    assert "Revision:      1 (unchanged" in result.stdout


def test_summary_counts_warnings_and_stderr_explains_them(lab, cli):
    _write(lab / "proj" / "old" / "runs" / "20240101_000000_000001" / "status.json", "{", 60)
    (lab / "proj" / "broken" / "runs").parent.mkdir(parents=True)
    (lab / "proj" / "broken" / "runs").write_text("not a directory")
    result = cli("--root", str(lab))
    assert "Warnings:      2 (details above on stderr)" in result.stdout
    assert "proj/broken/runs: not a directory" in result.stderr
    assert "status.json: not a valid JSON object" in result.stderr


# --- exit codes ----------------------------------------------------------------------------------


def test_missing_root_exits_1_with_a_hint(tmp_path, cli):
    result = cli("--root", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: experiments root")
    assert "--root" in result.stderr


def test_root_that_is_a_file_exits_1(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    assert cli("--root", str(tmp_path / "file")).exit_code == 1


def test_unwritable_output_exits_1(lab, tmp_path, cli):
    (tmp_path / "blocker").write_text("a file, not a directory")
    result = cli("--root", str(lab), "--output", str(tmp_path / "blocker" / "m.json"))
    assert result.exit_code == 1
    assert "cannot create the manifest directory" in result.stderr


def test_output_that_is_a_directory_exits_1_and_leaves_no_temp_file(lab, tmp_path, cli):
    (tmp_path / "taken.json").mkdir()
    assert cli("--root", str(lab), "--output", str(tmp_path / "taken.json")).exit_code == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_interrupt_exits_130_and_keeps_the_previous_manifest(lab, cli, monkeypatch):
    cli("--root", str(lab))
    path = lab / ".runicorn" / "full_manifest.json"
    before = path.read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ManifestGenerator, "_generate_locked", interrupted)
    result = cli("--root", str(lab))
    assert result.exit_code == 130
    assert "interrupted; the previous manifest is unchanged" in result.stderr
    assert path.read_bytes() == before


_PAUSING_CLI = r"""
import dataclasses, os, sys
import runicorn.generate.generator as generator
from runicorn.core.backend import load_backend
from runicorn.cli import main
root, backend_name, moment = sys.argv[1:4]
backend = load_backend(backend_name)

def pause():
    print("PAUSED", flush=True)
    sys.stdin.read()  # SIGINT arrives here

def hash_tails(*args):
    if moment == "scan":
        pause()
    return backend.hash_tails(*args)

real_replace = os.replace
def replace(src, dst, **dir_fds):
    if os.path.basename(dst) == moment:
        pause()
    return real_replace(src, dst, **dir_fds)
os.replace = replace
generator.active_backend = lambda: dataclasses.replace(backend, hash_tails=hash_tails)
main(["generate-manifest", "--root", root], prog_name="runicorn")
"""


@pytest.mark.parametrize("moment", ["scan", "full_manifest.json", "full_manifest.json.gz"])
def test_sigint_during_a_real_run_exits_130_and_cleans_up(lab, cli, use_backend, moment):
    cli("--root", str(lab))
    out = lab / ".runicorn"
    before = (out / "full_manifest.json").read_bytes()
    with open(lab / "proj/old/runs/20240101_000000_000001/events.jsonl", "a") as handle:
        handle.write('{"step":2}\n')
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_CLI, str(lab), use_backend.name, moment],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "PAUSED"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert "interrupted; the previous manifest is unchanged" in stderr
    if moment != "full_manifest.json.gz":
        assert (out / "full_manifest.json").read_bytes() == before
    assert SyncManifest.from_gzip((out / "full_manifest.json.gz").read_bytes()).revision == 1
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]


# --- version -------------------------------------------------------------------------------------


def test_version_prints_the_version_and_the_active_backend():
    from runicorn.core.backend import active_backend

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"runicorn {__version__} (backend: {active_backend().name})\n"


def test_version_reports_the_forced_pure_python_backend():
    env = {**os.environ, "RUNICORN_PURE_PYTHON": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "runicorn", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == f"runicorn {__version__} (backend: python)\n"


# --- the console script's process --------------------------------------------------------------


def _console_script(backend, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m runicorn ARGS`` in a child process, on the backend under test."""
    env = {k: v for k, v in os.environ.items() if k != "RUNICORN_PURE_PYTHON"}
    if backend.name == "python":
        env["RUNICORN_PURE_PYTHON"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "runicorn", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_console_script_ends_without_losing_buffered_output(backend, lab: Path):
    """The process ends with ``os._exit`` after the command returns: what was printed
    reaches the pipe whole, and the published files are complete."""
    done = _console_script(backend, "generate-manifest", "--root", str(lab), "--json")
    assert (done.returncode, done.stderr) == (0, "")
    summary = orjson.loads(done.stdout)
    assert summary["backend"] == backend.name and summary["published"] is True
    published = SyncManifest.from_json(Path(summary["output"]).read_bytes())
    assert published == SyncManifest.from_gzip(Path(summary["compressed"]).read_bytes())
    assert published.total_experiments == summary["experiments"] == 3

    report = _console_script(backend, "generate-manifest", "--root", str(lab))
    assert report.returncode == 0
    assert "Manifest Unchanged" in report.stdout and report.stdout.endswith("=\n")


def test_the_console_script_keeps_its_exit_codes(backend, tmp_path: Path):
    missing = _console_script(backend, "generate-manifest", "--root", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "not a readable directory" in missing.stderr
    unreadable = tmp_path / "file"
    unreadable.write_text("not a directory")
    failed = _console_script(
        backend,
        "generate-manifest",
        "--root",
        str(tmp_path),
        "--output",
        str(unreadable / "m.json"),
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: ")
    assert _console_script(backend, "generate-manifest", "--bogus").returncode == 2


# --- layouts -----------------------------------------------------------------------------------


def test_a_runs_path_root_is_named_and_listed(tmp_path, cli):
    root = tmp_path / "lab"
    run = root / "runs" / "cv" / "yolo" / "20240101_000000_000001"
    _write(run / "meta.json", '{"id":"20240101_000000_000001","path":"cv/yolo"}', 86_400)
    _write(run / "events.jsonl", '{"step":0}\n', 86_400)
    _write(root / "runicorn.db", "SQLite format 3", 60)
    _write(root / "runicorn.db-wal", "", 60)
    summary = _summary(cli("--root", str(root), "--json"))
    assert (summary["layout"], summary["experiments"], summary["files"]) == ("runs-path", 1, 2)
    manifest = _manifest(root / ".runicorn" / "full_manifest.json")
    assert [entry.path for entry in manifest.iter_files()] == [
        "runs/cv/yolo/20240101_000000_000001/events.jsonl",
        "runs/cv/yolo/20240101_000000_000001/meta.json",
    ]
    result = cli("--root", str(root))
    assert "Layout:        runs-path" in result.stdout


def test_a_root_with_both_layouts_is_mixed(lab, cli):
    _write(lab / "runs" / "20240101_000000_00000a" / "status.json", "{}", 60)
    summary = _summary(cli("--root", str(lab), "--json"))
    assert (summary["layout"], summary["experiments"]) == ("mixed", 4)


def test_a_root_without_runs_exits_0_and_says_what_it_looked_for(tmp_path, cli):
    (tmp_path / "not-a-lab" / "src").mkdir(parents=True)
    result = cli("--root", str(tmp_path / "not-a-lab"), "--json")
    summary = _summary(result)
    assert (summary["layout"], summary["experiments"], summary["published"]) == ("none", 0, True)
    root = tmp_path / "not-a-lab"
    assert "no run found" in result.stderr
    assert f"{root}/<project>/<name>/runs/<run_id>/" in result.stderr
    assert f"{root}/runs/<path...>/<run_id>/" in result.stderr


# --- problems: an incomplete scan is published, listed and exits 1 ------------------------


def test_names_the_rule_refuses_are_published_as_problems_and_exit_1(lab, cli):
    run = lab / "proj" / "old" / "runs" / "20240101_000000_000001"
    _write(run / "forged\x1b[2J\nINFO all good", "x", 60)
    os.mkdir(os.fsencode(lab / "proj") + b"/caf\xe9")  # Latin-1 bytes: not UTF-8
    result = cli("--root", str(lab), "--json")
    assert result.exit_code == 1, result.output
    summary = orjson.loads(result.stdout)
    expected = [
        {"path": "proj/caf\\xe9", "reason": REASON_NOT_UTF8},  # escaped: JSON cannot carry it
        {"path": f"{run.relative_to(lab)}/forged\x1b[2J\nINFO all good", "reason": REASON_CONTROL},
    ]
    assert summary["problems"] == expected
    assert summary["experiments"] == 3  # the rest is published all the same
    manifest = _manifest(lab / ".runicorn" / "full_manifest.json")
    assert [{"path": p, "reason": r} for p, r in manifest.problems] == expected
    assert "\x1b" not in result.stderr


def test_the_summary_names_the_problems_escaped(lab, cli):
    _write(lab / "proj" / "old" / "runs" / "r" / "bad\x1b[31mname", "x", 60)
    result = cli("--root", str(lab))
    assert result.exit_code == 1
    assert "Problems:      1: the scan was incomplete" in result.stdout
    assert "  proj/old/runs/r/bad\\x1b[31mname: " + REASON_CONTROL in result.stdout
    assert "\x1b" not in result.stdout + result.stderr
    # unchanged, the manifest still lists them, and the exit code stays 1
    again = cli("--root", str(lab), "--json")
    assert again.exit_code == 1
    assert not orjson.loads(again.stdout)["published"]
    assert orjson.loads(again.stdout)["problems"] == [
        {"path": "proj/old/runs/r/bad\x1b[31mname", "reason": REASON_CONTROL}
    ]

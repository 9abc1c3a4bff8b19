"""A short run of benchmarks/live_latency.py: every write it times arrives, for runicorn
(pushed and polling) and rsync, and the publisher and the client end with exit 0. Timings
are printed, never asserted."""

from __future__ import annotations

import shutil

import pytest

from live_latency import main

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed"),
]


def test_a_small_live_run_times_every_write(tmp_path, capsys):
    report = main(
        [
            "--quick",
            "--runs", "150",
            "--samples", "4",
            "--rsync-samples", "2",
            "--new-runs", "1",
            "--gap", "0.2",
            "--idle", "1",
            "--load", "1",
            "--settle", "0.2",
            "--writers", "10",
            "--workdir", str(tmp_path),
            "--also-poll",
            "--json",
        ]
    )  # fmt: skip
    ours, theirs = report["runicorn"], report["rsync"]
    assert (ours["append_samples"], ours["new_run_samples"], ours["lost"]) == (4, 1, 0)
    polled = report["runicorn_polling"]
    assert (polled["append_samples"], polled["new_run_samples"], polled["lost"]) == (4, 1, 0)
    assert (theirs["append_samples"], theirs["new_run_samples"], theirs["lost"]) == (2, 1, 0)
    assert (ours["client_exit"], ours["publisher_exit"]) == (0, 0)
    assert theirs["pass_failures"] == 0
    assert '"runicorn"' in capsys.readouterr().out

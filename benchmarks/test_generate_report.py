"""The report script behind ``docs/performance.md`` still runs and says what it promises."""

from __future__ import annotations

import generate_report
from runicorn.core.backend import NATIVE, PYTHON, native_available


def test_report_prints_both_tables_and_the_speed_up_ceilings(capsys):
    assert generate_report.main(["--runs", "30", "--rounds", "1", "--scale", "0.05"]) == 0
    report = capsys.readouterr().out
    backends = [NATIVE, PYTHON] if native_available() else [PYTHON]
    assert "| backend | full generation |" in report
    assert "| backend | wall | user CPU | system CPU | cores busy | minor page faults |" in report
    for name in backends:
        assert report.count(f"| {name} |") == 2  # one row in each table
    if len(backends) == 2:
        assert "with every core busy all the time" in report
        assert "everything but the kernel's work cost nothing" in report


def test_a_ceiling_over_no_recorded_cpu_time_is_named_not_divided():
    # A 30-run lab on an idle machine can record 0 s of system CPU (getrusage ticks).
    assert generate_report._ceiling(1.0, 0.0, 2) == "an unbounded factor (no CPU time recorded)"
    assert generate_report._ceiling(1.0, 0.5, 2) == "4.00x"

"""Each benchmark script starts as documented, ``python benchmarks/X.py``, from any directory:
the harness it imports from ``tests/`` must be found without pytest's ``pythonpath``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent
SCRIPTS = [
    "wan_sync",
    "wan_selfcheck",
    "bench_transfer",
    "bench_ciphers",
    "generate_report",
    "lab_scale",
    "live_latency",
    "publisher_cpu",
    "multi_remote",
    "cold_profile",
    "stream_codecs",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_prints_its_usage(script: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}.py"), result.stdout

"""The push channel's server-side command, run by a local shell as sshd would run it: it
says ``ready``, reports which watched file was replaced or rewritten, and ends with exit 0
when its stdin closes (the client's channel closed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.child_lines import ChildLines
from runicorn.transport.change_feed import feed_command

DEADLINE_SECONDS = 30.0


@pytest.mark.parametrize("directory", ["plain", "with space", 'it\'s "quoted" $HOME; `x`'])
def test_the_command_reports_each_replaced_file_and_ends_with_its_stdin(
    tmp_path: Path, directory: str
):
    root = tmp_path / directory
    root.mkdir()
    watched = [root / "active_manifest.json.gz", root / "full_manifest.json.gz"]
    watched[1].write_bytes(b"full 1")
    command = feed_command([str(path) for path in watched], python=sys.executable)
    with subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        out = ChildLines(child.stdout, DEADLINE_SECONDS)
        try:
            assert out.expect(bool) == "ready\n"
            watched[0].write_bytes(b"active 1")  # created
            assert out.expect(bool) == "changed 0\n"
            fresh = root / "next.tmp"
            fresh.write_bytes(b"full 2")
            os.replace(fresh, watched[1])  # an atomic publication: a new inode
            assert out.expect(bool) == "changed 1\n"
            child.stdin.close()
            code = child.wait(DEADLINE_SECONDS)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            out.join()
        assert child.stderr is not None
        assert (code, child.stderr.read()) == (0, "")


def test_the_script_travels_as_one_shell_word_without_newlines():
    command = feed_command(["/data/my lab/.runicorn/active_manifest.json.gz"])
    assert "\n" not in command
    assert command.startswith("python3 -c ")
    assert command.endswith("'/data/my lab/.runicorn/active_manifest.json.gz'")

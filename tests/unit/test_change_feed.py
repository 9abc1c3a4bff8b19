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


def test_inline_content_is_sent_whole_and_only_on_credit(tmp_path: Path):
    """``data I N`` and the file's bytes for an inline path; the next content waits for a
    newline on stdin, then the newest content is read afresh; other paths still get their
    ``changed`` lines meanwhile; a file over the cap is announced, not sent."""
    watched = [tmp_path / "active_manifest.json.gz", tmp_path / "full_manifest.json.gz"]
    command = feed_command(
        [str(path) for path in watched], python=sys.executable, inline=[0], inline_max=64
    )

    def publish(path: Path, data: bytes) -> None:
        fresh = path.with_name("next.tmp")
        fresh.write_bytes(data)
        os.replace(fresh, path)

    with subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        out = ChildLines(child.stdout, DEADLINE_SECONDS)  # type: ignore[arg-type]
        try:
            assert out.expect(bool) == b"ready\n"
            first = b"gz \x00\xff one\n"
            publish(watched[0], first)
            assert out.expect(bool) == b"data 0 %d\n" % len(first)
            assert out.expect(bool) == first
            publish(watched[0], b"gz two\n")  # no credit left: owed
            publish(watched[0], b"gz three\n")
            publish(watched[1], b"full 1")
            assert out.expect(bool) == b"changed 1\n"
            child.stdin.write(b"\n")
            child.stdin.flush()
            assert out.expect(bool) == b"data 0 9\n"
            assert out.expect(bool) == b"gz three\n"
            child.stdin.write(b"\n")
            child.stdin.flush()
            publish(watched[0], b"x" * 65 + b"\n")  # over the cap
            assert out.expect(bool) == b"changed 0\n"
            child.stdin.close()
            code = child.wait(DEADLINE_SECONDS)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            out.join()
        assert child.stderr is not None
        assert (code, child.stderr.read()) == (0, b"")


def test_the_reader_reassembles_frames_split_anywhere():
    """What arrives in pieces of any size is reported once whole: lines and content alike."""
    from runicorn.transport.change_feed import ChangeFeed

    got: list[tuple] = []
    feed = ChangeFeed(
        None,  # type: ignore[arg-type]  (never started)
        ["a.gz", "a", "f.gz"],
        on_change=lambda index: got.append(("changed", index)),
        on_content=lambda index, data: got.append(("data", index, data)),
        inline=[0],
    )
    stream = b"ready\nchanged 2\ndata 0 5\nab\ncdchanged 1\ndata 0 0\n"
    for size in (1, 2, 3, 7, len(stream)):
        got.clear()
        pending = bytearray()
        for start in range(0, len(stream), size):
            pending += stream[start : start + size]
            feed._consume(pending)
        assert not pending
        assert got == [("changed", 2), ("data", 0, b"ab\ncd"), ("changed", 1), ("data", 0, b"")]
    for bad in (b"data 1 3\nabc", b"data 0 x\n", b"data 0 %d\n" % (9 << 30)):
        with pytest.raises(ValueError):
            feed._consume(bytearray(bad))

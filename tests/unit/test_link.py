"""The compression choice (runicorn.transport.link) on recorded link measurements.

The round trips below were measured on this project's machines with ``runicorn sync`` through
the WAN emulator (``harness.wan_proxy``) and straight to a local sshd; the choice is a pure
function of them, of the ssh config's ``Compression`` and of the command-line option.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runicorn.transport.link import (
    AUTO_MIN_RTT,
    CompressionChoice,
    LinkMeasurement,
    choose_compression,
    parse_config_compression,
)
from runicorn.transport.ssh import SshConfigError, resolve_host

LOOPBACK = LinkMeasurement(0.0043, "handshake")  # sshd on 127.0.0.1, busy 2-core machine
LAN_2MS = LinkMeasurement(0.0065, "handshake")  # the benchmarks' LAN profile (2 ms RTT)
WAN_50MS = LinkMeasurement(0.0563, "handshake")  # 50 ms RTT, 100 Mbit/s
LOCAL_PROXY = LinkMeasurement(0.00009, "tcp connect")  # a TCP connect to a local proxy


@pytest.mark.parametrize(
    ("link", "expected"),
    [(LOOPBACK, False), (LAN_2MS, False), (WAN_50MS, True), (LOCAL_PROXY, False), (None, False)],
)
def test_automatic_choice_follows_the_measured_round_trip(
    link: LinkMeasurement | None, expected: bool
) -> None:
    choice = choose_compression(None, None, link)
    assert choice == CompressionChoice(expected, "automatic", link)


def test_the_threshold_itself_compresses() -> None:
    assert choose_compression(None, None, LinkMeasurement(AUTO_MIN_RTT, "handshake")).enabled
    just_below = LinkMeasurement(AUTO_MIN_RTT * 0.999, "handshake")
    assert not choose_compression(None, None, just_below).enabled


@pytest.mark.parametrize("config_value", [True, False])
@pytest.mark.parametrize("link", [LOOPBACK, WAN_50MS, None])
def test_the_ssh_config_overrides_the_automatic_choice(
    config_value: bool, link: LinkMeasurement | None
) -> None:
    choice = choose_compression(None, config_value, link)
    assert (choice.enabled, choice.reason) == (config_value, "ssh_config")


@pytest.mark.parametrize("requested", [True, False])
@pytest.mark.parametrize("config_value", [True, False, None])
@pytest.mark.parametrize("link", [LOOPBACK, WAN_50MS, None])
def test_the_option_wins_over_config_and_link(
    requested: bool, config_value: bool | None, link: LinkMeasurement | None
) -> None:
    choice = choose_compression(requested, config_value, link)
    assert (choice.enabled, choice.reason) == (requested, "option")


def test_description_and_json_say_what_was_measured_and_agreed() -> None:
    chosen = choose_compression(None, None, WAN_50MS)
    agreed = CompressionChoice(
        chosen.enabled, chosen.reason, chosen.link, negotiated="zlib@openssh.com"
    )
    assert agreed.describe() == (
        "compression on (automatic: handshake round trip 56.3 ms, at or above 15 ms)"
    )
    assert agreed.as_dict() == {
        "enabled": True,
        "active": True,
        "reason": "automatic",
        "rtt_ms": 56.3,
        "rtt_method": "handshake",
        "negotiated": "zlib@openssh.com",
        "carrier": "ssh",
    }
    refused = CompressionChoice(True, "option", None, negotiated="none")
    assert not refused.active
    assert refused.describe() == (
        "compression on (--compress); the server does not offer compression"
    )
    # The file stream compresses instead of SSH: active though SSH agreed to none.
    streamed = CompressionChoice(True, "option", None, negotiated="none", carrier="stream")
    assert streamed.active and streamed.as_dict()["carrier"] == "stream"
    assert streamed.describe() == (
        "compression on (--compress); done by the file stream, SSH compression off"
    )
    assert "no round-trip measurement" in choose_compression(None, None, None).describe()
    assert "Compression no in the ssh config" in choose_compression(None, False, None).describe()


@pytest.mark.parametrize(
    ("link", "expected"),
    [(LOOPBACK, False), (LAN_2MS, False), (WAN_50MS, True), (LOCAL_PROXY, False), (None, False)],
)
def test_a_first_sync_leaves_an_automatic_on_to_the_file_stream(
    link: LinkMeasurement | None, expected: bool
) -> None:
    # A first sync's connection offers SSH no compression: the choice, made from the same
    # measurement, is the file stream's when it is on, and plainly off when it is not.
    choice = choose_compression(None, None, link, "stream")
    assert (choice.enabled, choice.reason, choice.link) == (expected, "automatic", link)
    assert choice.carrier == ("stream" if expected else "ssh")
    assert choice.active is expected
    assert choice.negotiated == ("none" if expected else None)
    assert choose_compression(None, None, link) == CompressionChoice(expected, "automatic", link)


@pytest.mark.parametrize(
    ("requested", "config_value", "enabled", "reason"),
    [
        (True, None, True, "option"),
        (False, True, False, "option"),
        (None, True, True, "ssh_config"),
        (None, False, False, "ssh_config"),
    ],
)
def test_the_option_and_the_ssh_config_keep_their_meaning_for_the_file_stream(
    requested: bool | None, config_value: bool | None, enabled: bool, reason: str
) -> None:
    for link in (LOOPBACK, WAN_50MS, None):
        choice = choose_compression(requested, config_value, link, "stream")
        assert (choice.enabled, choice.reason, choice.active) == (enabled, reason, enabled)
        assert choice.carrier == ("stream" if enabled else "ssh")
    on = choose_compression(True, None, WAN_50MS, "stream")
    assert on.describe() == (
        "compression on (--compress); done by the file stream, SSH compression off"
    )
    assert on.as_dict()["carrier"] == "stream" and on.as_dict()["negotiated"] == "none"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("yes", True), ("Yes", True), ("delayed", True), ("no", False)],
)
def test_config_values(value: str | None, expected: bool | None) -> None:
    assert parse_config_compression(value) is expected


def test_resolve_host_reads_compression_from_the_ssh_config(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host far\n    HostName 192.0.2.7\n    Compression yes\n"
        "Host near\n    HostName 192.0.2.8\n    Compression no\n"
        "Host odd\n    Compression maybe\n"
    )
    assert resolve_host("far", config_path=config).compression is True
    assert resolve_host("near", config_path=config).compression is False
    assert resolve_host("other", config_path=config).compression is None
    with pytest.raises(SshConfigError, match=r"Compression 'maybe'.*use yes or no.*odd"):
        resolve_host("odd", config_path=config)

"""Whether an SSH connection should compress: the user's word first, else the link's.

SSH compression (zlib, done by ``sshd`` on the server side) trades the server's CPU for bytes
on the wire. On a long or slow link (a VPN, a campus-to-cluster WAN) the wire is the
bottleneck and the sync's files (JSON lines, logs, JSON) shrink two to three times, so a cold
sync gets about 1.6x faster. On a LAN at 1 Gbit/s zlib itself is the bottleneck: one sshd
process compresses far less than 125 MB/s.

The choice is a pure function of what was asked and what was measured, so it can be tested on
recorded measurements:

1. an explicit request (``--compress`` / ``--no-compress``, ``connect(compress=…)``) wins;
2. then ``Compression yes`` / ``Compression no`` from the ssh_config, as ``ssh`` honours it;
3. else automatic: compress when the round trip measured on the connection is at least
   :data:`AUTO_MIN_RTT`. Round-trip time is the one thing the client can measure before any
   file moves, and it separates the two cases well: a LAN answers in well under a
   millisecond or two, links whose bandwidth zlib outruns sit tens of milliseconds away.
   Without a measurement the automatic choice is off, as ``ssh``'s default is.

Who carries it is the caller's plan: SSH (``sshd``'s zlib), or the file stream of a first
sync, which compresses in its own process (zstd where the server has it) and needs SSH
compression off; then nothing is offered to SSH and a choice of "on" is the stream's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "AUTO_MIN_RTT",
    "CompressionChoice",
    "LinkMeasurement",
    "choose_compression",
    "parse_config_compression",
]

AUTO_MIN_RTT = 0.015
"""Seconds of round trip from which the automatic choice compresses. A LAN (well under 5 ms,
even through a busy switch) stays below it; a WAN path with a bandwidth below what one sshd
process compresses per second (``docs/performance.md``) is above it."""

Reason = Literal["option", "ssh_config", "automatic"]


@dataclass(frozen=True)
class LinkMeasurement:
    """One round-trip time measured on the connection, and how it was measured.

    ``method`` names the measurement: ``"handshake"`` (the key-exchange request's reply: one
    round trip plus a millisecond or so of the server's key agreement; after an automatic
    "on", the shortest of that and up to three keepalive requests' replies) or
    ``"tcp connect"`` (the TCP handshake; a local proxy or a ProxyCommand hides the link
    from it).
    """

    rtt: float
    method: str


@dataclass(frozen=True)
class CompressionChoice:
    """What was chosen and why; ``negotiated`` is what the server agreed to (``None`` until
    the connection is up), e.g. ``"zlib@openssh.com"`` or ``"none"``."""

    enabled: bool
    reason: Reason
    link: LinkMeasurement | None = None
    negotiated: str | None = None
    carrier: Literal["ssh", "stream"] = "ssh"
    """Who compresses: SSH (``sshd``), or the file stream (:mod:`.file_stream`), which then
    asked for SSH compression to be re-keyed off."""

    @property
    def active(self) -> bool:
        """Whether the server compresses what it sends (asked for and agreed to, or done
        by the file stream)."""
        if self.carrier == "stream":
            return self.enabled
        return self.enabled and self.negotiated not in (None, "none")

    def describe(self) -> str:
        """One line for logs and verbose output: ``compression on (automatic: RTT 48.2 ms …)``."""
        state = "on" if self.enabled else "off"
        if self.reason == "option":
            why = "--compress" if self.enabled else "--no-compress"
        elif self.reason == "ssh_config":
            why = f"Compression {'yes' if self.enabled else 'no'} in the ssh config"
        elif self.link is None:
            why = "automatic: no round-trip measurement, off as in ssh"
        else:
            side = "at or above" if self.enabled else "below"
            why = (
                f"automatic: {self.link.method} round trip {self.link.rtt * 1000:.1f} ms, "
                f"{side} {AUTO_MIN_RTT * 1000:.0f} ms"
            )
        line = f"compression {state} ({why})"
        if self.enabled and self.carrier == "stream":
            line += "; done by the file stream, SSH compression off"
        elif self.enabled and self.negotiated == "none":
            line += "; the server does not offer compression"
        return line

    def as_dict(self) -> dict[str, object]:
        """The ``compression`` object of ``runicorn sync --json``."""
        return {
            "enabled": self.enabled,
            "active": self.active,
            "reason": self.reason,
            "rtt_ms": None if self.link is None else round(self.link.rtt * 1000, 2),
            "rtt_method": None if self.link is None else self.link.method,
            "negotiated": self.negotiated,
            "carrier": self.carrier,
        }


def parse_config_compression(value: str | None) -> bool | None:
    """``Compression`` from an ssh_config lookup: True, False, or None when absent.

    OpenSSH accepts ``yes``/``no`` (and, historically, ``delayed``, which is yes).
    """
    if value is None:
        return None
    word = value.strip().lower()
    if word in ("yes", "delayed", "true", "on"):
        return True
    if word in ("no", "false", "off"):
        return False
    raise ValueError(f"Compression {value!r} in the ssh config: use yes or no")


def choose_compression(
    requested: bool | None,
    config_value: bool | None,
    link: LinkMeasurement | None,
    carrier: Literal["ssh", "stream"] = "ssh",
) -> CompressionChoice:
    """The choice for one connection: the request, else the ssh config, else the link.

    ``carrier``: who would compress (``"stream"``: the file stream, SSH agreed to none); the
    choice names it only when it is on."""
    if requested is not None:
        choice = CompressionChoice(requested, "option", link)
    elif config_value is not None:
        choice = CompressionChoice(config_value, "ssh_config", link)
    elif link is None:
        choice = CompressionChoice(False, "automatic", None)
    else:
        choice = CompressionChoice(link.rtt >= AUTO_MIN_RTT, "automatic", link)
    if carrier == "stream" and choice.enabled:
        return replace(choice, negotiated="none", carrier="stream")
    return choice

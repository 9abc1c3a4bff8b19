"""Round trips saved by leaning on paramiko internals and on OpenSSH's behaviour, in one place.

Why: on a 50 ms link a sync that finds nothing new is a handful of round trips, and four of
them can be skipped when the server is OpenSSH -- the SSH authentication request can leave
behind its service request, the subsystem request behind its channel's CHANNEL_OPEN, the
SFTP INIT with the first requests, and the handle of a session's first file is known in
advance. Each of these needs either paramiko's private
methods or a fact about OpenSSH that no standard promises. Everything that does lives here,
and so do the two hooks the automatic compression choice needs: timing the key exchange's
round trip, and a re-key that really turns compression off (:class:`ClientTransport`).

The switch: :func:`enabled` is true for a server whose SSH banner says OpenSSH, false for any
other, and false everywhere when the environment variable ``RUNICORN_OPENSSH_SHORTCUTS`` is
``0`` (also ``off``, ``false``, ``no``). With it off the transport speaks the plain protocol
through paramiko's public API only (one round trip more for each shortcut). A paramiko
release that renames a hooked attribute is caught by ``tests/sshd/test_paramiko_hooks.py``, which
checks every entry of :data:`PRIVATE_API`; setting the variable is the way out for a user
until a fixed runicorn is released.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.common import cMSG_CHANNEL_OPEN, cMSG_CHANNEL_REQUEST

__all__ = [
    "ENV_VAR",
    "OPENSSH_FIRST_CHANNEL",
    "OPENSSH_FIRST_HANDLE",
    "PRIVATE_API",
    "ClientTransport",
    "PipelinedAuthHandler",
    "Prefetched",
    "PrefetchingSFTPClient",
    "PrivateHook",
    "enabled",
    "environment_allows",
    "exec_early",
    "open_session_ahead",
    "speaks_openssh",
    "take_session_ahead",
    "transport_class",
]

logger = logging.getLogger(__name__)

ENV_VAR = "RUNICORN_OPENSSH_SHORTCUTS"
_OFF_VALUES = frozenset({"0", "off", "false", "no"})

OPENSSH_FIRST_HANDLE = (0).to_bytes(4, "big")
"""The handle OpenSSH's sftp-server gives the first file opened in a session.

Its handles are the index of a slot in its handle table, as four bytes, the lowest free slot
first (``handle_new``/``handle_to_string`` in sftp-server.c, unchanged since 2002). Knowing it
lets the first READ leave with the OPEN; :class:`~.sftp_ops.ReadRangeOp` checks the guess
against the handle actually returned before it uses a byte."""


OPENSSH_FIRST_CHANNEL = 0
"""The number sshd gives the first channel a client opens on a connection.

OpenSSH numbers a connection's channels by the lowest free slot of its channel table
(``channel_new`` in channels.c) and opens none of its own unless the client asks for a
forwarding, so the first session channel is 0. Knowing it lets the subsystem request leave
with the CHANNEL_OPEN; :meth:`ClientTransport.open_subsystem` checks the number the server
confirms before the channel is used."""


# -- the switch --------------------------------------------------------------------------------


def environment_allows() -> bool:
    """False when ``RUNICORN_OPENSSH_SHORTCUTS`` turns the shortcuts off (read at each call)."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in _OFF_VALUES


def speaks_openssh(transport: paramiko.Transport) -> bool:
    """Whether the server's SSH banner says it is OpenSSH."""
    version = getattr(transport, "remote_version", "") or ""
    return version.startswith("SSH-2.0-OpenSSH")


def enabled(transport: paramiko.Transport) -> bool:
    """The one switch: shortcuts for this connection (an OpenSSH server, not turned off)."""
    return environment_allows() and speaks_openssh(transport)


# -- what paramiko must still provide ----------------------------------------------------------


@dataclass(frozen=True)
class PrivateHook:
    """One private (or undocumented) paramiko attribute this module relies on.

    ``parameters`` names a method's parameters after ``self`` as we call or override them;
    None marks an attribute of an instance (set in ``__init__``), not a method.
    """

    owner: str
    name: str
    parameters: tuple[str, ...] | None
    use: str


PRIVATE_API: tuple[PrivateHook, ...] = (
    PrivateHook(
        "paramiko.SFTPClient",
        "_send_version",
        (),
        "PrefetchingSFTPClient overrides it: __init__ must get the server version from it",
    ),
    PrivateHook(
        "paramiko.AuthHandler",
        "_request_auth",
        (),
        "PipelinedAuthHandler overrides it to send the USERAUTH_REQUEST right behind it",
    ),
    PrivateHook(
        "paramiko.AuthHandler",
        "_parse_service_accept",
        ("m",),
        "PipelinedAuthHandler calls it early and drops the server's later SERVICE_ACCEPT",
    ),
    PrivateHook(
        "paramiko.AuthHandler",
        "_get_key_type_and_bits",
        ("key",),
        "PipelinedAuthHandler asks it whether the key is an RSA key",
    ),
    PrivateHook(
        "paramiko.AuthHandler",
        "_client_handler_table",
        None,
        "must dispatch SERVICE_ACCEPT to the handler's own _parse_service_accept",
    ),
    PrivateHook("paramiko.AuthHandler", "auth_method", None, "PipelinedAuthHandler reads it"),
    PrivateHook("paramiko.AuthHandler", "private_key", None, "PipelinedAuthHandler reads it"),
    PrivateHook(
        "paramiko.Transport",
        "auth_handler",
        None,
        "ClientTransport installs its PipelinedAuthHandler there, as auth_publickey does",
    ),
    PrivateHook(
        "paramiko.Transport",
        "initial_kex_done",
        None,
        "ClientTransport.auth_publickey checks it, as paramiko's does",
    ),
    PrivateHook(
        "paramiko.Transport",
        "server_extensions",
        None,
        "PipelinedAuthHandler looks for server-sig-algs in it",
    ),
    PrivateHook("paramiko.Transport", "remote_version", None, "speaks_openssh reads the banner"),
    *(
        PrivateHook(
            "paramiko.Transport",
            name,
            parameters,
            "ClientTransport.open_subsystem does what open_channel does, then sends the "
            "subsystem request without waiting for the channel's confirmation",
        )
        for name, parameters in (
            ("lock", None),
            ("_channels", None),
            ("channel_events", None),
            ("channels_seen", None),
            ("channel_timeout", None),
            ("_next_channel", ()),
            ("_sanitize_window_size", ("window_size",)),
            ("_sanitize_packet_size", ("max_packet_size",)),
            ("_send_user_message", ("data",)),
        )
    ),
    *(
        PrivateHook(
            "paramiko.Channel",
            name,
            parameters,
            "ClientTransport.open_subsystem sets the channel up as open_channel and "
            "invoke_subsystem do, and reads the server's channel number",
        )
        for name, parameters in (
            ("remote_chanid", None),
            ("_set_transport", ("transport",)),
            ("_set_window", ("window_size", "max_packet_size")),
            ("_event_pending", ()),
            ("_wait_for_event", ()),
        )
    ),
    PrivateHook(
        "paramiko.Transport",
        "_send_user_message",
        ("data",),
        "exec_early sends the exec request through it, as Channel.exec_command does",
    ),
    PrivateHook(
        "paramiko.Channel",
        "_event_pending",
        (),
        "exec_early arms the channel's event for the exec reply it does not wait for",
    ),
    PrivateHook(
        "paramiko.Channel",
        "remote_chanid",
        None,
        "exec_early addresses the exec request to the server's end of the channel",
    ),
    PrivateHook(
        "paramiko.Transport",
        "_negotiate_keys",
        ("m",),
        "ClientTransport overrides it to time the key-exchange round trip from its end",
    ),
    PrivateHook(
        "paramiko.Transport",
        "_activate_outbound",
        (),
        "ClientTransport overrides it: the reply that calls it ends the timed round trip, and "
        "after a re-key to no compression it drops the outbound compressor paramiko keeps",
    ),
    PrivateHook(
        "paramiko.Transport",
        "_activate_inbound",
        (),
        "ClientTransport overrides it to drop the inbound compressor after a re-key to none",
    ),
    PrivateHook(
        "paramiko.Transport",
        "packetizer",
        None,
        "ClientTransport clears its compressors (set_outbound_compressor(None) …) and times "
        "its read_message",
    ),
    PrivateHook(
        "paramiko.Transport",
        "local_compression",
        None,
        "ClientTransport and transport.ssh read the negotiated client-to-server compression",
    ),
    PrivateHook(
        "paramiko.Transport",
        "remote_compression",
        None,
        "ClientTransport and transport.ssh read the negotiated server-to-client compression",
    ),
)
"""Checked by ``tests/sshd/test_paramiko_hooks.py`` against the installed paramiko."""


# -- a command's input in the same flight as its start ---------------------------------------


def exec_early(channel: paramiko.Channel, command: str) -> None:
    """Start ``command`` on ``channel`` without waiting for the server's answer.

    paramiko's ``exec_command`` waits a round trip for the server to accept the request before
    the command's input can be sent. sshd handles a channel's packets in order and has the
    command's stdin open once it accepts, so input sent right behind the request reaches the
    command; a refusal closes the channel (paramiko's handling of the failure), which the
    reader sees as an end before any output. With the shortcuts off: ``exec_command``."""
    if not enabled(channel.get_transport()):
        channel.exec_command(command)
        return
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)
    message.add_string(command)
    channel._event_pending()  # type: ignore[attr-defined]
    channel.get_transport()._send_user_message(message)  # type: ignore[attr-defined]


# -- SSH authentication in one round trip less ------------------------------------------------


class PipelinedAuthHandler(AuthHandler):
    """Sends a public-key USERAUTH_REQUEST right behind its SERVICE_REQUEST.

    paramiko waits for SERVICE_ACCEPT before it signs and sends the request; OpenSSH handles
    a connection's packets in order and accepts ``ssh-userauth`` at once, so the wait is a
    round trip for nothing. Only the signature's algorithm could depend on the server's
    answer (``server-sig-algs``, for RSA keys): an RSA key waits unless that list is here.

    The private methods it overrides and calls are absent from paramiko's type stubs (hence
    the ``type: ignore`` below); :data:`PRIVATE_API` lists them for the test that checks them.
    """

    _sent_early = False

    def _request_auth(self) -> None:
        self._sent_early = self._can_send_early()
        # Set before anything is sent: the transport thread may handle the SERVICE_ACCEPT
        # before this thread has signed, and must not send the request a second time.
        super()._request_auth()  # type: ignore[misc]
        if self._sent_early:
            accept = paramiko.Message()
            accept.add_string("ssh-userauth")
            accept.rewind()
            super()._parse_service_accept(accept)  # type: ignore[misc]  # signs, sends now

    def _can_send_early(self) -> bool:
        if self.auth_method != "publickey":
            return False
        key_type, _ = self._get_key_type_and_bits(self.private_key)  # type: ignore[attr-defined]
        extensions = self.transport.server_extensions  # type: ignore[attr-defined]
        return "rsa" not in key_type or "server-sig-algs" in extensions

    def _parse_service_accept(self, m: paramiko.Message) -> None:
        if not self._sent_early:
            super()._parse_service_accept(m)  # type: ignore[misc]


class ClientTransport(paramiko.Transport):
    """paramiko's Transport whose public-key authentication costs one round trip less when
    :func:`enabled`, which times round trips on the wire, and which can re-key compression
    off.

    ``kex_round_trip`` is the time from sending the key-exchange request (as soon as the
    server's KEXINIT arrived) to reading the server's reply packet: one network round trip
    plus the server's key agreement, without sshd's start-up (which the banner wait
    includes) and without this process's work on the reply (a fresh process initialises its
    crypto there, tens of milliseconds on a busy machine). :meth:`probe_round_trip` times a
    keepalive request the same way. Both read the time a packet was read, kept by a wrapper
    around the packetizer's ``read_message`` until :meth:`stop_timing`.

    paramiko keeps a compressor once set, even after a re-key that agrees on ``none``;
    both ``_activate_*`` overrides drop it then, so a connection can start with compression
    offered and turn it off with :meth:`renegotiate_keys` when the link turns out to be fast.
    """

    kex_round_trip: float | None = None
    _kex_request_sent: float | None = None
    _last_read: float = 0.0
    _ahead_window: int | None = None
    _ahead: tuple[paramiko.Channel, threading.Event] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        read = self.packetizer.read_message

        def timed_read() -> tuple[int, paramiko.Message]:
            message = read()
            self._last_read = time.monotonic()
            return message

        self.packetizer.read_message = timed_read  # type: ignore[method-assign]

    def stop_timing(self) -> None:
        """Read packets without noting the time (the measurements are taken)."""
        self.packetizer.__dict__.pop("read_message", None)

    def probe_round_trip(self) -> float:
        """One ``keepalive@openssh.com`` global request (as ``ssh``'s ServerAliveInterval
        sends it; the server only refuses it): seconds until its reply was read."""
        started = time.monotonic()
        self.global_request("keepalive@openssh.com", wait=True)
        replied = self._last_read if self._last_read >= started else time.monotonic()
        return replied - started

    def _negotiate_keys(self, m: paramiko.Message) -> None:
        super()._negotiate_keys(m)  # type: ignore[misc]  # sends the key-exchange request
        if self._kex_request_sent is None:
            self._kex_request_sent = time.monotonic()

    def _activate_outbound(self) -> None:
        # Called on the reply: the packet just read is the server's key-exchange reply.
        if self.kex_round_trip is None and self._kex_request_sent is not None:
            self.kex_round_trip = max(0.0, self._last_read - self._kex_request_sent)
        super()._activate_outbound()  # type: ignore[misc]
        if self.local_compression == "none":
            # paramiko accepts None (its initial value); the stubs say a compressor only
            self.packetizer.set_outbound_compressor(None)  # type: ignore[arg-type]

    def _activate_inbound(self) -> None:
        super()._activate_inbound()  # type: ignore[misc]
        if getattr(self, "remote_compression", None) == "none":  # absent from the stubs
            self.packetizer.set_inbound_compressor(None)  # type: ignore[arg-type]

    def open_subsystem(
        self,
        subsystem: str,
        *,
        window_size: int | None = None,
        max_packet_size: int | None = None,
        timeout: float | None = None,
    ) -> paramiko.Channel:
        """A session channel running ``subsystem``: ``open_session`` and
        ``invoke_subsystem``, in one round trip instead of two when :func:`enabled` and no
        channel was opened on the connection yet (the request names the server's channel
        :data:`OPENSSH_FIRST_CHANNEL` before the server has confirmed it)."""
        if not enabled(self) or self.channels_seen:
            channel = self.open_session(
                window_size=window_size, max_packet_size=max_packet_size, timeout=timeout
            )
            try:
                channel.invoke_subsystem(subsystem)
            except BaseException:
                channel.close()
                raise
            return channel
        if not self.active:  # type: ignore[attr-defined]
            raise paramiko.SSHException("SSH session not active")
        wait = self.channel_timeout if timeout is None else timeout
        channel, opening, opened = self._session_opening(window_size, max_packet_size)
        # paramiko's invoke_subsystem, addressed to the channel number the server will give
        request = paramiko.Message()
        request.add_byte(cMSG_CHANNEL_REQUEST)
        request.add_int(OPENSSH_FIRST_CHANNEL)
        request.add_string("subsystem")
        request.add_boolean(True)
        request.add_string(subsystem)
        channel._event_pending()  # type: ignore[attr-defined]
        self._send_user_message(opening)  # type: ignore[attr-defined]
        self._send_user_message(request)  # type: ignore[attr-defined]
        if self._ahead_window is not None:
            # The channel asked for ahead leaves right behind, while this one is answered.
            ahead, ahead_opening, ahead_opened = self._session_opening(self._ahead_window, None)
            self._ahead_window = None
            self._send_user_message(ahead_opening)  # type: ignore[attr-defined]
            self._ahead = (ahead, ahead_opened)
        try:
            self._wait_open(channel, opened, wait)
            if channel.remote_chanid != OPENSSH_FIRST_CHANNEL:
                raise paramiko.SSHException(
                    f"the server numbered the first channel {channel.remote_chanid}, not "
                    f"{OPENSSH_FIRST_CHANNEL} as OpenSSH does; set {ENV_VAR}=0 to connect "
                    "without the OpenSSH shortcuts"
                )
            channel._wait_for_event()  # type: ignore[attr-defined]  # the subsystem's answer
        except BaseException:
            channel.close()
            raise
        return channel

    def _session_opening(
        self, window_size: int | None, max_packet_size: int | None
    ) -> tuple[paramiko.Channel, paramiko.Message, threading.Event]:
        """paramiko's ``open_channel`` up to sending the CHANNEL_OPEN: the channel, the
        message to send, and the event its answer sets."""
        with self.lock:
            window_size = self._sanitize_window_size(window_size)  # type: ignore[attr-defined]
            max_packet_size = self._sanitize_packet_size(max_packet_size)  # type: ignore[attr-defined]
            chanid = self._next_channel()  # type: ignore[attr-defined]
            opening = paramiko.Message()
            opening.add_byte(cMSG_CHANNEL_OPEN)
            opening.add_string("session")
            opening.add_int(chanid)
            opening.add_int(window_size)
            opening.add_int(max_packet_size)
            channel = paramiko.Channel(chanid)
            self._channels.put(chanid, channel)  # type: ignore[attr-defined]
            self.channel_events[chanid] = opened = threading.Event()
            self.channels_seen[chanid] = True
            channel._set_transport(self)  # type: ignore[attr-defined]
            channel._set_window(window_size, max_packet_size)  # type: ignore[attr-defined]
        return channel, opening, opened

    def _wait_open(self, channel: paramiko.Channel, opened: threading.Event, wait: float) -> None:
        """paramiko's ``open_channel`` from the wait for the server's answer on."""
        deadline = time.monotonic() + wait
        while not opened.wait(0.1):
            if not self.active:  # type: ignore[attr-defined]
                raise self.get_exception() or paramiko.SSHException("Unable to open channel.")
            if time.monotonic() > deadline:
                raise paramiko.SSHException("Timeout opening channel.")
        if self._channels.get(channel.chanid) is None:  # type: ignore[attr-defined]  # refused
            raise self.get_exception() or paramiko.SSHException("Unable to open channel.")

    def open_session_ahead(self, window_size: int) -> None:
        """Have the next :meth:`open_subsystem` that saves its round trip (the connection's
        first channel) send the CHANNEL_OPEN of one more session channel right behind its
        own, for :meth:`take_session_ahead`: that channel's round trip then overlaps the
        first one's instead of following it. Nothing about its number is assumed."""
        self._ahead_window = window_size

    def take_session_ahead(
        self, window_size: int, timeout: float | None
    ) -> paramiko.Channel | None:
        """The session channel opened ahead, once the server confirmed it; None when none was
        opened ahead (or it was taken) or it was opened with another window (then closed)."""
        ahead, self._ahead, self._ahead_window = self._ahead, None, None
        if ahead is None:
            return None
        channel, opened = ahead
        try:
            if channel.in_window_size != window_size:
                channel.close()
                return None
            self._wait_open(channel, opened, self.channel_timeout if timeout is None else timeout)
        except BaseException:
            channel.close()
            raise
        return channel

    def auth_publickey(
        self, username: str, key: paramiko.PKey, event: threading.Event | None = None
    ) -> list[str]:
        if not enabled(self):
            logger.debug("plain authentication: no OpenSSH shortcuts for %s", self.remote_version)
            return super().auth_publickey(username, key, event)
        # paramiko's own auth_publickey, with the pipelined handler
        if not self.is_active() or not self.initial_kex_done:
            raise paramiko.SSHException("No existing session")
        done = event if event is not None else threading.Event()
        self.auth_handler = PipelinedAuthHandler(self)
        self.auth_handler.auth_publickey(username, key, done)
        if event is not None:
            return []
        allowed: list[str] = self.auth_handler.wait_for_response(done)
        return allowed


def open_session_ahead(transport: paramiko.Transport, window_size: int) -> None:
    """:meth:`ClientTransport.open_session_ahead` where the transport is one (else nothing)."""
    if isinstance(transport, ClientTransport) and enabled(transport):
        transport.open_session_ahead(window_size)


def take_session_ahead(
    transport: paramiko.Transport, window_size: int, timeout: float | None
) -> paramiko.Channel | None:
    """:meth:`ClientTransport.take_session_ahead` where the transport is one (else None)."""
    if isinstance(transport, ClientTransport):
        return transport.take_session_ahead(window_size, timeout)
    return None


def transport_class() -> type[paramiko.Transport]:
    """The Transport class for a new connection: paramiko's own when the environment turns
    the shortcuts off (then not one private attribute is touched), else :class:`ClientTransport`,
    which decides per server once it has seen the banner."""
    if environment_allows():
        return ClientTransport
    logger.debug("OpenSSH shortcuts are off (%s=%s)", ENV_VAR, os.environ.get(ENV_VAR))
    return paramiko.Transport


# -- an SFTP session whose INIT went out with its first requests ------------------------------


@dataclass
class Prefetched:
    """File prefixes read in an SFTP session's first round trip, for the first caller that asks.

    ``results`` maps a path relative to ``root`` to its first ``length`` bytes, or to the
    exception reading it raised (``FileNotFoundError`` …).
    """

    root: str
    length: int
    results: dict[str, bytes | BaseException]
    stamps: dict[str, tuple[int, int] | BaseException] = field(default_factory=dict)
    """``(size, mtime)`` of the paths whose attributes that round trip asked (STAT)."""

    def take(self, root: str, path: str, length: int) -> bytes | BaseException | None:
        """The answer for ``path``, once; None if it was not read with this root and length."""
        if root.rstrip("/") != self.root.rstrip("/") or length != self.length:
            return None
        return self.results.pop(path, None)

    def take_stamp(self, root: str, path: str) -> tuple[int, int] | BaseException | None:
        """The ``(size, mtime)`` of ``path`` asked with this root, once; None if not asked."""
        if root.rstrip("/") != self.root.rstrip("/"):
            return None
        return self.stamps.pop(path, None)


class PrefetchingSFTPClient(paramiko.SFTPClient):
    """A paramiko ``SFTPClient`` whose INIT went out pipelined with its first requests.

    Made by :func:`~.sftp_pipeline.open_sftp_client`; ``root`` is the remote root it resolved
    and ``prefetched`` what the first round trip read (consumed by
    :class:`~.sftp_remote.SftpRemote`).
    """

    def __init__(
        self, channel: paramiko.Channel, server_version: int, root: str, prefetched: Prefetched
    ) -> None:
        self._known_version = server_version
        self.root = root
        self.prefetched = prefetched
        super().__init__(channel)

    def _send_version(self) -> int:
        # paramiko's __init__ calls this to exchange INIT/VERSION, which already happened.
        return self._known_version
